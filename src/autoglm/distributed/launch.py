"""`autoglm train --nproc N --strategy S`: run torchrun with this very command on N processes.

The resolved config is written to a YAML file and every worker runs
`python -m autoglm.distributed.worker train --config FILE` under torchrun, which sets RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT; the workers see they were launched by torchrun and
train instead of launching again. One node uses `--standalone` (a free local port); several
nodes meet at a c10d rendezvous (`--nnodes`, `--rdzv-endpoint HOST:PORT`, `--rdzv-id`), and
every node runs the same command. Plain `torchrun ... -m autoglm.distributed.worker train
--strategy S ...` works as well.

Example:
    >>> from autoglm.distributed.config import DistributedSpec
    >>> cmd = torchrun_command(DistributedSpec(strategy="ddp", nproc=2), "cfg.yaml", python="python")
    >>> " ".join(cmd)
    'python -m torch.distributed.run --nproc-per-node=2 --nnodes=1 --standalone -m autoglm.distributed.worker train --config cfg.yaml'
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from .config import DistributedSpec

__all__ = ["torchrun_command", "launch"]

log = logging.getLogger(__name__)


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


def launch(cfg: Any, command: str = "train", env: dict[str, str] | None = None) -> int:
    """Write `cfg` (a recipe config with a `dist` section) to a YAML file and run it under
    torchrun; returns torchrun's exit code (non-zero when any rank failed)."""
    from ..settings import to_yaml

    spec: DistributedSpec = cfg.dist
    with tempfile.TemporaryDirectory(prefix="autoglm-launch-") as tmp:
        config_file = Path(tmp) / f"{command}.yaml"
        config_file.write_text(to_yaml(cfg))
        cmd = torchrun_command(spec, config_file, command)
        run_env = dict(os.environ if env is None else env)
        # torchrun sets OMP_NUM_THREADS=1 per worker unless told otherwise; keep a user's choice
        log.info("launching: %s", " ".join(cmd))
        return subprocess.run(cmd, env=run_env, check=False).returncode
