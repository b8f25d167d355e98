"""Training objectives: what a step computes from (model, batch).

An objective is any callable `(model, batch) -> dict[str, Tensor]` whose "loss" entry is
the scalar that is back-propagated; every other entry is a scalar metric that the loop
averages over micro-batches and logs (detached). The loop never looks inside a batch:
it moves tensors to the device and hands the batch to the objective, so distillation,
LoRA, graph and multimodal objectives plug in without touching the loop.

`EarlyExitObjective` (LayerSkip-style): besides the next-token loss at the last layer,
every intermediate layer's output goes through the *shared* final norm and LM head
(`model.exit_logits`) and gets its own next-token loss, weighted `exit_weight * (l / L)`
(deeper exits count more). The engine's runner can then stop a decode step at the first
layer whose top probability reaches a threshold (`autoglm.inference.runner`). With
`target="model"` the exits learn the last layer's own (detached) next-token distribution
instead of the labels (self-distillation, a soft-target cross-entropy): what an exit that
drafts for self-speculative decoding should predict is the full model's token, not the
text's, since only drafts equal to the full model's are kept.

Example:
    >>> import torch
    >>> from autoglm import OpenAutoGLMConfig, OpenAutoGLMForCausalLM
    >>> model = OpenAutoGLMForCausalLM(OpenAutoGLMConfig.from_name("tiny"))
    >>> x = torch.randint(0, 512, (2, 8))
    >>> out = CausalLMObjective()(model, (x, x))
    >>> sorted(out)
    ['aux_loss', 'lm_loss', 'loss']
    >>> sorted(EarlyExitObjective()(model, (x, x)))
    ['aux_loss', 'exit_loss', 'lm_loss', 'loss']
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

import torch.nn.functional as F

from ..losses import IGNORE_INDEX, lm_loss

__all__ = ["Objective", "CausalLMObjective", "EarlyExitObjective", "EXIT_TARGETS"]

EXIT_TARGETS = ("labels", "model")


@runtime_checkable
class Objective(Protocol):
    """What the Trainer optimises. An objective may also name what its throughput counts:
    `unit` ("pairs", "nodes"; tokens when absent) and `count(batch) -> int` (the input_ids'
    size when absent); the progress bar and the logged rows then show `<unit>/s`."""

    def __call__(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        """Return {"loss": scalar to back-propagate, **scalar metrics}."""
        ...


class CausalLMObjective:
    """Next-token cross-entropy plus the model's MoE auxiliary loss times `aux_weight`.

    batch = (input_ids, labels), both (B, T) int64, labels aligned with inputs (label t is
    the token after input t; -100 ignored). Reports "lm_loss" and "aux_loss" (0 for a
    dense model, or one whose output has no `aux_loss`) besides "loss" = lm_loss + aux_loss.
    Open-AutoGLM's aux loss is already weighted (aux_weight 1); transformers' Mixtral returns
    its load-balancing loss unweighted (aux_weight = its router_aux_loss_coef,
    `autoglm.baselines.baseline_objective`).
    """

    def __init__(self, aux_weight: float = 1.0) -> None:
        self.aux_weight = aux_weight

    def __call__(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        input_ids, labels = batch
        out = model(input_ids)  # labels are not passed: the HF wrapper would shift them again
        lm = lm_loss(out.logits, labels)
        aux = getattr(out, "aux_loss", None)
        aux = torch.zeros((), device=lm.device) if aux is None else aux * self.aux_weight
        return {"loss": lm + aux, "lm_loss": lm.detach(), "aux_loss": aux.detach()}

    def __repr__(self) -> str:
        return f"CausalLMObjective(aux_weight={self.aux_weight:g})" if self.aux_weight != 1.0 else "CausalLMObjective()"


class EarlyExitObjective:
    """loss = LM loss (last layer) + MoE aux + exit_weight * mean_l (l / L) * LM loss(exit after layer l).

    batch = (input_ids, labels), as `CausalLMObjective`. Reports "exit_loss" (the weighted
    intermediate term) besides "lm_loss" and "aux_loss". `exit_layers` restricts the
    intermediate losses to the layers the engine will try (its `EngineConfig.exit_layers`);
    None trains every intermediate layer. Fewer exits also mean fewer LM-head passes per step.
    """

    def __init__(self, exit_weight: float = 1.0, exit_layers: tuple[int, ...] | None = None,
                 target: str = "labels") -> None:
        if target not in EXIT_TARGETS:
            raise ValueError(f"exit target must be one of {EXIT_TARGETS}, got {target!r}")
        self.target = target
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
        if self.target == "model":  # the full model's distribution at the labelled positions
            keep = labels.reshape(-1) != IGNORE_INDEX
            soft = out.logits.detach().float().reshape(-1, out.logits.shape[-1])[keep].softmax(-1)
            exit_loss = lambda lg: F.cross_entropy(lg.float().reshape(-1, lg.shape[-1])[keep], soft)  # noqa: E731
        else:
            exit_loss = lambda lg: lm_loss(lg, labels)  # noqa: E731
        exits = [(l / L) * exit_loss(model.exit_logits(hs[l])) for l in layers]
        ex = torch.stack(exits).mean() if exits else torch.zeros((), device=lm.device)
        return {"loss": lm + aux + self.exit_weight * ex, "lm_loss": lm.detach(), "aux_loss": aux.detach(),
                "exit_loss": ex.detach()}

    def __repr__(self) -> str:
        return (f"EarlyExitObjective(exit_weight={self.exit_weight}, exit_layers={self.exit_layers}, "
                f"target={self.target!r})")
