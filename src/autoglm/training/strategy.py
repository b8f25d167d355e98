"""Where and how a model trains: device placement, backward, cross-rank reductions.

The loop talks only to a `Strategy`, never to `torch.distributed` directly. `SingleDevice`
(one process, one device) lives here; the multi-process strategies (ddp, fsdp, zero1, and
tensor / pipeline / expert parallelism) live in `autoglm.distributed` and are looked up by
name in its registry (`autoglm.distributed.make_strategy`). The interface:

* `check(model_config, train_cfg)` rejects a configuration the strategy cannot run, before
  any model is built (a batch that does not split over the ranks, a model it cannot shard);
* `setup(model)` places (wraps, shards) the model; `configure(precision)` tells it the
  resolved precision (fp16 gets a `torch.amp.GradScaler` on CUDA);
* `build_optimizer(model, cfg)` builds AdamW (ZeRO-1 partitions it) and `optimizer_step`
  steps it (through the grad scaler under fp16);
* `backward(loss)` / `no_sync(model, sync)` cover gradient accumulation (`sync` is True on
  the last micro-batch of a step, where a data-parallel strategy all-reduces);
* `reduce_mean(t)` averages a metric over ranks (identity on one device);
* `is_main` gates logging, metrics files and checkpoint writes; `barrier()` lines ranks up;
  `data_parallel_rank` / `data_parallel_size` say which slice of each global batch a rank reads;
* `save_checkpoint` / `load_checkpoint` write and read a checkpoint directory (one process:
  safetensors + optimizer.pt; many: `torch.distributed.checkpoint` shards);
* `unwrap(model)` recovers the plain module (strips torch.compile and
  DistributedDataParallel wrappers); `export_model(model)` gives the main process a plain,
  unsharded model to save as the run's final weights (None on the other ranks).

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
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import load_checkpoint, save_checkpoint
from .config import PRECISIONS, TrainConfig
from .optim import build_optimizer

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
    """bf16 autocast on `device` for "bf16" (and "auto" where it resolves to bf16), fp16
    autocast for "fp16" (the strategy adds a grad scaler); a no-op for fp32. Weights and
    optimizer state stay fp32 either way."""
    device = torch.device(device)
    resolved = resolve_precision(precision, device)
    if resolved == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if resolved == "fp16":
        return torch.autocast(device_type=device.type, dtype=torch.float16)
    return contextlib.nullcontext()


class Strategy(abc.ABC):
    """How the loop reaches devices. Subclasses define the topology, placement and
    collectives; gradient handling below is shared."""

    name = "single"  # the registry name (autoglm.distributed.STRATEGIES)
    device: torch.device
    precision: str = "fp32"
    grad_scaler: Any = None  # torch.amp.GradScaler under fp16 on CUDA
    optimizer: Any = None  # what build_optimizer returned (the grad scaler unscales it)

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

    @property
    def data_parallel_rank(self) -> int:
        """Which slice of every global batch this rank reads (tensor / pipeline parallel
        strategies give the ranks of one model replica the same slice)."""
        return self.rank

    @property
    def data_parallel_size(self) -> int:
        """Into how many slices every global batch is split."""
        return self.world_size

    def check(self, model_config: Any, train_cfg: TrainConfig) -> None:
        """Raise ValueError (naming the fix) when this strategy cannot run `model_config`
        with `train_cfg`; called before the model is built."""
        if train_cfg.batch_size % self.data_parallel_size:
            raise ValueError(f"batch_size ({train_cfg.batch_size}, the global batch) must be divisible by the "
                             f"{self.data_parallel_size} data-parallel ranks; use a batch size that is a multiple "
                             f"of {self.data_parallel_size} or change --nproc")

    def configure(self, precision: str) -> None:
        """Called by the Trainer with the resolved precision before training."""
        if precision not in PRECISIONS or precision == "auto":
            raise ValueError(f"configure needs a resolved precision (fp32, bf16, fp16), got {precision!r}")
        if precision == "fp16" and self.device.type != "cuda":
            raise ValueError(f"precision fp16 needs a CUDA device (its grad scaler guards fp16 gradients), this "
                             f"strategy runs on {self.device}; use precision bf16 or fp32")
        self.precision = precision
        self.grad_scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None

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

    def export_model(self, model: nn.Module) -> nn.Module | None:
        """The plain, unsharded model for the run's final weights, on the main process; None
        on the others. Every rank must call it (sharded strategies gather here)."""
        return self.unwrap(model) if self.is_main else None

    # --------------------------------------------------------------- optimizer
    def build_optimizer(self, model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
        self.optimizer = build_optimizer(model, cfg)
        return self.optimizer

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.grad_scaler is not None:
            self.grad_scaler.step(optimizer)
            self.grad_scaler.update()
        else:
            optimizer.step()

    # --------------------------------------------------------------- gradients
    def backward(self, loss: torch.Tensor) -> None:
        if self.grad_scaler is not None:
            loss = self.grad_scaler.scale(loss)
        loss.backward()

    @contextlib.contextmanager
    def no_sync(self, model: nn.Module, sync: bool) -> Iterator[None]:
        """Context for one micro-batch; `sync` is True on the last one of a step."""
        yield

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """Clip the global grad norm to `max_norm` (0 = only measure it); returns the norm
        before clipping, as a tensor (no device sync)."""
        if self.grad_scaler is not None and self.optimizer is not None:
            self.grad_scaler.unscale_(self.optimizer)
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

    # ------------------------------------------------------------- checkpoints
    def save_checkpoint(self, root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                        scheduler: Any, state: dict[str, Any], keep: int | None = None) -> Path:
        """Write checkpoint `root/step-NNNNNN` atomically (every rank calls this); returns its path."""
        path = root / f"step-{step:06d}"
        if self.is_main:
            path = save_checkpoint(root, step, self.unwrap(model), optimizer, scheduler, state, keep=keep)
        self.barrier()
        return path

    def load_checkpoint(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                        scheduler: Any) -> dict[str, Any]:
        """Load a checkpoint written by any strategy; returns the trainer state."""
        from ..distributed.checkpoint import is_distributed_checkpoint, load_distributed_checkpoint

        if is_distributed_checkpoint(path):
            return load_distributed_checkpoint(self, path, model, optimizer, scheduler)
        return load_checkpoint(path, self.unwrap(model), optimizer, scheduler)

    # ----------------------------------------------------------------- helpers
    def autocast(self, precision: str) -> contextlib.AbstractContextManager:
        return autocast_context(precision, self.device)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(device={str(self.device)!r}, world_size={self.world_size})"


class SingleDevice(Strategy):
    """One process, one device (the default): CUDA when available, else CPU."""

    def __init__(self, device: torch.device | str | None = None, backend: str | None = None,
                 timeout_s: float | None = None) -> None:
        # backend / timeout_s: the process-group options make_strategy passes to every
        # strategy; one process has no process group, so they mean nothing here.
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
