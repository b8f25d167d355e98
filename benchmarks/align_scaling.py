"""Alignment training on one process against several (torchrun, data parallel), side by side.

Each setting runs `autoglm align` as a user does, once in one process and once per strategy
with `--nproc N --strategy S` (autoglm starts torchrun; gloo on CPU, nccl on GPUs), with the
same global batch (strong scaling: every rank trains on B/N pairs of it, every rank's features
gathered into the loss). The runs alternate (`results_io.interleaved`), so load on a shared
machine hits them alike. Reported: training pairs per second (the training split over the
recipe's seconds per epoch, zero-shot evaluation excluded), its ratio to one process, and the
final loss (equal up to the MoE load-balancing term, which each rank computes on its rows).

Settings: `digits`, configs/align-digits.yaml (ViT 3 x 64, the tiny text preset, batch 64)
with its momentum encoders and queues on (`--momentum 0.99`: the queues stay equal on every
rank, the heavier case); `larger`, the same data with a ViT of 4 x 128 and the small text preset at
batch 256, where each step has more compute to share.

    python benchmarks/align_scaling.py                      # 1 vs 2 processes, docs/results/align-scaling.*
    python benchmarks/align_scaling.py --nproc 4 --strategies ddp,zero1   # on a machine with 4 GPUs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from results_io import interleaved, save_results

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {
    "digits": ["--config", str(ROOT / "configs/align-digits.yaml"), "--steps", "200", "--momentum", "0.99"],
    "larger": ["--config", str(ROOT / "configs/align-digits.yaml"), "--steps", "30", "--batch-size", "256", "--momentum", "0.99",
               "--image-dim", "128", "--image-layers", "4", "--ffn-hidden", "256", "--text-model", "small"],
}


def run(setting: str, strategy: str, nproc: int, out: Path) -> dict:
    cmd = [sys.executable, "-c", "from autoglm.cli import main; main()", "align", *SETTINGS[setting],
           "--eval-every", "0", "--save-every", "0", "--out", str(out), "--overwrite"]
    if strategy != "single":
        cmd += ["--nproc", str(nproc), "--strategy", strategy]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    info = json.loads((out / "run.json").read_text())
    return {"pairs_per_s": info["split"]["train"] / info["seconds_per_epoch"], "final_loss": info["final_loss"],
            "batch_size": info["config"]["train"]["batch_size"], "steps": info["result"]["steps"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", default="digits,larger", help="comma list of: " + ", ".join(SETTINGS))
    p.add_argument("--nproc", type=int, default=2, help="processes of the data-parallel runs")
    p.add_argument("--strategies", default="ddp,zero1", help="comma list of ddp, zero1")
    p.add_argument("--repeats", type=int, default=3, help="runs of each row (interleaved); the median is reported")
    p.add_argument("--out", default=None, help="results folder (default docs/results)")
    p.add_argument("--name", default="align-scaling")
    args = p.parse_args()
    settings = [s for s in args.settings.split(",") if s]
    rows_keys = [(s, st) for s in settings for st in ["single", *[x for x in args.strategies.split(",") if x]]]
    runs: dict[tuple[str, str], list[dict]] = {k: [] for k in rows_keys}
    with tempfile.TemporaryDirectory(prefix="autoglm-align-scaling-") as tmp:
        for rep, (setting, strategy) in interleaved(rows_keys, args.repeats):
            r = run(setting, strategy, args.nproc, Path(tmp) / f"{setting}-{strategy}")
            print(f"round {rep}: {setting:7s} {strategy:6s} {r['pairs_per_s']:8.1f} pairs/s", flush=True)
            runs[(setting, strategy)].append(r)
    rows = []
    for setting, strategy in rows_keys:
        rs = runs[(setting, strategy)]
        rate = statistics.median(r["pairs_per_s"] for r in rs)
        rows.append({"setting": setting, "strategy": strategy, "processes": 1 if strategy == "single" else args.nproc,
                     "batch_size": rs[0]["batch_size"], "steps": rs[0]["steps"], "pairs_per_s": round(rate, 1),
                     "runs_pairs_per_s": [round(r["pairs_per_s"], 1) for r in rs],
                     "final_loss": round(rs[0]["final_loss"], 4)})
    for r in rows:
        one = next(x for x in rows if x["setting"] == r["setting"] and x["strategy"] == "single")
        r["vs_one_process"] = round(r["pairs_per_s"] / one["pairs_per_s"], 2)
    md = ["| setting | strategy | processes | global batch | pairs/s (median) | runs | vs one process | final loss |",
          "|---|---|---|---|---|---|---|---|"]
    md += [f"| {r['setting']} | {r['strategy']} | {r['processes']} | {r['batch_size']} | {r['pairs_per_s']:,.1f} | "
           f"{', '.join(f'{x:,.1f}' for x in r['runs_pairs_per_s'])} | {r['vs_one_process']:.2f}x | {r['final_loss']} |"
           for r in rows]
    threads = os.environ.get("OMP_NUM_THREADS", "1")
    md.append(f"\nEach process runs {threads} torch thread(s) (OMP_NUM_THREADS); runs alternate, {args.repeats} each.")
    save_results(args.out, args.name, {"rows": rows, "threads_per_process": threads}, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
