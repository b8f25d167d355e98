"""Early exit: a LayerSkip-style training objective and a naive reference decoder.

Training (`EarlyExitObjective`, a `training.Objective`): besides the usual next-token loss
at the last layer, every intermediate layer's output goes through the *shared* final norm
and LM head and gets its own next-token loss, weighted `exit_weight * (l / L)` (deeper
exits count more, as in LayerSkip's curriculum-free variant). Then, at inference, the
engine's runner can stop at the first layer whose top probability reaches a threshold
(see `runner.ModelRunner.execute`).

`reference_early_exit_greedy` recomputes the whole sequence for every token, with the
same rule written naively: a position that exited at layer e passes through layers > e
unchanged (so those layers' K/V for it come from its exit hidden state). Tests compare
the engine against it.

Example:
    >>> import torch
    >>> from autoglm import OpenAutoGLMConfig, OpenAutoGLMForCausalLM
    >>> model = OpenAutoGLMForCausalLM(OpenAutoGLMConfig.from_name("tiny"))
    >>> x = torch.randint(0, 512, (2, 8))
    >>> sorted(EarlyExitObjective()(model, (x, x)))
    ['aux_loss', 'exit_loss', 'lm_loss', 'loss']
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..losses import lm_loss
from ..modules.attention import AttentionMetadata

__all__ = ["EarlyExitObjective", "exit_logits", "reference_early_exit_greedy"]


def exit_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Shared head on an intermediate hidden state: (..., d) -> (..., V)."""
    return model.lm_head(model.model.norm(hidden))


class EarlyExitObjective:
    """loss = LM loss (last layer) + MoE aux + exit_weight * mean_l (l / L) * LM loss(exit after layer l).

    batch = (input_ids, labels), as `CausalLMObjective`. Reports "exit_loss" (the weighted
    intermediate term) besides "lm_loss" and "aux_loss".
    """

    def __init__(self, exit_weight: float = 1.0) -> None:
        if exit_weight < 0:
            raise ValueError(f"exit_weight must be >= 0, got {exit_weight}")
        self.exit_weight = exit_weight

    def __call__(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        input_ids, labels = batch
        out = model(input_ids, output_hidden_states=True)
        lm = lm_loss(out.logits, labels)
        aux = out.aux_loss if out.aux_loss is not None else torch.zeros((), device=lm.device)
        hs = out.hidden_states  # input of each block + final (before norm): hs[l] = after l layers
        L = len(hs) - 1
        exits = [(l / L) * lm_loss(exit_logits(model, hs[l]), labels) for l in range(1, L)]
        ex = torch.stack(exits).mean() if exits else torch.zeros((), device=lm.device)
        return {"loss": lm + aux + self.exit_weight * ex, "lm_loss": lm.detach(), "aux_loss": aux.detach(),
                "exit_loss": ex.detach()}

    def __repr__(self) -> str:
        return f"EarlyExitObjective(exit_weight={self.exit_weight})"


@torch.no_grad()
def reference_early_exit_greedy(model: nn.Module, prompt: list[int], max_tokens: int, threshold: float,
                                exit_layers: tuple[int, ...]) -> tuple[list[int], list[int]]:
    """Greedy decoding with early exit, recomputing the full sequence each token (O(n^2), tests only).

    The first token comes from the full model (prefill never exits, as in the engine).
    Returns (tokens, exit layer of each token).
    """
    bb = model.model
    n_layers = len(bb.layers)
    tokens, exits = list(prompt), [n_layers] * len(prompt)  # exits[p]: layers position p ran in full
    out, out_exits = [], []
    for step in range(max_tokens):
        ids = torch.tensor([tokens])
        T = ids.shape[1]
        pos = torch.arange(T)[None]
        meta = AttentionMetadata(q_offset=0)
        x = bb.embed_tokens(ids)
        if bb.embed_positions is not None:
            x = x + bb.embed_positions(pos)
        last_exit = n_layers
        logits = None
        for i, layer in enumerate(bb.layers):
            y, _ = layer(x, meta, None)
            ran = torch.tensor([e > i for e in exits])[None, :, None]  # positions that run layer i
            x = torch.where(ran, y, x)
            if step > 0 and threshold < 1.0 and i + 1 in exit_layers and i + 1 < n_layers:
                lg = exit_logits(model, x[0, -1])
                if float(lg.float().softmax(-1).max()) >= threshold:
                    logits, last_exit = lg, i + 1
                    break
        if logits is None:
            logits = model.lm_head(bb.norm(x[0, -1]))
        exits[-1] = last_exit  # the last input position's K/V above last_exit come from its exit state
        tok = int(logits.argmax())
        out.append(tok)
        out_exits.append(last_exit)
        tokens.append(tok)
        exits.append(n_layers)
    return out, out_exits
