"""Data-parallel strategies on PyTorch's own engine: `ddp`, `fsdp` (FSDP2, ZeRO-3) and `zero1`.

Every rank holds (a shard of) the same model and reads its own slice of each global batch
(`autoglm.distributed.data`); gradients are averaged across ranks, so a step computes what
one process computes on the whole global batch.

* `ddp`: `DistributedDataParallel`; `no_sync` skips the all-reduce on all but the last
  micro-batch of a gradient-accumulation step. A Mixture-of-Experts model runs with
  `find_unused_parameters=True`: an expert that no token of a rank's micro-batch chose gets
  no gradient there, which plain DDP reports as an error at the next step; with it, that
  rank contributes zeros to the expert's average (what one process computes on the whole
  batch), and an expert no rank used keeps no gradient, as in one process.
* `fsdp`: FSDP2 `fully_shard` on every block of the model's `layers` and then on the root:
  parameters, gradients and AdamW state are sharded over the ranks (ZeRO-3); parameters are
  all-gathered per block for forward and backward. `param_dtype="bf16"` computes in bf16
  with fp32 master weights, `reduce_dtype` is the dtype gradients are reduce-scattered in.
* `zero1`: DDP for gradients plus `ZeroRedundancyOptimizer`: each rank keeps the AdamW state
  of its own partition of the parameters and broadcasts them after its step.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..training.checkpoint import CheckpointError, load_checkpoint
from ..training.config import TrainConfig
from ..training.optim import param_groups
from ..training.strategy import Strategy
from .runtime import init_distributed

__all__ = ["ProcessGroupStrategy", "DDPStrategy", "FSDPStrategy", "Zero1Strategy", "has_experts", "model_blocks"]

log = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
WAIT_TIMEOUT_S = 24 * 3600.0  # barrier(): how long ranks wait for one rank's solo work


def _find(model: nn.Module, cls: type) -> nn.Module | None:
    """`model` or the module inside its torch.compile wrapper, if it is a `cls`."""
    model = getattr(model, "_orig_mod", model)
    return model if isinstance(model, cls) else None


def has_experts(model: nn.Module) -> bool:
    """True when `model` holds a Mixture-of-Experts layer (whose experts may get no tokens)."""
    from ..modules.moe import MoEFeedForward

    return any(isinstance(m, MoEFeedForward) for m in model.modules())


def model_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks FSDP shards one by one: the children of every `nn.ModuleList`
    named `layers` (the Open-AutoGLM backbone's decoder blocks)."""
    blocks: list[nn.Module] = []
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and name.rsplit(".", 1)[-1] == "layers":
            blocks.extend(m)
    return blocks


