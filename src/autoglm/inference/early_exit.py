"""Early exit, teacher-forced: the logits the engine's early-exit decoder would use.

The exits are trained with `autoglm.training.EarlyExitObjective` (LayerSkip-style, through
the shared head `model.exit_logits`); at inference the engine's runner stops a decode step
at the first layer whose top probability reaches a threshold (`runner.ModelRunner`), and
runs the skipped layers of that token later as deferred rows, so every K/V is the full
model's.

`early_exit_forward` is the same rule on given text, in one pass: the logits the
early-exit decoder would use at every position (the exit layer's where it exits, the last
layer's where not). Its cross-entropy is the honest held-out loss of early-exit decoding
(benchmarks/early_exit.py); tests compare the engine against it and against a naive
full-recompute decoder.

Example:
    >>> import torch
    >>> from autoglm import OpenAutoGLMConfig, OpenAutoGLMForCausalLM
    >>> model = OpenAutoGLMForCausalLM(OpenAutoGLMConfig.from_name("tiny")).eval()
    >>> x = torch.randint(0, 512, (2, 8))
    >>> logits, exit_at = early_exit_forward(model, x, threshold=1.0, exit_layers=(1,))
    >>> torch.equal(logits, model(x).logits), exit_at.unique().tolist()
    (True, [2])
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["early_exit_forward"]


@torch.no_grad()
def early_exit_forward(model: nn.Module, input_ids: torch.Tensor, threshold: float, exit_layers: tuple[int, ...],
                       prompt_len: int = 1, max_run: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced early exit: (logits (B, T, V) the decoder would sample from, exit layer (B, T)).

    Positions < `prompt_len` are prefill and never exit (the engine exits in decode steps
    only). A position that exits after layer e takes `model.exit_logits` there; it still runs the
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
        lg = model.exit_logits(hs[e])
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
