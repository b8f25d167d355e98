"""What torchrun runs on every process: the `autoglm` command line.

    torchrun --nproc-per-node 2 -m autoglm.distributed.worker train --strategy ddp --preset tiny
"""

from __future__ import annotations

import sys

from ..cli import main

if __name__ == "__main__":
    sys.exit(main())