class ProcessGroupStrategy(Strategy):
    """One process per device in torchrun's default process group (nccl on GPUs, gloo on CPU)."""

    name = "process-group"

    def __init__(self, device: torch.device | str | None = None, backend: str = "auto",
                 timeout_s: float = 600.0) -> None:
        self.env, self.device = init_distributed(backend, timeout_s, None if device is None else str(device))
        self.timeout_s = timeout_s
        self.backend = dist.get_backend()
        # where ranks wait for one rank's solo work (rank 0 preparing the corpus, finishing a
        # checkpoint's files), the collective timeout is not a hang detector but a false alarm:
        # those waits run in a gloo group of their own with a long timeout. A crashed rank still
        # ends them at once (torchrun stops the others; gloo sees the closed connection).
        self.wait_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(
            seconds=max(timeout_s, WAIT_TIMEOUT_S)))

    @property
    def rank(self) -> int:
        return dist.get_rank()

    @property
    def world_size(self) -> int:
        return dist.get_world_size()

    def reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)  # gloo has no AVG
        return out / self.world_size

    def barrier(self) -> None:
        """Wait until every rank gets here, for up to WAIT_TIMEOUT_S (not the collective
        timeout): the others may be waiting for rank 0 to tokenize a corpus or write files."""
        dist.barrier(group=self.wait_group)

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """`obj` of rank `src` on every rank (a small picklable object, through the wait group)."""
        box = [obj]
        dist.broadcast_object_list(box, src=src, group=self.wait_group)
        return box[0]

    def close(self) -> None:
        """Leave the process group (the end of a run)."""
        if dist.is_initialized():
            dist.destroy_process_group()

    @contextlib.contextmanager
    def collective_errors(self) -> Iterator[None]:
        """Turn a failed or timed-out collective (another rank crashed or hangs) into one clear
        error that says what to look for."""
        try:
            yield
        except (dist.DistError, RuntimeError) as e:
            text = str(e)
            if isinstance(e, dist.DistError) or any(k in text for k in ("gloo", "NCCL", "nccl", "Timed out",
                                                                        "timed out", "Connection closed",
                                                                        "Connection reset")):
                raise RuntimeError(
                    f"rank {self.rank}/{self.world_size}: a collective ({self.backend}) failed or timed out after "
                    f"at most {self.timeout_s:.0f} s: another rank probably crashed or was killed; see that "
                    f"rank's error above, fix it, then resume with --resume (the last complete checkpoint is "
                    f"kept). Cause: {type(e).__name__}: {text.splitlines()[0] if text else ''}") from e
            raise

    # ------------------------------------------------------------- checkpoints
    def save_checkpoint(self, root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                        scheduler: Any, state: dict[str, Any], keep: int | None = None) -> Path:
        from .checkpoint import save_distributed_checkpoint

        return save_distributed_checkpoint(self, root, step, model, optimizer, scheduler,
                                           {**state, "strategy": self.name}, keep=keep)

    def load_checkpoint(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                        scheduler: Any) -> dict[str, Any]:
        from .checkpoint import is_distributed_checkpoint, load_distributed_checkpoint

        if is_distributed_checkpoint(path):
            return load_distributed_checkpoint(self, path, model, optimizer, scheduler)
        return self._load_single_checkpoint(path, model, optimizer, scheduler)

    def _load_single_checkpoint(self, path: Path, model: nn.Module, optimizer: Any, scheduler: Any) -> dict[str, Any]:
        raise CheckpointError(f"{path} is a one-process checkpoint (safetensors + optimizer.pt); strategy "
                              f"{self.name!r} resumes only torch.distributed.checkpoint checkpoints. Resume it with "
                              f"--strategy ddp (which reads it on every rank) or in one process, or start a new run "
                              f"with --init-from RUN")


class OneReplica:
    """Mixin for strategies whose ranks all hold parts of one model replica (tensor, pipeline
    parallel): every rank reads the whole global batch."""

    @property
    def data_parallel_rank(self) -> int:
        return 0

    @property
    def data_parallel_size(self) -> int:
        return 1


class DDPStrategy(ProcessGroupStrategy):
    """DistributedDataParallel: a full replica per rank, gradients all-reduced in buckets."""

    name = "ddp"

    def setup(self, model: nn.Module) -> nn.Module:
        self.barrier()  # the first timed collective follows: wait for ranks still preparing data
        model = model.to(self.device)
        ids = [self.device.index] if self.device.type == "cuda" else None
        # gradients live in the all-reduce buckets themselves: no second gradient-sized copy;
        # MoE: experts a micro-batch did not route to are unused on that rank (see the module doc)
        return DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True,
                                       find_unused_parameters=has_experts(model))

    @contextlib.contextmanager
    def no_sync(self, model: nn.Module, sync: bool) -> Iterator[None]:
        ddp = _find(model, DistributedDataParallel)
        if sync or ddp is None:
            yield
        else:
            with ddp.no_sync():
                yield

    def _load_single_checkpoint(self, path: Path, model: nn.Module, optimizer: Any, scheduler: Any) -> dict[str, Any]:
        # every rank reads the same full files into its full replica
        return load_checkpoint(path, self.unwrap(model), optimizer, scheduler)


