"""Where and how a model trains: device placement, backward, cross-rank reductions.

The loop talks only to a `Strategy`, never to `torch.distributed` directly. Only
`SingleDevice` (one process, one device) exists today; the interface is what a
multi-process strategy would implement:

* `setup(model)` places (and a multi-process strategy would wrap or shard) the model;
* `backward(loss)` / `no_sync(model, sync)` cover gradient accumulation (`sync` is True on
  the last micro-batch of a step, where a data-parallel strategy would all-reduce);
* `reduce_mean(t)` averages a metric over ranks (identity on one device);
* `is_main` gates logging, metrics files and checkpoint writes; `barrier()` lines ranks up;
* `unwrap(model)` recovers the plain module for saving (strips torch.compile and
  DistributedDataParallel wrappers).

Example:
    >>> import torch
    >>> s = SingleDevice("cpu")
    >>> s.is_main, s.world_size, s.reduce_mean(torch.tensor(2.0)).item()
    (True, 1, 2.0)
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from .config import PRECISIONS

__all__ = ["Strategy", "SingleDevice", "autocast_context", "resolve_precision"]


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """"auto" -> "bf16" on a CUDA device that supports it, else "fp32"; others unchanged."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def autocast_context(precision: str, device: torch.device | str = "cpu") -> contextlib.AbstractContextManager:
    """bf16 autocast on `device` for "bf16" (and "auto" where it resolves to bf16); a no-op
    for fp32. Weights and optimizer state stay fp32 either way (no grad scaler needed)."""
    device = torch.device(device)
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Strategy(abc.ABC):
    """How the loop reaches devices. Subclasses define the topology, placement and
    collectives; gradient handling below is shared."""

    device: torch.device

    # ------------------------------------------------------------------ topology
    @property
    @abc.abstractmethod
    def rank(self) -> int: ...

    @property
    @abc.abstractmethod
    def world_size(self) -> int: ...

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------- model
    @abc.abstractmethod
    def setup(self, model: nn.Module) -> nn.Module:
        """Place (wrap, shard) the model; returns the module the loop should call."""

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The plain model inside torch.compile / DistributedDataParallel wrappers (what gets saved)."""
        while True:
            if hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
                model = model._orig_mod
            elif isinstance(model, nn.parallel.DistributedDataParallel):
                model = model.module
            else:
                return model

    # --------------------------------------------------------------- gradients
    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    @contextlib.contextmanager
    def no_sync(self, model: nn.Module, sync: bool) -> Iterator[None]:
        """Context for one micro-batch; `sync` is True on the last one of a step."""
        yield

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """Clip the global grad norm to `max_norm` (0 = only measure it); returns the norm
        before clipping, as a tensor (no device sync)."""
        params = [p for p in model.parameters() if p.grad is not None]
        if not params:
            return torch.zeros((), device=self.device)
        return nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))

    # -------------------------------------------------------------- collectives
    @abc.abstractmethod
    def reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """Mean of `tensor` over ranks (every rank gets the result)."""

    @abc.abstractmethod
    def barrier(self) -> None:
        """Wait until every rank reaches this point."""

    # ----------------------------------------------------------------- helpers
    def autocast(self, precision: str) -> contextlib.AbstractContextManager:
        return autocast_context(precision, self.device)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(device={str(self.device)!r}, world_size={self.world_size})"


class SingleDevice(Strategy):
    """One process, one device (the default): CUDA when available, else CPU."""

    def __init__(self, device: torch.device | str | None = None) -> None:
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)

    @property
    def rank(self) -> int:
        return 0

    @property
    def world_size(self) -> int:
        return 1

    def setup(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    def reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def barrier(self) -> None:
        return None
