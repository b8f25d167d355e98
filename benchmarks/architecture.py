"""Open-AutoGLM vs the standard dense Transformer of equal total parameters, side by side.

Reproduces the reference table's columns in one run:
  params (total / active per token), forward latency at 512 / 2048 / 8192 tokens (median
  of repeats, batch 1), and held-out next-token accuracy / loss after the *same training
  time* on the same data (Tiny Shakespeare when ../shared/data is present), trained by the
  `compare` recipe (`autoglm compare`: steps from each model's step time, timed side by side
  before training) with the config in configs/compare-shakespeare.yaml.

Writes docs/results/architecture.{json,md,png}.

    python benchmarks/architecture.py                       # CPU: small vs standard-small
    python benchmarks/architecture.py --device cuda --presets base --precision bf16
    python benchmarks/architecture.py --config configs/demo.yaml --data builtin --minutes 2 --repeats 2 --name demo
                                                            # `make demo`'s comparison -> docs/results/demo.*

Targets: at 8192 tokens the Open-AutoGLM forward is >= 1.45x faster than the standard
model, and its held-out accuracy after equal training time is not lower.

`--lrs` trains each model once per rate and reports the rate chosen on the first held-out half
on the second (test loss, bits per byte); `--baselines` adds transformers' own Llama and
Mixtral of the same size as compare rows (`hf-llama`, `hf-mixtral`: autoglm.baselines),
trained by the same Trainer on the same batches for the same time:

    python benchmarks/architecture.py --data builtin --seq-len 256 --lrs 1e-3 3e-3 1e-2 --baselines

`--speed` (no quality training): the speed side of the table, four models side by side on the
same tokens with random weights: the preset, its `standard-` twin, and transformers' own
`LlamaForCausalLM` and `MixtralForCausalLM` built at the same total size (same width, depth,
heads and vocabulary; Llama's FFN as wide as all experts together, Mixtral with the same
experts). Forward latency at each length (batch 1, interleaved rounds), training tokens/s and
model-FLOPs utilisation (autoglm.training.throughput: active parameters and attention
counted), peak memory (CUDA), and which grouped GEMM / MoE dispatch ran. Writes
docs/results/architecture-speed[-PRESET][-cuda].{json,md}.

    python benchmarks/architecture.py --speed                             # CPU, fp32: small
    python benchmarks/architecture.py --speed --presets base --device cuda  # bf16 on a GPU

Speed targets (GPU, bf16): `base` forward at 2048 and 8192 <= 0.6x `standard-base` and below
Mixtral's, at 512 not slower than `standard-base`; training tokens/s >= 1.3x `standard-base`.
CPU: the small / standard-small forward ratio at 512 >= 1.3x.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from pathlib import Path

import torch

from autoglm import OpenAutoGLMConfig, OpenAutoGLMForCausalLM
from autoglm.baselines import TRANSFORMERS_BASELINES, baseline_objective, parameter_counts, transformers_twins
from autoglm.recipes.compare import CompareConfig, compare, latencies
from autoglm.settings import load_config
from results_io import pyplot, save_figure, save_results

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
    baselines = list(TRANSFORMERS_BASELINES) if args.minutes > 0 and args.baselines else []
    for name in baselines:  # trained by the compare recipe beside the presets; counts come from its rows
        rows[name] = {"preset": name, "latency_ms": {}}

    # ---- latency only (no training): fresh random weights
    if args.minutes <= 0:
        for preset in (sparse, dense):
            torch.manual_seed(0)
            model = OpenAutoGLMForCausalLM(OpenAutoGLMConfig.from_name(preset)).to(args.device)
            rows[preset]["latency_ms"] = latencies(model, args.lengths, args.repeats, args.precision)

    # ---- quality after equal training time: the compare recipe
    if args.minutes > 0:
        overrides = {"presets": [sparse, dense] + baselines, "minutes": args.minutes, "device": args.device,
                     "train.precision": args.precision, "latency_lengths": args.lengths,
                     "latency_repeats": args.repeats,
                     "out": args.work_dir or tempfile.mkdtemp(prefix="autoglm-arch-")}
        if args.lrs:
            overrides["lrs"] = args.lrs
        if args.seq_len:
            overrides["train.seq_len"] = args.seq_len
        if args.batch_size:
            overrides["train.batch_size"] = args.batch_size
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
            if "grid" in r:
                rows[r["preset"]].update(lr=r["lr"], grid=r["grid"],
                                         test={"loss": r["test_loss"], "bits_per_byte": r["test_bpb"]})
        rows[sparse]["data"] = rows[dense]["data"] = cmp["data"]
        for name in baselines:
            rows[name]["data"] = cmp["data"]
        sample = {"model": cmp["sample_from"], "text": cmp["sample"]} if cmp["sample"] else None
    else:
        sample = None
    s, d = rows[sparse], rows[dense]
    summary = {f"speedup@{T}": d["latency_ms"][T] / s["latency_ms"][T] for T in args.lengths}
    if "test" in s:
        summary["test_bpb_delta"] = s["test"]["bits_per_byte"] - d["test"]["bits_per_byte"]
        for name in baselines:
            summary[f"test_bpb_delta vs {name}"] = s["test"]["bits_per_byte"] - rows[name]["test"]["bits_per_byte"]
    if "val" in s:
        summary["accuracy_delta_pts"] = (s["val"]["accuracy"] - d["val"]["accuracy"]) * 100
        summary["loss_delta"] = s["val"]["loss"] - d["val"]["loss"]
    return {"device": args.device, "device_name": _device_name(args.device), "precision": args.precision,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "rows": rows, "summary": summary,
            "sample": sample, "targets": {"speedup@8192": ">= 1.45", "accuracy_delta_pts": ">= 0"}}


# ------------------------------------------------------------------ speed: four models side by side
def _dispatch_report(model, T: int, device: str, precision: str) -> dict:
    """Which MoE dispatch each Open-AutoGLM MoE layer picks for T tokens in this precision."""
    from autoglm.modules.moe import GROUPED_MM, MoEFeedForward
    from autoglm.training import autocast_context

    moes = [m for m in model.modules() if isinstance(m, MoEFeedForward)]
    if not moes:
        return {}
    dev = torch.device(device)
    x = torch.zeros(T, moes[0].dim, device=dev)
    with torch.no_grad(), autocast_context(precision, dev):
        x = torch.nn.functional.linear(x, torch.zeros(moes[0].dim, moes[0].dim, device=dev))  # autocast dtype
        chosen = sorted({m.choose(x) for m in moes})
    return {"dispatch": chosen, "grouped_mm": GROUPED_MM}


def run_speed(args) -> dict:
    from autoglm.recipes.compare import interleaved_latencies, training_step
    from autoglm.training import TrainConfig
    from autoglm.training.throughput import mfu, model_flops_per_token, peak_flops

    load_start = os.getloadavg()
    sparse, dense = args.presets, f"standard-{args.presets}"
    builders = {p: (OpenAutoGLMForCausalLM, OpenAutoGLMConfig.from_name(p)) for p in (sparse, dense)}
    for d in args.also_dispatch:  # the same sparse model with another MoE dispatch (e.g. the old default)
        builders[f"{sparse}[{d}]"] = (OpenAutoGLMForCausalLM, OpenAutoGLMConfig.from_name(sparse, moe_dispatch=d))
    if args.hf:
        builders.update(transformers_twins(OpenAutoGLMConfig.from_name(sparse), max(args.lengths)))
    models, objectives, counts = {}, {}, {}
    for name, (cls, cfg) in builders.items():
        torch.manual_seed(0)
        m = cls(cfg).to(args.device)
        counts[name] = parameter_counts(m)  # before extend_context grows an absolute position table
        if not name.startswith("hf-"):
            m.extend_context(max(max(args.lengths), cfg.max_position_embeddings))
        objectives[name] = baseline_objective(m)
        models[name] = torch.compile(m) if args.compile else m
    raw = {n: getattr(m, "_orig_mod", m) for n, m in models.items()}
    rows = {n: {"model": n, "params": counts[n], "class": type(raw[n]).__name__} for n in models}
    for n in models:
        rows[n].update(_dispatch_report(raw[n], args.train_seq * args.train_batch, args.device, args.precision))
        impl = getattr(raw[n].config, "_experts_implementation", None)
        if impl is not None and n == "hf-mixtral":
            rows[n]["experts_implementation"] = impl
        if hasattr(raw[n].config, "_attn_implementation") and n.startswith("hf-"):
            rows[n]["attn_implementation"] = raw[n].config._attn_implementation

    # ---- forward latency, interleaved
    lat = interleaved_latencies(models, args.lengths, args.repeats, args.precision)
    for n in models:
        rows[n]["latency_ms"] = lat[n]

    # ---- training tokens/s and MFU, interleaved steps on the same batches
    t = TrainConfig(batch_size=args.train_batch, seq_len=args.train_seq, max_steps=10, precision=args.precision)
    vocab = min(c.vocab_size for _, c in builders.values())
    tokens = torch.randint(2, vocab, (args.train_batch * args.train_seq * 64,)).numpy()
    steps = {n: training_step(models[n], t, tokens, objectives[n]) for n in models}
    secs = {n: [] for n in models}
    peak_mem = {}
    for n in models:  # warm-up (and, on CUDA, the peak memory of one step)
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        steps[n](0)
        if args.device.startswith("cuda"):
            peak_mem[n] = torch.cuda.max_memory_allocated() / 2**30
    for i in range(1, args.train_steps + 1):
        for n in models:
            secs[n].append(steps[n](i))
    peak, peak_source = peak_flops(args.device, args.precision)
    for n in models:
        s = sorted(secs[n])[len(secs[n]) // 2]
        tps = t.tokens_per_step / s
        f = model_flops_per_token(raw[n].config, args.train_seq)
        rows[n]["train"] = {"tokens_per_s": tps, "step_s": s, "flops_per_token": f["train"],
                            "mfu": mfu(tps, f["train"], peak)}
        if n in peak_mem:
            rows[n]["peak_mem_gb_train"] = peak_mem[n]
    if args.device.startswith("cuda"):
        for n in models:  # peak memory of the longest forward, alone
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            interleaved_latencies({n: models[n]}, [max(args.lengths)], 0, args.precision)
            rows[n][f"peak_mem_gb_fwd@{max(args.lengths)}"] = torch.cuda.max_memory_allocated() / 2**30

    s, d = rows[sparse], rows[dense]
    summary = {f"{sparse}/{dense} fwd@{T}": s["latency_ms"][T] / d["latency_ms"][T] for T in args.lengths}
    if "hf-mixtral" in rows:
        summary.update({f"{sparse}/hf-mixtral fwd@{T}": s["latency_ms"][T] / rows["hf-mixtral"]["latency_ms"][T]
                        for T in args.lengths})
    summary[f"train tok/s {sparse}/{dense}"] = s["train"]["tokens_per_s"] / d["train"]["tokens_per_s"]
    for disp in args.also_dispatch:
        o = rows[f"{sparse}[{disp}]"]
        summary.update({f"{sparse}/{sparse}[{disp}] fwd@{T}": s["latency_ms"][T] / o["latency_ms"][T]
                        for T in args.lengths})
        summary[f"train tok/s {sparse}/{sparse}[{disp}]"] = s["train"]["tokens_per_s"] / o["train"]["tokens_per_s"]
    targets = ({f"{sparse}/{dense} fwd@512": "<= 1.0", f"{sparse}/{dense} fwd@2048": "<= 0.6",
                f"{sparse}/{dense} fwd@8192": "<= 0.6", f"{sparse}/hf-mixtral fwd@2048": "< 1.0",
                f"{sparse}/hf-mixtral fwd@8192": "< 1.0", f"train tok/s {sparse}/{dense}": ">= 1.3"}
               if args.device.startswith("cuda") else {f"{sparse}/{dense} fwd@512": "<= 1/1.3 = 0.77"})
    return {"device": args.device, "device_name": _device_name(args.device), "precision": args.precision,
            "compiled": args.compile, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "rows": rows, "summary": summary, "targets": targets,
            "train_setup": {"batch_size": args.train_batch, "seq_len": args.train_seq, "timed_steps": args.train_steps,
                            "optimizer": "AdamW (autoglm.training.build_optimizer)"},
            "peak_flops": {"value": peak, "source": peak_source},
            "loadavg": {"start": load_start, "end": os.getloadavg()}}


def speed_markdown(res: dict) -> str:
    rows = res["rows"]
    lengths = list(next(iter(rows.values()))["latency_ms"])
    head = (["model", "params total", "active"] + [f"fwd {T} (ms)" for T in lengths]
            + ["train tok/s", "MFU", "peak mem (GB)", "MoE path"])
    lines = [f"Device: {res['device_name']}, {res['precision']}, torch {res['torch']}"
             f"{', torch.compile' if res['compiled'] else ', eager'}; training: batch {res['train_setup']['batch_size']}"
             f" x {res['train_setup']['seq_len']} tokens, median of {res['train_setup']['timed_steps']} AdamW steps; "
             f"MFU against {res['peak_flops']['value'] / 1e12:.2f} TFLOP/s ({res['peak_flops']['source']})", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        mem = r.get("peak_mem_gb_train")
        path = ", ".join(r.get("dispatch", [])) + (f" ({r['grouped_mm']})" if "grouped" in r.get("dispatch", []) else "")
        path = path or r.get("experts_implementation", "")
        cells = [name, f"{r['params']['total'] / 1e6:.1f}M", f"{r['params']['active'] / 1e6:.1f}M"]
        cells += [f"{r['latency_ms'][T]:.1f}" for T in lengths]
        cells += [f"{r['train']['tokens_per_s']:,.0f}", f"{100 * r['train']['mfu']:.1f}%",
                  f"{mem:.2f}" if mem is not None else "n/a (CPU)", path or "-"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| ratio | value | target |", "|---|---|---|"]
    for k, v in res["summary"].items():
        lines.append(f"| {k} | {v:.3f} | {res['targets'].get(k, '')} |")
    la = res["loadavg"]
    lines += ["", f"Load average (1/5/15 min) at start {la['start'][0]:.1f}/{la['start'][1]:.1f}/{la['start'][2]:.1f}, "
                  f"at end {la['end'][0]:.1f}/{la['end'][1]:.1f}/{la['end'][2]:.1f}: latencies are interleaved "
                  f"rounds, so the ratios hold under load better than the absolute times."]
    return "\n".join(lines) + "\n"


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
    if all("test" in r for r in res["rows"].values()):
        head += ["chosen lr", "test loss", "test bits/byte"]
    lines = [f"Device: {res['device_name']}, precision {res['precision']}, torch {res['torch']}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in res["rows"].items():
        cells = [name, f"{r['params']['total'] / 1e6:.2f}M", f"{r['params']['active'] / 1e6:.2f}M"]
        cells += [f"{r['latency_ms'][T]:.1f}" for T in lengths]
        if has_val:
            cells += [str(r["train_steps"]), f"{r['val']['loss']:.3f}", f"{r['val']['accuracy'] * 100:.2f}%"]
        if "test" in r:
            cells += [f"{r['lr']:g}", f"{r['test']['loss']:.3f}", f"{r['test']['bits_per_byte']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| ratio (standard / Open-AutoGLM) | value | target |", "|---|---|---|"]
    for k, v in res["summary"].items():
        target = res["targets"].get(k, "")
        lines.append(f"| {k} | {v:.3f} | {target} |")
    if res.get("sample"):
        lines += ["", "Sample from the Open-AutoGLM model with the lower validation loss "
                  f"(`{res['sample']['model']}`):", "",
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
    save_figure(fig, path)


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
    p.add_argument("--lrs", type=float, nargs="+", default=None,
                   help="learning-rate grid per model, chosen on the first validation half, reported (test loss, "
                        "bits per byte) on the second")
    p.add_argument("--seq-len", type=int, default=None, help="training sequence length (default: the config's)")
    p.add_argument("--batch-size", type=int, default=None, help="training sequences per step (default: the config's)")
    p.add_argument("--baselines", action="store_true", help="quality: also train transformers' Llama and Mixtral "
                                                                "of the same size (compare rows hf-llama, hf-mixtral)")
    p.add_argument("--speed", action="store_true", help="the four-model speed comparison (no quality training)")
    p.add_argument("--no-hf", dest="hf", action="store_false", help="--speed without transformers' Llama/Mixtral")
    p.add_argument("--train-batch", type=int, default=None, help="--speed: sequences per training step "
                                                                 "(default 8 on GPU, 2 on CPU)")
    p.add_argument("--train-seq", type=int, default=None, help="--speed: tokens per sequence (default 2048 GPU, "
                                                               "512 CPU)")
    p.add_argument("--train-steps", type=int, default=3, help="--speed: timed training steps per model")
    p.add_argument("--compile", action="store_true", help="--speed: torch.compile every model")
    p.add_argument("--also-dispatch", nargs="*", default=[], choices=["sorted", "dense", "gather", "grouped"],
                   help="--speed: also time the sparse preset with these MoE dispatches (e.g. sorted, the "
                        "pre-grouped-GEMM default), as rows PRESET[dispatch]")
    args = p.parse_args(argv)
    args.precision = args.precision or ("bf16" if args.device.startswith("cuda") else "fp32")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.speed:
        gpu = args.device.startswith("cuda")
        args.train_batch = args.train_batch or (8 if gpu else 2)
        args.train_seq = args.train_seq or (2048 if gpu else 512)
        res = run_speed(args)
        name = args.name or "-".join(["architecture-speed"] + ([args.presets] if args.presets != "small" else [])
                                     + (["cuda"] if gpu else []) + (["compiled"] if args.compile else []))
        save_results(args.out, name, res, speed_markdown(res))
        return
    res = run(args)
    name = args.name or ("architecture" if args.presets == "small" else f"architecture-{args.presets}")
    path = save_results(args.out, name, res, markdown(res))
    plot(res, path.with_suffix(".png"))


if __name__ == "__main__":
    main()