class Zero1Strategy(DDPStrategy):
    """DDP gradients + ZeroRedundancyOptimizer: AdamW state partitioned over the ranks (ZeRO-1)."""

    name = "zero1"

    def build_optimizer(self, model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        groups = [g for g in param_groups(model, cfg.weight_decay) if g["params"]]
        self.optimizer = ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW, lr=cfg.lr,
                                                 betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
        return self.optimizer

    def _load_single_checkpoint(self, path: Path, model: nn.Module, optimizer: Any, scheduler: Any) -> dict[str, Any]:
        return ProcessGroupStrategy._load_single_checkpoint(self, path, model, optimizer, scheduler)


class FSDPStrategy(ProcessGroupStrategy):
    """FSDP2 (`fully_shard`) per block: parameters, gradients and optimizer state sharded (ZeRO-3)."""

    name = "fsdp"

    def __init__(self, device: torch.device | str | None = None, backend: str = "auto", timeout_s: float = 600.0,
                 param_dtype: str = "fp32", reduce_dtype: str = "fp32", reshard_after_forward: bool = True) -> None:
        for field, value in (("param_dtype", param_dtype), ("reduce_dtype", reduce_dtype)):
            if value not in _DTYPES:
                raise ValueError(f"{field} must be one of {tuple(_DTYPES)}, got {value!r}")
        super().__init__(device, backend, timeout_s)
        self.param_dtype, self.reduce_dtype = param_dtype, reduce_dtype
        self.reshard_after_forward = reshard_after_forward

    def check(self, model_config: Any, train_cfg: TrainConfig) -> None:
        super().check(model_config, train_cfg)
        if getattr(model_config, "num_hidden_layers", 1) < 1:
            raise ValueError("fsdp shards the model block by block and this model has no layers; use --strategy ddp")

    def setup(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        self.barrier()  # the first timed collective follows: wait for ranks still preparing data

        blocks = model_blocks(model)
        if not blocks:
            raise ValueError(f"fsdp shards per block but {type(model).__name__} has no `layers` ModuleList; use "
                             f"--strategy ddp or zero1, or give the model its blocks as a ModuleList named `layers`")
        model = model.to(self.device)
        mp = MixedPrecisionPolicy(param_dtype=_DTYPES[self.param_dtype], reduce_dtype=_DTYPES[self.reduce_dtype])
        for block in blocks:
            fully_shard(block, mp_policy=mp, reshard_after_forward=self.reshard_after_forward)
        fully_shard(model, mp_policy=mp, reshard_after_forward=self.reshard_after_forward)
        return model

    @contextlib.contextmanager
    def no_sync(self, model: nn.Module, sync: bool) -> Iterator[None]:
        root = getattr(model, "_orig_mod", model)
        root.set_requires_gradient_sync(sync)
        try:
            yield
        finally:
            root.set_requires_gradient_sync(True)

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """The global norm of the sharded gradients: local squared sums, all-reduced."""
        if self.grad_scaler is not None and self.optimizer is not None:
            self.grad_scaler.unscale_(self.optimizer)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
        sq = torch.zeros((), device=self.device, dtype=torch.float32)
        for g in local:
            sq += g.detach().float().pow(2).sum()
        dist.all_reduce(sq, op=dist.ReduceOp.SUM)
        norm = sq.sqrt()
        if max_norm > 0:
            coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            for g in local:
                g.detach().mul_(coef.to(g.dtype))
        return norm

    def export_model(self, model: nn.Module) -> nn.Module | None:
        """All-gather the full weights to the main process and load them into a plain,
        unsharded copy of the model (built from its class and config)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        from torch.distributed.fsdp import FSDPModule

        model = getattr(model, "_orig_mod", model)
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.is_main:
            return None
        cls = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
        if not hasattr(model, "config"):
            raise TypeError(f"cannot rebuild an unsharded {cls.__name__}: it has no `config` to construct it from")
        plain = cls(model.config)
        missing, unexpected = plain.load_state_dict(full, strict=False)
        tied = {k for k in missing if k.endswith("lm_head.weight")} if getattr(model.config, "tie_word_embeddings",
                                                                               False) else set()
        if set(missing) - tied or unexpected:
            raise RuntimeError(f"gathered weights do not fit {cls.__name__}: missing {sorted(set(missing) - tied)[:5]}, "
                               f"unexpected {sorted(unexpected)[:5]}")
        return plain


def _register() -> None:
    from . import register_strategy

    for cls in (DDPStrategy, FSDPStrategy, Zero1Strategy):
        register_strategy(cls)


_register()
