"""AdamW with nanoGPT-style weight-decay groups and a warmup + cosine schedule.

Decay applies to every trainable parameter with >= 2 dimensions (linear weights,
embeddings, the position table, router weights); 1-D parameters (norm gains, biases)
are not decayed: shrinking a norm gain towards 0 only fights the normalisation.

The schedule multiplies the peak lr by:

    step < warmup:       step / warmup                              (0 -> 1)
    warmup <= step:      r + (1 - r) * 0.5 * (1 + cos(pi * p))      (1 -> r)
                         p = min(1, (step - warmup) / (max_steps - warmup)), r = min_lr_ratio

Example:
    >>> cfg = TrainConfig(warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    >>> [round(lr_lambda(s, cfg), 3) for s in (0, 5, 10, 60, 110, 500)]
    [0.0, 0.5, 1.0, 0.55, 0.1, 0.1]
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from .config import TrainConfig

__all__ = ["param_groups", "build_optimizer", "lr_lambda", "build_scheduler"]

log = logging.getLogger(__name__)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: >=2-D trainable params decayed, the rest not. Frozen params are
    skipped (LoRA freezes the backbone); tied params appear once."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():  # named_parameters() already de-duplicates tied weights
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters (all have requires_grad=False); "
                         "unfreeze some parameters or attach a LoRA adapter before training")
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over `param_groups`; the fused kernel when every parameter lives on a device
    that has one (CUDA, CPU, ...), else torch's default (foreach on accelerators)."""
    groups = param_groups(model, cfg.weight_decay)
    params = [p for g in groups for p in g["params"]]
    fused = _fused_available(params)
    n_decay = sum(p.numel() for p in groups[0]["params"])
    n_plain = sum(p.numel() for p in groups[1]["params"])
    log.debug("AdamW: %d decayed params in %d tensors, %d not decayed in %d tensors, fused=%s",
              n_decay, len(groups[0]["params"]), n_plain, len(groups[1]["params"]), fused)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                             fused=fused or None)


def _fused_available(params: list[torch.Tensor]) -> bool:
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices
        supported = set(_get_fused_kernels_supported_devices())
    except ImportError:  # private helper moved: fall back to the always-safe default
        return False
    return all(p.device.type in supported and p.is_floating_point() for p in params)


def lr_lambda(step: int, cfg: TrainConfig) -> float:
    """lr multiplier at optimizer step `step` (0-based): linear warmup, then cosine to the floor."""
    if step < cfg.warmup_steps:
        return step / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> LambdaLR:
    """LambdaLR over `lr_lambda`. The lambda is a plain closure, so the scheduler's state
    dict holds only numbers (it loads with `weights_only=True`) and a resumed run may
    change `max_steps` to extend the schedule."""

    def schedule(step: int) -> float:
        return lr_lambda(step, cfg)

    return LambdaLR(optimizer, schedule)
