"""What every benchmark script does last: write `<name>.json` and `<name>.md` into the
results folder (default `docs/results/`, committed) and print the markdown table. Run as
`python benchmarks/<script>.py`, so this module imports as `results_io`.

Each JSON file carries `meta`: the command that made it, the commit, the machine (CPU, GPU),
the torch version and the date, and the Markdown file ends with the same lines, so every
committed number says how to reproduce it. `interleaved` is the run order every side-by-side
comparison uses.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from collections.abc import Iterable, Iterator
from typing import Any

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"


def machine() -> dict[str, Any]:
    """What ran the benchmark: CPU, cores, threads torch used, GPU (if any), versions."""
    import torch

    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpu": _cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
                            "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("+changes" if dirty else "")


def meta() -> dict[str, Any]:
    script = Path(sys.argv[0])
    cmd = ["python", f"benchmarks/{script.name}" if script.parent.name == "benchmarks" else str(script),
           *sys.argv[1:]]
    return {"command": shlex.join(cmd), "commit": _commit(), "machine": machine(),
            "date": datetime.date.today().isoformat()}


def interleaved(keys: Iterable[Any], repeats: int) -> Iterator[tuple[int, Any]]:
    """(repeat, key): every key once per repeat, in reverse order every other repeat, so a
    machine that drifts during the run does not favour the key that always runs first."""
    keys = list(keys)
    for rep in range(repeats):
        yield from ((rep, k) for k in (keys if rep % 2 == 0 else keys[::-1]))


def save_results(out_dir: str | Path | None, name: str, res: Any, md: str) -> Path:
    """Write `<name>.json` (res + meta) and `<name>.md` (md + a reproduce footer) to `out_dir`
    (None: docs/results/); returns the JSON path."""
    out = Path(out_dir) if out_dir is not None else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    m = meta()
    payload = {**res, "meta": m} if isinstance(res, dict) else {"result": res, "meta": m}
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    mach = m["machine"]
    where = mach.get("gpu") or f"{mach['cpu']}, {mach['cores']} cores, {mach['torch_threads']} torch threads"
    footer = (f"\n\nMade by `{m['command']}` at commit {m['commit']} on {m['date']}; "
              f"{where}; torch {mach['torch']}.\n")
    md = md.rstrip("\n") + footer
    (out / f"{name}.md").write_text(md)
    print(md, end="")
    return out / f"{name}.json"


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


def save_figure(fig: Any, path: str | Path, dpi: int = 120) -> Path:
    """Lay out `fig`, write it to `path` (folders made as needed) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
