"""Distributed training on PyTorch's own engine: the strategy registry, the process group,
each rank's data, sharded checkpoints and the torchrun launcher.

Strategies (`autoglm train --strategy NAME`, or `dist.strategy` in a config):

    single   one process, one device (`autoglm.training.SingleDevice`)
    ddp      DistributedDataParallel                    (data_parallel.py)
    fsdp     FSDP2 `fully_shard` per block, ZeRO-3       (data_parallel.py)
    zero1    ZeroRedundancyOptimizer over DDP           (data_parallel.py)
    tp/pp/ep tensor, pipeline, expert parallelism       (tensor.py, pipeline.py, expert.py)

Registering a strategy: subclass `autoglm.training.Strategy` (for a process group,
`autoglm.distributed.data_parallel.ProcessGroupStrategy`), give it a class attribute
`name`, make its constructor accept `device=None, backend="auto", timeout_s=600.0` plus
its own keyword options, and decorate it:

    from autoglm.distributed import register_strategy

    @register_strategy
    class TensorParallel(ProcessGroupStrategy):
        name = "tp"
        def __init__(self, device=None, backend="auto", timeout_s=600.0, tp_size=None): ...

Modules `tensor.py`, `pipeline.py` and `expert.py` of this package are imported when the
registry is first read, so their decorators run; a strategy defined elsewhere is
registered by importing its module. `make_strategy(name, **opts)` builds one;
`init_distributed()` joins torchrun's process group (nccl on GPUs, gloo on CPU, with a
collective timeout). `autoglm consolidate RUN --out DIR` turns a
distributed checkpoint into one safetensors model directory (`consolidate.py`).

Example:
    >>> strategy_names()
    ['ddp', 'ep', 'fsdp', 'pp', 'single', 'tp', 'zero1']
    >>> make_strategy("single", device="cpu")
    SingleDevice(device='cpu', world_size=1)
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

from ..training.strategy import SingleDevice, Strategy
from .runtime import init_distributed, launched_by_torchrun

__all__ = ["STRATEGIES", "register_strategy", "make_strategy", "strategy_names", "init_distributed",
           "launched_by_torchrun"]

STRATEGIES: dict[str, type[Strategy]] = {}

# modules of this package that register strategies; imported on first use of the registry
_STRATEGY_MODULES = ("data_parallel", "tensor", "pipeline", "expert")
_loaded = [False]


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: add `cls` to STRATEGIES under `cls.name` (a second class with the
    same name is an error)."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls.__name__} needs a class attribute `name` (the --strategy value) to be registered")
    if name in STRATEGIES and STRATEGIES[name] is not cls:
        raise ValueError(f"strategy {name!r} is already registered by {STRATEGIES[name].__qualname__}")
    STRATEGIES[name] = cls
    return cls


def _load_builtin() -> None:
    if _loaded[0]:
        return
    _loaded[0] = True
    for mod in _STRATEGY_MODULES:
        if importlib.util.find_spec(f"{__name__}.{mod}") is not None:
            importlib.import_module(f"{__name__}.{mod}")


def strategy_names() -> list[str]:
    """Registered strategy names, sorted."""
    _load_builtin()
    return sorted(STRATEGIES)


def make_strategy(name: str, **opts: Any) -> Strategy:
    """Build the registered strategy `name` with keyword options (device, backend,
    timeout_s, and the strategy's own)."""
    names = strategy_names()
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(names)}")
    return STRATEGIES[name](**opts)


register_strategy(SingleDevice)
