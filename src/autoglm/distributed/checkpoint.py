"""Sharded checkpoints with `torch.distributed.checkpoint` (DCP), resumable on any world size
and strategy.

Layout of `ckpt_root/step-000123/` written by a multi-process strategy:

    .metadata, __R_0.distcp     DCP: every rank writes its own shards (FSDP: its parameter and
                                AdamW shards; DDP: replicated tensors once; ZeRO-1: each rank its
                                optimizer partition)
    scheduler.pt, rng.pt        LR schedule and RNG state (main process, weights-only torch.save)
    config.json                 the model's config (`autoglm consolidate`
                                builds the model from it to write one safetensors directory)
    trainer_state.json          step, tokens seen, train config, strategy, world size (written last)

Keys are the model's parameter names (`model.<fqn>`, `optim.state.<fqn>.exp_avg`, ...), the
format `torch.distributed.checkpoint.state_dict.get_state_dict` produces, whatever the
strategy: DCP re-shards on load, so a checkpoint written by `fsdp` on 2 ranks resumes under
`ddp`, `zero1`, `fsdp` on any number of ranks, or in one process.

Atomicity: the main process makes a hidden temporary folder and broadcasts its name; every
rank writes into it; `dcp.save` returns only after all ranks' writes are done (a rank that
crashed makes it fail on the others), and only then does the main process add its files,
fsync everything and rename the folder to `step-NNNNNN`, then point `latest` at it. A crash
leaves the previous checkpoint as latest; the next save removes the stale temporary folder.
Multi-node runs need `ckpt_root` on a file system every node sees. The waits of a save (for
the slowest writer, for rank 0's fsync and rename) go through the strategy's `wait_group`,
whose timeout is hours, not `--dist-timeout`: a slow disk is not a dead rank.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict, set_model_state_dict,
                                                     set_state_dict)

from ..atomic import atomic_write_text, fsync_dir, fsync_tree
from ..training.checkpoint import (FORMAT_VERSION, CheckpointError, _advice, _torch_load, capture_rng_state,
                                   list_checkpoints, restore_rng_state)

__all__ = ["is_distributed_checkpoint", "save_distributed_checkpoint", "load_distributed_checkpoint"]

log = logging.getLogger(__name__)

_METADATA = ".metadata"
_STATE = "trainer_state.json"
_SCHEDULER = "scheduler.pt"
_RNG = "rng.pt"
_MODEL_CONFIG = "config.json"


def is_distributed_checkpoint(path: str | Path) -> bool:
    return (Path(path) / _METADATA).is_file()


# ------------------------------------------------------------ ZeRO-1 optimizer
def _is_zero(optimizer: Any) -> bool:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return isinstance(optimizer, ZeroRedundancyOptimizer)


def _plain(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _names(model: nn.Module) -> dict[nn.Parameter, str]:
    return {p: n for n, p in _plain(model).named_parameters()}


def _zero_optim_state(model: nn.Module, optimizer: Any) -> dict[str, Any]:
    """ZeRO-1's optimizer state in get_state_dict's layout: this rank's partition under
    `state` (each rank a different subset of names) and the groups' hyperparameters."""
    names = _names(model)
    state = {names[p]: dict(s) for p, s in optimizer.optim.state.items()}
    groups = []
    for wrapper_group, local_group in zip(optimizer.param_groups, optimizer.optim.param_groups):
        hyper = {k: v for k, v in {**local_group, **wrapper_group}.items() if k != "params"}
        groups.append({**hyper, "params": [names[p] for p in wrapper_group["params"]]})
    return {"state": state, "param_groups": groups}


def _zero_template(model: nn.Module, optimizer: Any) -> dict[str, Any]:
    names = _names(model)
    state = {}
    for group in optimizer.optim.param_groups:
        for p in group["params"]:
            state[names[p]] = {"step": torch.zeros((), dtype=torch.float32), "exp_avg": torch.zeros_like(p),
                               "exp_avg_sq": torch.zeros_like(p)}
    return {"state": state}


def _zero_load(model: nn.Module, optimizer: Any, loaded: dict[str, Any]) -> None:
    by_name = {n: p for n, p in _plain(model).named_parameters()}
    for name, s in loaded["state"].items():
        optimizer.optim.state[by_name[name]] = {k: (v.to(by_name[name].device) if k != "step" else v)
                                                for k, v in s.items()}


def _state_dict(model: nn.Module, optimizer: Any) -> dict[str, Any]:
    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    if _is_zero(optimizer):
        return {"model": get_model_state_dict(model), "optim": _zero_optim_state(model, optimizer)}
    msd, osd = get_state_dict(model, optimizer)
    return {"model": msd, "optim": osd}


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


