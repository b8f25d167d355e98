"""Open-AutoGLM vs the standard dense Transformer of equal total parameters, side by side.

Reproduces the reference table's columns in one run:
  params (total / active per token), forward latency at 512 / 2048 / 8192 tokens (median
  of repeats, batch 1), and held-out next-token accuracy / loss after the *same training
  wall-clock* on the same data (Tiny Shakespeare when ../shared/data is present), trained
  by the `compare` recipe (`autoglm compare`) with the config in configs/compare-shakespeare.yaml.

Writes docs/results/architecture.{json,md,png}.

    python benchmarks/architecture.py                       # CPU: small vs standard-small
    python benchmarks/architecture.py --device cuda --presets base --precision bf16
    python benchmarks/architecture.py --config configs/demo.yaml --data builtin --minutes 2 --repeats 2 --name demo
                                                            # `make demo`'s comparison -> docs/results/demo.*

Targets: at 8192 tokens the Open-AutoGLM forward is >= 1.45x faster than the standard
model, and its held-out accuracy after equal training time is not lower.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import torch

from autoglm import OpenAutoGLMConfig, OpenAutoGLMForCausalLM
from autoglm.recipes.compare import CompareConfig, compare, latencies
from autoglm.settings import load_config
from results_io import pyplot, save_results

ROOT = Path(__file__).resolve().parent
SHAKESPEARE = ROOT.parent.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
CONFIG = ROOT.parent / "configs" / "compare-shakespeare.yaml"


def param_counts(preset: str) -> dict:
    with torch.device("meta"):
        return OpenAutoGLMForCausalLM(OpenAutoGLMConfig.from_name(preset)).num_parameters_summary()


def run(args) -> dict:
    sparse, dense = args.presets, f"standard-{args.presets}"
    rows = {}
    for preset in (sparse, dense):
        rows[preset] = {"preset": preset, "params": param_counts(preset), "latency_ms": {}}

    # ---- latency only (no training): fresh random weights
    if args.minutes <= 0:
        for preset in (sparse, dense):
            torch.manual_seed(0)
            model = OpenAutoGLMForCausalLM(OpenAutoGLMConfig.from_name(preset)).to(args.device)
            rows[preset]["latency_ms"] = latencies(model, args.lengths, args.repeats, args.precision)

    # ---- quality after equal training wall-clock: the compare recipe
    if args.minutes > 0:
        overrides = {"presets": [sparse, dense], "minutes": args.minutes, "device": args.device,
                     "train.precision": args.precision, "latency_lengths": args.lengths,
                     "latency_repeats": args.repeats,
                     "out": args.work_dir or tempfile.mkdtemp(prefix="autoglm-arch-")}
        data = args.data if args.data is not None else (SHAKESPEARE if SHAKESPEARE.is_file() else None)
        if data is not None and str(data) != "builtin":
            overrides["data.path"] = data
        cmp = compare(load_config(CompareConfig, args.config, overrides), progress=False)
        for r in cmp["rows"]:  # the trained models' counts (the config's vocabulary, not the preset's)
            rows[r["preset"]].update(params={"total": r["params_total"], "active": r["params_active"]},
                                     latency_ms=r["latency_ms"], train_steps=r["steps"], train_seconds=r["seconds"],
                                     train_tokens_per_s=r["tokens_per_s"],
                                     val={"loss": r["val_loss"], "accuracy": r["val_acc"]},
                                     curve=cmp["curves"][r["preset"]])
        rows[sparse]["data"] = rows[dense]["data"] = cmp["data"]
        sample = {"model": cmp["best"], "text": cmp["sample"]} if cmp["sample"] else None
    else:
        sample = None
    s, d = rows[sparse], rows[dense]
    summary = {f"speedup@{T}": d["latency_ms"][T] / s["latency_ms"][T] for T in args.lengths}
    if "val" in s:
        summary["accuracy_delta_pts"] = (s["val"]["accuracy"] - d["val"]["accuracy"]) * 100
        summary["loss_delta"] = s["val"]["loss"] - d["val"]["loss"]
    return {"device": args.device, "device_name": _device_name(args.device), "precision": args.precision,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "rows": rows, "summary": summary,
            "sample": sample, "targets": {"speedup@8192": ">= 1.45", "accuracy_delta_pts": ">= 0"}}


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    import platform
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def markdown(res: dict) -> str:
    lengths = list(next(iter(res["rows"].values()))["latency_ms"])
    head = ["model", "params total", "params active"] + [f"fwd {T} (ms)" for T in lengths]
    has_val = all("val" in r for r in res["rows"].values())
    if has_val:
        head += ["train steps", "val loss", "val acc"]
    lines = [f"Device: {res['device_name']}, precision {res['precision']}, torch {res['torch']}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in res["rows"].items():
        cells = [name, f"{r['params']['total'] / 1e6:.2f}M", f"{r['params']['active'] / 1e6:.2f}M"]
        cells += [f"{r['latency_ms'][T]:.1f}" for T in lengths]
        if has_val:
            cells += [str(r["train_steps"]), f"{r['val']['loss']:.3f}", f"{r['val']['accuracy'] * 100:.2f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| ratio (standard / Open-AutoGLM) | value | target |", "|---|---|---|"]
    for k, v in res["summary"].items():
        target = res["targets"].get(k, "")
        lines.append(f"| {k} | {v:.3f} | {target} |")
    if res.get("sample"):
        lines += ["", f"Sample from the model with the lower validation loss (`{res['sample']['model']}`):", "",
                  "> " + " ".join(res["sample"]["text"].split())]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in res["rows"].items():
        Ts = list(r["latency_ms"])
        axes[0].plot(Ts, [r["latency_ms"][T] for T in Ts], marker="o", label=name)
        curve = r.get("curve", [])
        if curve:
            axes[1].plot([c[0] for c in curve], [c[1] for c in curve], marker="o", ms=3, label=name)
    axes[0].set(xscale="log", yscale="log", xlabel="sequence length", ylabel="forward latency (ms)",
                title="Forward latency (batch 1)")
    axes[1].set(xlabel="wall-clock (s)", ylabel="validation loss", title="Loss vs time (equal budget)")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="small", help="sparse preset; its twin is standard-<preset>")
    p.add_argument("--config", type=Path, default=CONFIG, help="compare-recipe config for the training part")
    p.add_argument("--data", type=Path, default=None,
                   help=f"training text (default {SHAKESPEARE} when present; 'builtin': the built-in corpus)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default=None, choices=["fp32", "bf16"], help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--minutes", type=float, default=5.0, help="training budget per model (0 = latency only)")
    p.add_argument("--work-dir", type=Path, default=None, help="where the compare runs go (default: a temp dir)")
    p.add_argument("--out", type=Path, default=None, help="results folder (default: docs/results)")
    p.add_argument("--name", default=None, help="results file name (default: architecture[-PRESET])")
    args = p.parse_args(argv)
    args.precision = args.precision or ("bf16" if args.device.startswith("cuda") else "fp32")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    res = run(args)
    name = args.name or ("architecture" if args.presets == "small" else f"architecture-{args.presets}")
    path = save_results(args.out, name, res, markdown(res))
    plot(res, path.with_suffix(".png"))


if __name__ == "__main__":
    main()
