"""What every benchmark script does last: write `<name>.json` and `<name>.md` into the
results folder and print the markdown table (run as `python benchmarks/<script>.py`, so
this module imports as `results_io`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any


def save_results(out_dir: str | Path, name: str, res: Any, md: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(res, indent=2, default=str))
    md = md.rstrip("\n") + "\n"
    (out / f"{name}.md").write_text(md)
    print(md, end="")


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend, or None (with a warning) when matplotlib
    is not installed: the benchmark then skips its plot."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logging.warning("matplotlib not installed; skipping the plot")
        return None
    return plt
