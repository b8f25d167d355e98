"""What torchrun runs on every process: the `autoglm` command line.

    torchrun --nproc-per-node 2 -m autoglm.distributed.worker train --strategy ddp --preset tiny

Under `autoglm train --nproc N` the launcher passes a folder in AUTOGLM_LAUNCH_STARTED where
each worker leaves a file as it starts: a torchrun that fails with none there never got past
the rendezvous, and the launcher says so (`autoglm.distributed.launch`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .launch import STARTED_ENV


def mark_started(env=None) -> None:
    """Leave `rank<RANK>` in the launcher's folder, if it gave one."""
    env = os.environ if env is None else env
    folder = env.get(STARTED_ENV)
    if folder and Path(folder).is_dir():
        (Path(folder) / f"rank{env.get('RANK', '0')}").touch()


if __name__ == "__main__":
    mark_started()
    from ..cli import main

    sys.exit(main())