# ---------------------------------------------------------------------- save
def save_distributed_checkpoint(strategy: Any, root: str | Path, step: int, model: nn.Module, optimizer: Any,
                                scheduler: Any, state: dict[str, Any], keep: int | None = None) -> Path:
    """Every rank calls this; returns `root/step-{step:06d}` once it is complete and latest."""
    root = Path(root)
    name = f"step-{step:06d}"
    final = root / name
    tmp: str | None = None
    if strategy.is_main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".step-*.*-*"):  # left by a run killed mid-save
            shutil.rmtree(stale, ignore_errors=True)
        tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root)
    model = getattr(model, "_orig_mod", model)
    try:
        tmp = strategy.broadcast_object(tmp) if _distributed() else tmp
        # DCP coordinates through the strategy's wait group (long timeout): ranks that wrote
        # fewer shards wait for the slowest writer without tripping the collective timeout
        dcp.save(_state_dict(model, optimizer), checkpoint_id=tmp,
                 process_group=getattr(strategy, "wait_group", None) if _distributed() else None)
        if strategy.is_main:
            tmp_path = Path(tmp)
            torch.save({"scheduler": scheduler.state_dict() if scheduler is not None else None}, tmp_path / _SCHEDULER)
            torch.save(capture_rng_state(), tmp_path / _RNG)
            model_config = getattr(_plain(model), "config", None)
            if hasattr(model_config, "to_json_string"):  # what consolidation builds the model from
                (tmp_path / _MODEL_CONFIG).write_text(model_config.to_json_string())
            full = {**state, "step": step, "format_version": FORMAT_VERSION, "world_size": strategy.world_size,
                    "checkpoint_format": "torch.distributed.checkpoint"}
            (tmp_path / _STATE).write_text(json.dumps(full, indent=2, sort_keys=True))  # written last
            fsync_tree(tmp_path)
            if final.exists():
                aside = Path(tempfile.mkdtemp(prefix=f".{name}.old-", dir=root))
                os.replace(final, aside / "old")
                os.replace(tmp_path, final)
                shutil.rmtree(aside, ignore_errors=True)
            else:
                os.replace(tmp_path, final)
            fsync_dir(root)
            atomic_write_text(root / "latest", name + "\n")
            if keep is not None:
                for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
                    if old.resolve() != final.resolve():
                        shutil.rmtree(old, ignore_errors=True)
            log.info("saved distributed checkpoint %s (%d ranks)", final, strategy.world_size)
    except BaseException:
        if strategy.is_main and tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)  # never leave a half-written step behind
        raise
    strategy.barrier()
    return final


# ---------------------------------------------------------------------- load
def _check_shard_files(path: Path, state: dict[str, Any]) -> None:
    """Every shard file the checkpoint's .metadata names is there and long enough: a rank's
    shards that were lost (a node's local disk, a partial copy) are named, instead of DCP
    failing on the first missing tensor or a model loading with part of its weights."""
    try:
        meta = dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # unreadable .metadata
        raise CheckpointError(f"checkpoint {path}/{_METADATA} cannot be read ({type(e).__name__}: {e}): "
                              f"{_advice()}") from e
    need: dict[str, int] = {}
    for info in (meta.storage_data or {}).values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    missing = sorted(f for f in need if not (path / f).is_file())
    short = sorted(f for f in need if f not in missing and (path / f).stat().st_size < need[f])
    if missing or short:
        what = "; ".join(part for part in (f"missing {', '.join(missing)}" if missing else "",
                                           f"truncated {', '.join(short)}" if short else "") if part)
        raise CheckpointError(f"checkpoint {path} is incomplete ({what}; written by {state.get('world_size')} "
                              f"rank(s), each rank writes its own __<rank>_*.distcp): copy the whole step folder "
                              f"from the storage every rank wrote to (a multi-node run needs a shared file system), "
                              f"or {_advice()}")


def load_distributed_checkpoint(strategy: Any, path: str | Path, model: nn.Module, optimizer: Any = None,
                                scheduler: Any = None, restore_rng: bool = True) -> dict[str, Any]:
    """Load a DCP checkpoint into `model` / `optimizer` (any strategy, any world size, also
    one process without a process group, where `strategy` may be None) and return the
    trainer state. A shard file the checkpoint's metadata names but the folder lacks (or holds
    truncated) is a CheckpointError that names it."""
    path = Path(path)
    try:
        state = json.loads((path / _STATE).read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint {path} has no {_STATE}; it is incomplete: {_advice()}") from e
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {path}/{_STATE} is corrupt ({e}): {_advice()}") from e
    model = getattr(model, "_orig_mod", model)
    if optimizer is not None and _is_zero(optimizer):
        sd: dict[str, Any] = {"model": get_model_state_dict(model), "optim": _zero_template(model, optimizer)}
    else:
        sd = _state_dict(model, optimizer)  # get_state_dict gives a fresh optimizer its (zero) state to fill
    _check_shard_files(path, state)
    no_dist = not _distributed()
    try:
        with warnings.catch_warnings():
            # one process on purpose (no_dist): DCP's "assuming the intent is to load in a single process"
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.load(sd, checkpoint_id=str(path), no_dist=no_dist,
                     process_group=None if no_dist else getattr(strategy, "wait_group", None))
    except (Exception, CheckpointException) as e:  # DCP's CheckpointException (a BaseException) lists each rank's failure
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        cause = lines[-1] if lines else type(e).__name__  # DCP's last line is the first failure's message
        raise CheckpointError(f"checkpoint {path} does not fit this model/optimizer ({cause}); it was written by "
                              f"strategy {state.get('strategy')!r} on {state.get('world_size')} rank(s), probably "
                              f"for another model config. Resume with the model config the run started with, or "
                              f"{_advice()}") from e
    if optimizer is not None and _is_zero(optimizer):
        set_model_state_dict(model, sd["model"])
        _zero_load(model, optimizer, sd["optim"])
    elif optimizer is not None:
        set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    else:
        set_model_state_dict(model, sd["model"])
    if scheduler is not None:
        sched = _torch_load(path / _SCHEDULER).get("scheduler")
        if sched is not None:
            scheduler.load_state_dict(sched)
            if optimizer is not None and _is_zero(optimizer):  # its groups' lr came from no checkpoint
                for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
                    group["lr"] = lr
    if restore_rng and (path / _RNG).exists():
        restore_rng_state(_torch_load(path / _RNG))  # every rank seeded alike, so rank 0's state fits all
    return state
