"""Training objectives: what a step computes from (model, batch).

An objective is any callable `(model, batch) -> dict[str, Tensor]` whose "loss" entry is
the scalar that is back-propagated; every other entry is a scalar metric that the loop
averages over micro-batches and logs (detached). The loop never looks inside a batch:
it moves tensors to the device and hands the batch to the objective, so distillation,
LoRA, graph and multimodal objectives plug in without touching the loop.

Example:
    >>> import torch
    >>> from autoglm import OpenAutoGLMConfig, OpenAutoGLMForCausalLM
    >>> model = OpenAutoGLMForCausalLM(OpenAutoGLMConfig.from_name("tiny"))
    >>> x = torch.randint(0, 512, (2, 8))
    >>> out = CausalLMObjective()(model, (x, x))
    >>> sorted(out)
    ['aux_loss', 'lm_loss', 'loss']
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from ..losses import lm_loss

__all__ = ["Objective", "CausalLMObjective"]


@runtime_checkable
class Objective(Protocol):
    def __call__(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        """Return {"loss": scalar to back-propagate, **scalar metrics}."""
        ...


class CausalLMObjective:
    """Next-token cross-entropy plus the model's (already weighted) MoE auxiliary loss.

    batch = (input_ids, labels), both (B, T) int64, labels aligned with inputs (label t is
    the token after input t; -100 ignored). Reports "lm_loss" and "aux_loss" (0 for a
    dense model) besides "loss" = lm_loss + aux_loss.
    """

    def __call__(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        input_ids, labels = batch
        out = model(input_ids)  # labels are not passed: the HF wrapper would shift them again
        lm = lm_loss(out.logits, labels)
        aux = out.aux_loss
        if aux is None:
            aux = torch.zeros((), device=lm.device)
        return {"loss": lm + aux, "lm_loss": lm.detach(), "aux_loss": aux.detach()}

    def __repr__(self) -> str:
        return "CausalLMObjective()"
