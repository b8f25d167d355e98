"""Early exit: a LayerSkip-style training objective and a naive reference decoder.

Training (`EarlyExitObjective`, a `training.Objective`): besides the usual next-token loss
at the last layer, every intermediate layer's output goes through the *shared* final norm
and LM head and gets its own next-token loss, weighted `exit_weight * (l / L)` (deeper
exits count more, as in LayerSkip's curriculum-free variant). Then, at inference, the
engine's runner can stop at the first layer whose top probability reaches a threshold
(see `runner.ModelRunner.execute`).

`reference_early_exit_greedy` recomputes the whole sequence for every token, with the
same rule written naively: a full forward over the prefix (every earlier position has all
its layers, which the engine's deferred rows guarantee) and the exit test on the last
position. Tests compare the engine against it.

`early_exit_forward` is the same rule teacher-forced on given text, in one pass: the
logits the early-exit decoder would use at every position (exit layer's where it exits,
the last layer's where not). Its cross-entropy is the honest validation loss of
early-exit decoding.

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

__all__ = ["EarlyExitObjective", "early_exit_forward", "exit_logits", "reference_early_exit_greedy"]


def exit_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Shared head on an intermediate hidden state: (..., d) -> (..., V)."""
    return model.lm_head(model.model.norm(hidden))


class EarlyExitObjective:
    """loss = LM loss (last layer) + MoE aux + exit_weight * mean_l (l / L) * LM loss(exit after layer l).

    batch = (input_ids, labels), as `CausalLMObjective`. Reports "exit_loss" (the weighted
    intermediate term) besides "lm_loss" and "aux_loss". `exit_layers` restricts the
    intermediate losses to the layers the engine will try (its `EngineConfig.exit_layers`);
    None trains every intermediate layer. Fewer exits also mean fewer LM-head passes per step.
    """

    def __init__(self, exit_weight: float = 1.0, exit_layers: tuple[int, ...] | None = None) -> None:
        if exit_weight < 0:
            raise ValueError(f"exit_weight must be >= 0, got {exit_weight}")
        if exit_layers is not None and (not exit_layers or min(exit_layers) < 1):
            raise ValueError(f"exit_layers must be non-empty layer counts >= 1 (e.g. (2, 4)), got {exit_layers}; "
                             f"use None for every intermediate layer")
        self.exit_weight = exit_weight
        self.exit_layers = tuple(sorted(set(exit_layers))) if exit_layers is not None else None

    def __call__(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        input_ids, labels = batch
        out = model(input_ids, output_hidden_states=True)
        lm = lm_loss(out.logits, labels)
        aux = out.aux_loss if out.aux_loss is not None else torch.zeros((), device=lm.device)
        hs = out.hidden_states  # input of each block + final (before norm): hs[l] = after l layers
        L = len(hs) - 1
        if self.exit_layers is not None and max(self.exit_layers) >= L:
            raise ValueError(f"exit_layers {self.exit_layers} must be < num_hidden_layers ({L}); "
                             f"the last layer is the full model, trained by the LM loss already")
        layers = self.exit_layers if self.exit_layers is not None else range(1, L)
        exits = [(l / L) * lm_loss(exit_logits(model, hs[l]), labels) for l in layers]
        ex = torch.stack(exits).mean() if exits else torch.zeros((), device=lm.device)
        return {"loss": lm + aux + self.exit_weight * ex, "lm_loss": lm.detach(), "aux_loss": aux.detach(),
                "exit_loss": ex.detach()}

    def __repr__(self) -> str:
        return f"EarlyExitObjective(exit_weight={self.exit_weight}, exit_layers={self.exit_layers})"


@torch.no_grad()
def reference_early_exit_greedy(model: nn.Module, prompt: list[int], max_tokens: int, threshold: float,
                                exit_layers: tuple[int, ...], max_run: int | None = None) -> tuple[list[int], list[int]]:
    """Greedy decoding with early exit, recomputing the full sequence each token (O(n^2), tests only).

    Every earlier position runs every layer (the engine's deferred rows give them exactly
    that); the new token comes from the first exit layer whose top probability reaches the
    threshold, else from the last layer. The first token comes from the full model (prefill
    never exits, as in the engine), and so does every token after `max_run` exits in a row
    (the engine's `max_deferred`). Returns (tokens, exit layer of each token).
    """
    bb = model.model
    n_layers = len(bb.layers)
    tokens, out, out_exits, run = list(prompt), [], [], 0
    for step in range(max_tokens):
        hs = model(torch.tensor([tokens]), output_hidden_states=True).hidden_states  # hs[l]: after l layers
        logits, last_exit = None, n_layers
        for e in sorted(exit_layers):
            if step > 0 and threshold < 1.0 and 1 <= e < n_layers and (max_run is None or run < max_run):
                lg = exit_logits(model, hs[e][0, -1])
                if float(lg.float().softmax(-1).max()) >= threshold:
                    logits, last_exit = lg, e
                    break
        if logits is None:
            logits = model.lm_head(bb.norm(hs[-1][0, -1]))
        tok = int(logits.argmax())
        run = run + 1 if last_exit < n_layers else 0
        out.append(tok)
        out_exits.append(last_exit)
        tokens.append(tok)
    return out, out_exits


@torch.no_grad()
def early_exit_forward(model: nn.Module, input_ids: torch.Tensor, threshold: float, exit_layers: tuple[int, ...],
                       prompt_len: int = 1, max_run: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced early exit: (logits (B, T, V) the decoder would sample from, exit layer (B, T)).

    Positions < `prompt_len` are prefill and never exit (the engine exits in decode steps
    only). A position that exits after layer e takes `exit_logits` there; it still runs the
    layers above for the positions after it (the engine's deferred rows), so every K/V is
    the full model's. Whether position t exits at layer l depends only on layers < l of
    positions <= t, so one layer-parallel pass is exact; `max_run` (the engine's
    `max_deferred`) then sends every position after that many exits in a row to full depth.
    threshold >= 1.0 gives the full model's logits.
    """
    bb = model.model
    n_layers = len(bb.layers)
    B, T = input_ids.shape
    hs = model(input_ids, output_hidden_states=True).hidden_states  # hs[l]: after l layers
    final = model.lm_head(bb.norm(hs[-1]))
    exit_at = torch.full((B, T), n_layers, dtype=torch.long, device=input_ids.device)
    if threshold >= 1.0:
        return final, exit_at
    may_exit = (torch.arange(T, device=input_ids.device) >= prompt_len)[None].expand(B, T)
    out = final
    for e in sorted(set(exit_layers)):  # the first exit layer that is confident wins
        if not 1 <= e < n_layers:
            continue
        lg = exit_logits(model, hs[e])
        take = (lg.float().softmax(-1).amax(-1) >= threshold) & may_exit & (exit_at == n_layers)
        exit_at[take] = e
        out = torch.where(take[..., None], lg, out)
    if max_run is not None:  # runs of exits longer than max_run: back to full depth
        back = []
        for row in (exit_at < n_layers).tolist():
            run, flags = 0, []
            for exited in row:
                flags.append(exited and run >= max_run)
                run = run + 1 if exited and run < max_run else 0
            back.append(flags)
        back = torch.tensor(back, device=input_ids.device)
        exit_at[back] = n_layers
        out = torch.where(back[..., None], final, out)
    return out, exit_at
