"""The process group: read torchrun's environment, pick the backend, set a collective timeout.

torchrun (or `autoglm train --nproc N`, which runs torchrun) starts one process per device
and gives each RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. This module is the
one place below the CLI that reads them.

Example (no torchrun variables: one process, no process group):
    >>> launched_by_torchrun({})
    False
    >>> pick_backend("auto", "cpu")
    'gloo'
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistEnv", "launched_by_torchrun", "torchrun_world_size", "torchrun_rank", "read_env", "pick_backend",
           "init_distributed", "BACKENDS"]

log = logging.getLogger(__name__)

BACKENDS = ("auto", "nccl", "gloo")
_REQUIRED = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int


def launched_by_torchrun(env: Mapping[str, str] | None = None) -> bool:
    """True inside a process torchrun started (WORLD_SIZE and RANK are set)."""
    env = os.environ if env is None else env
    return "WORLD_SIZE" in env and "RANK" in env


def torchrun_world_size(env: Mapping[str, str] | None = None) -> int:
    """WORLD_SIZE torchrun set (1 outside torchrun)."""
    env = os.environ if env is None else env
    return int(env.get("WORLD_SIZE", "1"))


def torchrun_rank(env: Mapping[str, str] | None = None) -> int:
    """RANK torchrun set (0 outside torchrun)."""
    env = os.environ if env is None else env
    return int(env.get("RANK", "0"))


def read_env(env: Mapping[str, str] | None = None) -> DistEnv:
    """Rank and world size from torchrun's variables; a clear error when some are missing."""
    env = os.environ if env is None else env
    missing = [k for k in _REQUIRED if k not in env]
    if missing:
        raise RuntimeError(f"a multi-process strategy needs torchrun's environment, but {', '.join(missing)} "
                           f"{'is' if len(missing) == 1 else 'are'} not set; launch with `autoglm train --nproc N "
                           f"--strategy ...` or `torchrun --nproc-per-node N -m autoglm.distributed.worker train ...`")
    world = int(env["WORLD_SIZE"])
    return DistEnv(rank=int(env["RANK"]), world_size=world, local_rank=int(env["LOCAL_RANK"]),
                   local_world_size=int(env.get("LOCAL_WORLD_SIZE", world)))


def pick_backend(backend: str, device: torch.device | str) -> str:
    """"auto" -> nccl for CUDA devices, gloo for CPU; an explicit choice is checked."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    device = torch.device(device)
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ValueError("backend nccl needs CUDA devices, this run is on CPU; use --backend gloo (or auto)")
    return backend


def init_distributed(backend: str = "auto", timeout_s: float = 600.0, device: str | None = None,
                     env: Mapping[str, str] | None = None) -> tuple[DistEnv, torch.device]:
    """Join (or reuse) the default process group torchrun describes.

    Picks this rank's device (cuda:LOCAL_RANK when CUDA is there and `device` is not "cpu"),
    the backend (nccl on GPUs, gloo on CPU) and a collective timeout of `timeout_s` seconds,
    so a rank that died makes the others fail with an error instead of waiting forever.
    Returns the environment and the device.
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    if dist.is_initialized():  # e.g. tests that made the group themselves
        rank, world = dist.get_rank(), dist.get_world_size()
        info = DistEnv(rank, world, int((env or os.environ).get("LOCAL_RANK", rank)), world)
    else:
        info = read_env(env)
    if device is None:
        dev = torch.device("cuda", info.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    else:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", info.local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        chosen = pick_backend(backend, dev)
        dist.init_process_group(chosen, timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=dev if dev.type == "cuda" else None)
        log.info("rank %d/%d joined the %s process group (collective timeout %.0f s, device %s)", info.rank,
                 info.world_size, chosen, timeout_s, dev)
    return info, dev
