"""`autoglm train --nproc N --strategy S`: run torchrun with this very command on N processes.

The resolved config is written to a YAML file and every worker runs
`python -m autoglm.distributed.worker train --config FILE` under torchrun, which sets RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT; the workers see they were launched by torchrun and
train instead of launching again. One node uses `--standalone` (a free local port); several
nodes meet at a c10d rendezvous (`--nnodes`, `--rdzv-endpoint HOST:PORT`, `--rdzv-id`), and
every node runs the same command. Plain `torchrun ... -m autoglm.distributed.worker train
--strategy S ...` works as well.

Before torchrun starts, a global batch the data-parallel ranks cannot split and a rendezvous
host that does not resolve are refused (`check_before_launch`); a torchrun that fails before
any worker on this node started (they leave a file in AUTOGLM_LAUNCH_STARTED) is reported as
a rendezvous that did not complete, with what to check (`RendezvousError`).

Example:
    >>> from autoglm.distributed.config import DistributedSpec
    >>> cmd = torchrun_command(DistributedSpec(strategy="ddp", nproc=2), "cfg.yaml", python="python")
    >>> " ".join(cmd)
    'python -m torch.distributed.run --nproc-per-node=2 --nnodes=1 --standalone -m autoglm.distributed.worker train --config cfg.yaml'
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from .config import DistributedSpec

__all__ = ["torchrun_command", "launch", "check_before_launch", "check_rendezvous_endpoint", "RendezvousError",
           "STARTED_ENV"]

log = logging.getLogger(__name__)

# a folder where every worker torchrun starts leaves a file (`autoglm.distributed.worker`):
# a failed torchrun that started none never got past the rendezvous
STARTED_ENV = "AUTOGLM_LAUNCH_STARTED"


class RendezvousError(ValueError):
    """The nodes could not meet: the endpoint does not resolve, or torchrun failed before it
    started any process (unreachable endpoint, another --nnodes / --rdzv-id on some node)."""


def check_rendezvous_endpoint(spec: DistributedSpec) -> None:
    """Fail at once, naming the fix, when a multi-node run's rendezvous host does not resolve
    (torchrun would retry for minutes and then print a stack of tracebacks)."""
    if not spec.rdzv_endpoint:
        return
    host, _, port = spec.rdzv_endpoint.rpartition(":")
    try:
        socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise RendezvousError(f"rendezvous endpoint {spec.rdzv_endpoint}: host {host!r} does not resolve on this "
                              f"node ({e}); pass --rdzv-endpoint HOST:PORT with a name or IP address every node "
                              f"reaches (e.g. the first node's `hostname -f` or IP, port 29400)") from e


def torchrun_command(spec: DistributedSpec, config_file: str | Path, command: str = "train",
                     python: str | None = None) -> list[str]:
    """The torchrun command line that runs `autoglm <command> --config config_file` per process."""
    cmd = [python or sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={spec.nproc}",
           f"--nnodes={spec.nnodes}"]
    if spec.nnodes > 1 or spec.rdzv_endpoint:
        if not spec.rdzv_endpoint:
            raise ValueError(f"a run over {spec.nnodes} nodes needs --rdzv-endpoint HOST:PORT")
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={spec.rdzv_endpoint}", f"--rdzv-id={spec.rdzv_id}"]
    else:
        cmd += ["--standalone"]
    return cmd + ["-m", "autoglm.distributed.worker", command, "--config", str(config_file)]


# strategies whose every rank reads its own slice of the global batch
_DATA_PARALLEL = ("ddp", "fsdp", "zero1", "ep")


def check_before_launch(cfg: Any) -> None:
    """What can be refused before torchrun starts N processes (each would print the same
    error): a global batch that the data-parallel ranks cannot split, an unresolvable
    rendezvous host."""
    spec: DistributedSpec = cfg.dist
    world = spec.nproc * spec.nnodes
    batch = getattr(getattr(cfg, "train", None), "batch_size", None)
    if spec.strategy in _DATA_PARALLEL and batch is not None and batch % world:
        lower = batch // world * world
        sizes = " or ".join(str(b) for b in (lower, lower + world) if b > 0)
        raise ValueError(f"--batch-size {batch} (the global batch) must be divisible by the {world} data-parallel "
                         f"ranks (--nproc {spec.nproc} x --nnodes {spec.nnodes}) of strategy {spec.strategy!r}; use "
                         f"--batch-size {sizes}, or an --nproc that divides {batch}")
    check_rendezvous_endpoint(spec)


def launch(cfg: Any, command: str = "train", env: dict[str, str] | None = None) -> int:
    """Write `cfg` (a recipe config with a `dist` section) to a YAML file and run it under
    torchrun; returns torchrun's exit code (non-zero when any rank failed)."""
    from ..settings import to_yaml

    spec: DistributedSpec = cfg.dist
    check_before_launch(cfg)
    with tempfile.TemporaryDirectory(prefix="autoglm-launch-") as tmp:
        config_file = Path(tmp) / f"{command}.yaml"
        config_file.write_text(to_yaml(cfg))
        started = Path(tmp) / "started"
        started.mkdir()
        cmd = torchrun_command(spec, config_file, command)
        run_env = dict(os.environ if env is None else env)
        run_env[STARTED_ENV] = str(started)
        # torchrun sets OMP_NUM_THREADS=1 per worker unless told otherwise; keep a user's choice
        log.info("launching: %s", " ".join(cmd))
        code = subprocess.run(cmd, env=run_env, check=False).returncode
        if code and not any(started.iterdir()):
            if spec.nnodes > 1 or spec.rdzv_endpoint:
                raise RendezvousError(
                    f"torchrun exited with code {code} before starting any process on this node: the rendezvous "
                    f"at {spec.rdzv_endpoint} (id {spec.rdzv_id!r}, {spec.nnodes} nodes) did not complete. Check "
                    f"that this node reaches {spec.rdzv_endpoint} (host up, port open in the firewall), that the "
                    f"node named there runs the same command, and that every node passes the same --nnodes, "
                    f"--rdzv-endpoint and --rdzv-id; torchrun's own error is printed above")
            raise RendezvousError(f"torchrun exited with code {code} before starting any process (its error is "
                                  f"printed above); check the --nproc value and that this machine can open a "
                                  f"local TCP port")
        return code
