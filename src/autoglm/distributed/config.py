"""The `dist` section of a training recipe's config: which strategy, how many processes.

Kept free of torch imports so recipe configs load fast; the strategy name is checked
against the registry (`autoglm.distributed.STRATEGIES`) when the section is built.

Example:
    >>> spec = DistributedSpec(strategy="fsdp", nproc=2)
    >>> spec.strategy, spec.nproc, spec.backend
    ('fsdp', 2, 'auto')
    >>> DistributedSpec(strategy="zero3")
    Traceback (most recent call last):
    ...
    ValueError: unknown strategy 'zero3'; choose one of ddp, ep, fsdp, pp, single, tp, zero1 (registered in autoglm.distributed.STRATEGIES)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from ..settings import setting

__all__ = ["DistributedSpec"]


@dataclass
class DistributedSpec:
    """How training is spread over processes (torchrun) and devices."""

    strategy: str = setting("single", "single (one process), ddp, fsdp (FSDP2, ZeRO-3), zero1 (ZeroRedundancyOptimizer "
                                      "over DDP), or another registered strategy (tp, pp, ep)")
    nproc: int = setting(1, "processes per node (one per device); > 1 makes the command launch torchrun itself")
    nnodes: int = setting(1, "nodes in a multi-node run (each runs the same command with the same --rdzv-endpoint)")
    rdzv_endpoint: str | None = setting(None, "host:port of the rendezvous (c10d) for a multi-node run, e.g. "
                                              "node0:29400; one node needs none")
    rdzv_id: str = setting("autoglm", "rendezvous id: every node of one run passes the same")
    backend: Literal["auto", "nccl", "gloo"] = setting("auto", "collective backend: auto = nccl on GPUs, gloo on CPU")
    timeout_s: float = setting(600.0, "collective timeout (s): a crashed or hung rank fails the run after this "
                                      "instead of hanging it (waits for one rank preparing data or writing a "
                                      "checkpoint are not bound by it)", flag="dist_timeout")
    param_dtype: Literal["fp32", "bf16"] = setting("fp32", "fsdp: dtype of the all-gathered parameters in forward/"
                                                           "backward (fp32 master weights either way)",
                                                   flag="fsdp_param_dtype")
    reduce_dtype: Literal["fp32", "bf16"] = setting("fp32", "fsdp: dtype gradients are reduce-scattered in",
                                                    flag="fsdp_reduce_dtype")
    options: dict[str, Any] = setting({}, "more keyword options for the strategy's constructor, e.g. "
                                          "{tp_size: 2}", cli=False)

    def __post_init__(self) -> None:
        from . import strategy_names  # the registry, with every strategy module imported

        names = strategy_names()
        if self.strategy not in names:
            raise ValueError(f"unknown strategy {self.strategy!r}; choose one of {', '.join(names)} "
                             f"(registered in autoglm.distributed.STRATEGIES)")
        if self.nproc < 1 or self.nnodes < 1:
            raise ValueError(f"nproc ({self.nproc}) and nnodes ({self.nnodes}) must be >= 1")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError(f"a run over {self.nnodes} nodes needs --rdzv-endpoint HOST:PORT (a host every node "
                             f"reaches, e.g. the first node's name and port 29400)")
        if self.rdzv_endpoint is not None:
            host, _, port = self.rdzv_endpoint.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"rdzv_endpoint must be HOST:PORT with a port in 1-65535, got "
                                 f"{self.rdzv_endpoint!r}; e.g. node0:29400")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {self.timeout_s}")
        if self.strategy == "single" and (self.nproc > 1 or self.nnodes > 1):
            raise ValueError(f"strategy 'single' runs one process, but nproc={self.nproc}, nnodes={self.nnodes}; "
                             f"pass --nproc 1 --nnodes 1 to train (or resume) in one process, or choose --strategy "
                             f"ddp, fsdp or zero1 for several processes")

    def strategy_options(self) -> dict[str, Any]:
        """Keyword options for `make_strategy` (process group + the strategy's own)."""
        opts: dict[str, Any] = {"backend": self.backend, "timeout_s": self.timeout_s}
        if self.strategy == "fsdp":
            opts.update(param_dtype=self.param_dtype, reduce_dtype=self.reduce_dtype)
        return {**opts, **self.options}
