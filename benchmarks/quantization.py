"""FP32 PyTorch vs FP32 ONNX Runtime vs INT8 dynamic vs INT8 static (QDQ), side by side in one run.

For each model: size (MB, and how many times smaller than the FP32 safetensors checkpoint
and than the FP32 ONNX export), prefill latency for 512 tokens and per-token decode
latency (ms, batch 1, median of interleaved rounds), held-out loss / perplexity / next-token
accuracy, and parity with FP32 PyTorch: max |logit difference|, next-token argmax agreement
on the held-out windows, and greedy agreement (32 free-running tokens from held-out
prompts, position by position). The PyTorch INT8 row is torch's own dynamic int8 for
nn.Linear, the candidate native int8 path for the PyTorch engine.

The exports are made by the export recipe (`autoglm.recipes.export`) from --config
(default configs/export-int8.yaml): its fp32 export, then its quantization in both modes
(dynamic, and static QDQ with its calibration settings).

Model: --model-dir (a trained run, e.g. `autoglm train --preset small --out runs/small`),
or a `small` model trained here for --train-seconds on Tiny Shakespeare (../shared/data)
when present, else on the built-in corpus. Held-out data: the validation split (the last
10% of the tokens) of the corpus the model trained on (--data to choose another);
evaluation windows come from its start, calibration windows from its end (disjoint).

Writes docs/results/quantization.{json,md} (--name, --out to change).

    python benchmarks/quantization.py --model-dir runs/small
    python benchmarks/quantization.py --model-dir runs/small --set prefill_attention=dense   # the (T, T)-mask graph
    python benchmarks/quantization.py --train-seconds 300

Targets (issue #6): INT8 files >= 3.5x smaller than FP32, INT8 >= 1.5x lower latency than
FP32 ONNX Runtime, held-out loss within 2% of FP32.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from autoglm.data import build_token_cache, iter_eval_batches, read_corpus
from autoglm.export import OrtCausalLM
from autoglm.export.quantize import calibration_windows
from autoglm.export.storage import directory_size_mb
from autoglm.recipes.common import DEFAULT_CACHE
from autoglm.recipes.export import ExportConfig, export_fp32, quantize_fp32
from autoglm.rundir import RunDir
from autoglm.settings import load_config, parse_assignments
from results_io import save_results

ROOT = Path(__file__).resolve().parent
SHAKESPEARE = ROOT.parent.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
DEFAULT_CONFIG = ROOT.parent / "configs" / "export-int8.yaml"
FP32, TORCH_INT8, ORT_FP32, ORT_INT8, ORT_STATIC = ("FP32 PyTorch", "INT8 PyTorch (torch dynamic, Linear)",
                                                    "FP32 ONNX Runtime", "INT8 dynamic (ORT)",
                                                    "INT8 static QDQ (ORT)")
log = logging.getLogger("quantization")


class TorchLM:
    """Same interface as OrtCausalLM.forward for an eager model (fp32 or torch int8)."""

    def __init__(self, model):
        self.model = model

    @torch.inference_mode()
    def prefill(self, ids):
        out = self.model(torch.from_numpy(ids), use_cache=True)
        return out.logits.numpy(), out.cache

    @torch.inference_mode()
    def decode(self, tok, cache):
        out = self.model(torch.from_numpy(tok), past_key_values=cache, use_cache=True)
        return out.logits.numpy(), out.cache


class OrtLM:
    def __init__(self, lm: OrtCausalLM):
        self.lm = lm
        self.mask = None

    def prefill(self, ids):
        self.mask = np.ones_like(ids)
        return self.lm.forward(ids, self.mask)

    def decode(self, tok, past):
        self.mask = np.concatenate([self.mask, np.ones_like(tok)], axis=1)
        return self.lm.forward(tok, self.mask, past)


def _one_round(lm, prompt: np.ndarray, decode_tokens: int) -> tuple[float, float]:
    t = time.perf_counter()
    logits, cache = lm.prefill(prompt)
    t_pre = time.perf_counter() - t
    steps = []
    for _ in range(decode_tokens):
        tok = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        t = time.perf_counter()
        logits, cache = lm.decode(tok, cache)
        steps.append(time.perf_counter() - t)
    return t_pre, statistics.median(steps)


def timings(lms: dict, prompt: np.ndarray, decode_tokens: int, repeats: int) -> dict[str, tuple[float, float]]:
    """Median prefill time (ms) of `prompt` (1, T) and median per-token decode time (ms) after it,
    per model. Rounds are interleaved (model A, B, C, ... then again) so that load swings on a
    shared machine hit every model alike; the first round is warm-up."""
    pre: dict[str, list[float]] = {k: [] for k in lms}
    dec: dict[str, list[float]] = {k: [] for k in lms}
    for i in range(repeats + 1):
        for name, lm in lms.items():
            a, b = _one_round(lm, prompt, decode_tokens)
            if i:
                pre[name].append(a)
                dec[name].append(b)
    return {k: (statistics.median(pre[k]) * 1e3, statistics.median(dec[k]) * 1e3) for k in lms}


def greedy(lm, prompt: np.ndarray, n: int) -> list[int]:
    logits, cache = lm.prefill(prompt)
    out = []
    for _ in range(n):
        tok = int(logits[0, -1].argmax())
        out.append(tok)
        logits, cache = lm.decode(np.array([[tok]], dtype=np.int64), cache)
    return out


def quality(lms: dict, batches) -> dict[str, dict[str, float]]:
    """Held-out loss / perplexity / next-token accuracy of every model, and its parity with
    FP32 PyTorch on the same windows (max |logit difference|, argmax agreement): one pass,
    the reference logits computed once per batch."""
    acc = {k: {"nll": 0.0, "correct": 0, "agree": 0, "max_diff": 0.0, "n": 0} for k in lms}
    for x, y in batches:
        ref = None
        for name, lm in lms.items():
            logits = torch.from_numpy(np.ascontiguousarray(lm.prefill(x.numpy())[0])).float()  # (B, T, V)
            ref = logits if ref is None else ref  # the first model is the reference
            flat, labels = logits.reshape(-1, logits.shape[-1]), y.reshape(-1)
            a = acc[name]
            a["nll"] += float(F.cross_entropy(flat.double(), labels, reduction="sum"))
            a["correct"] += int((flat.argmax(-1) == labels).sum())
            a["agree"] += int((logits.argmax(-1) == ref.argmax(-1)).sum())
            a["max_diff"] = max(a["max_diff"], float((logits - ref).abs().max()))
            a["n"] += labels.numel()
    out = {}
    for name, a in acc.items():
        loss = a["nll"] / a["n"]
        out[name] = {"val_loss": loss, "val_ppl": float(np.exp(loss)), "val_acc": a["correct"] / a["n"],
                     "argmax_agreement": a["agree"] / a["n"], "max_abs_logit_diff": a["max_diff"]}
    return out


def cpu_int8_support() -> str:
    """The x86 instruction sets INT8 GEMMs speed up with (ONNX Runtime's MLAS uses VNNI / AMX when
    present; on AVX2 alone int8 multiply-adds run at about the fp32 FMA rate)."""
    try:
        flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError:
        return platform.machine()
    have = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    vnni = any(f in have for f in ("avx512_vnni", "avx_vnni", "amx_int8"))
    return f"{' '.join(have) or 'no AVX2'}{'' if vnni else ', no VNNI'}"


def _train_here(args, work: Path, data) -> Path:
    from autoglm.recipes.pretrain import PretrainConfig, pretrain

    log.info("training %s for %ds on %s", args.preset, args.train_seconds, data or "the built-in corpus")
    cfg = load_config(PretrainConfig, overrides={
        "out": work / "model", "model.preset": args.preset, "model.vocab_size": args.vocab_size,
        "data.path": data, "data.cache_dir": work / "cache", "train.batch_size": 8, "train.seq_len": 256,
        "train.max_steps": 100000, "train.max_seconds": args.train_seconds, "train.warmup_steps": 30,
        "train.eval_every": 0, "train.save_every": 0, "train.eval_batches": 4, "sample_prompt": ""})
    pretrain(cfg, progress=False)
    return work / "model"


def training_summary(run_dir: RunDir) -> dict:
    """How the model was trained, from its run.json and metrics.jsonl."""
    info = run_dir.info
    res, train = info.get("result") or {}, (info.get("config") or {}).get("train", {})
    rows = []
    metrics = run_dir.path / "metrics.jsonl"
    if metrics.is_file():
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    evals = [(r["step"], round(r["val_loss"], 4)) for r in rows if "val_loss" in r]
    return {"data": info.get("data"), "steps": res.get("steps"), "scheduled_steps": train.get("max_steps"),
            "batch_size": train.get("batch_size"), "seq_len": train.get("seq_len"),
            "minutes": round(rows[-1]["elapsed"] / 60, 1) if rows else None, "stop_reason": res.get("stop_reason"),
            "final_eval": res.get("final_eval"), "val_loss_curve": evals}


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="autoglm-quant-bench-"))
    if args.model_dir is None:
        data = args.data if args.data is not None else (SHAKESPEARE if SHAKESPEARE.is_file() else None)
        model_dir = _train_here(args, work, data)
    else:
        model_dir = Path(args.model_dir)
    run_dir = RunDir.open(model_dir)
    data = args.data if args.data is not None else run_dir.data_source  # the corpus it trained on
    model, tok = run_dir.load(dtype=torch.float32)
    val = build_token_cache(read_corpus(data), tok, args.cache_dir).val
    eval_batches = list(iter_eval_batches(val, 4, args.seq_len, max_batches=args.eval_batches))
    n_eval_tokens = sum(x.numel() for x, _ in eval_batches) + len(eval_batches)
    over = parse_assignments(args.set)
    cfg = load_config(ExportConfig, args.config, {**over, "model_dir": model_dir, "out": work / "onnx-int8",
                                                  "cache_dir": args.cache_dir})
    calib = calibration_windows(val, cfg.calibration.windows, cfg.calibration.seq_len)
    if n_eval_tokens > len(val) - len(calib) * cfg.calibration.seq_len:
        raise ValueError("held-out split too small for disjoint evaluation and calibration windows; "
                         "lower --eval-batches / --seq-len or the config's calibration windows")
    dirs = {"fp32": work / "onnx-fp32", "int8": work / "onnx-int8", "int8-static": work / "onnx-int8-static"}
    t = time.perf_counter()
    fp32_info = export_fp32(cfg, dirs["fp32"], model=model)
    log.info("exported in %.0fs", time.perf_counter() - t)
    q_info = {mode: quantize_fp32(dataclasses.replace(cfg, quantize=mode), dirs["fp32"], dirs[mode],
                                  windows=calib if mode == "int8-static" else None)
              for mode in ("int8", "int8-static")}

    fp32_copy = run_dir.load_model(dtype=torch.float32)
    spec = {name: torch.ao.quantization.default_dynamic_qconfig for name, mod in fp32_copy.named_modules()
            if isinstance(mod, torch.nn.Linear) and ".router" not in name}  # the router reads .weight directly
    torch_int8 = torch.ao.quantization.quantize_dynamic(fp32_copy, spec, dtype=torch.qint8)
    torch_int8_path = work / "torch-int8.pt"
    torch.save(torch_int8.state_dict(), torch_int8_path)
    safetensors_mb = (model_dir / "model.safetensors").stat().st_size / 1e6
    rows = {
        FP32: (TorchLM(model), safetensors_mb),
        TORCH_INT8: (TorchLM(torch_int8), torch_int8_path.stat().st_size / 1e6),
        ORT_FP32: (OrtLM(OrtCausalLM(dirs["fp32"], threads=args.threads)), directory_size_mb(dirs["fp32"])),
        ORT_INT8: (OrtLM(OrtCausalLM(dirs["int8"], threads=args.threads)), directory_size_mb(dirs["int8"])),
        ORT_STATIC: (OrtLM(OrtCausalLM(dirs["int8-static"], threads=args.threads)),
                     directory_size_mb(dirs["int8-static"])),
    }
    lms = {k: v[0] for k, v in rows.items()}
    prompt = val[: args.prefill_len][None].astype(np.int64)
    prompts = [val[i * 97: i * 97 + 16][None].astype(np.int64) for i in range(args.greedy_prompts)]
    ref_greedy = [greedy(lms[FP32], p, 32) for p in prompts]
    scores = quality(lms, eval_batches)
    times = timings(lms, prompt, args.decode_tokens, args.repeats)
    fp32_onnx_mb = rows[ORT_FP32][1]
    results = []
    for name, (lm, size) in rows.items():
        g = [greedy(lm, p, 32) for p in prompts]
        results.append({"model": name, "size_mb": size, "safetensors_over_size": safetensors_mb / size,
                        "fp32_onnx_over_size": fp32_onnx_mb / size, "prefill_ms": times[name][0],
                        "decode_ms_per_token": times[name][1], **scores[name],
                        "greedy_agreement": float(np.mean([np.mean(np.array(a) == np.array(b))
                                                           for a, b in zip(g, ref_greedy)]))})
        log.info("%s", results[-1])
    by = {r["model"]: r for r in results}
    f, d, s = by[ORT_FP32], by[ORT_INT8], by[ORT_STATIC]
    ratios = {
        "size fp32-safetensors/int8-dynamic": d["safetensors_over_size"],
        "size fp32-onnx/int8-dynamic": d["fp32_onnx_over_size"],
        "size fp32-safetensors/int8-static": s["safetensors_over_size"],
        "size fp32-onnx/int8-static": s["fp32_onnx_over_size"],
        "size fp32-onnx/fp32-safetensors": fp32_onnx_mb / safetensors_mb,
        "prefill fp32-ort/int8-dynamic": f["prefill_ms"] / d["prefill_ms"],
        "decode fp32-ort/int8-dynamic": f["decode_ms_per_token"] / d["decode_ms_per_token"],
        "prefill fp32-ort/int8-static": f["prefill_ms"] / s["prefill_ms"],
        "decode fp32-ort/int8-static": f["decode_ms_per_token"] / s["decode_ms_per_token"],
        "loss rel. diff int8-dynamic": (d["val_loss"] - f["val_loss"]) / f["val_loss"],
        "loss rel. diff int8-static": (s["val_loss"] - f["val_loss"]) / f["val_loss"],
        "prefill fp32-torch/fp32-ort": by[FP32]["prefill_ms"] / f["prefill_ms"],
        "decode fp32-torch/fp32-ort": by[FP32]["decode_ms_per_token"] / f["decode_ms_per_token"],
        "decode fp32-torch/int8-torch": by[FP32]["decode_ms_per_token"] / by[TORCH_INT8]["decode_ms_per_token"],
    }
    mcfg = model.config
    return {"device": f"{platform.machine()} ({cpu_int8_support()}; {args.threads} threads, shared machine)",
            "torch": torch.__version__, "onnxruntime": __import__("onnxruntime").__version__,
            "model": {"dir": str(model_dir), "layers": mcfg.num_hidden_layers, "hidden": mcfg.hidden_size,
                      "experts": mcfg.num_experts, "vocab": mcfg.vocab_size,
                      "params": model.num_parameters_summary()["total"]},
            "training": training_summary(run_dir), "export_config": str(args.config), "export_set": args.set,
            "parity_vs_eager": fp32_info["parity_vs_eager"],
            "parity_vs_fp32_onnx": {m: i["parity_vs_fp32"] for m, i in q_info.items()},
            "data": str(data or "builtin:stdlib-docstrings"), "prefill_len": args.prefill_len,
            "greedy_prompts": args.greedy_prompts,
            "prefill_attention": cfg.prefill_attention, "export_chunk": cfg.chunk,
            "eval_tokens": int(sum(y.numel() for _, y in eval_batches)), "calibration_windows": len(calib),
            "results": results, "ratios": ratios}


def to_markdown(res: dict) -> str:
    targets = {"size fp32-safetensors/int8-dynamic": ">= 3.5", "size fp32-onnx/int8-dynamic": ">= 3.5",
               "size fp32-safetensors/int8-static": ">= 3.5", "size fp32-onnx/int8-static": ">= 3.5",
               "prefill fp32-ort/int8-dynamic": ">= 1.5", "decode fp32-ort/int8-dynamic": ">= 1.5",
               "prefill fp32-ort/int8-static": ">= 1.5", "decode fp32-ort/int8-static": ">= 1.5",
               "loss rel. diff int8-dynamic": "<= 0.02", "loss rel. diff int8-static": "<= 0.02"}
    m, t = res["model"], res["training"]
    fe = t.get("final_eval") or {}
    trained = (f"trained {t['steps']} steps (of a {t['scheduled_steps']}-step schedule, {t['batch_size']} x "
               f"{t['seq_len']} tokens each) in {t['minutes']} min on {t['data']}, final val loss "
               f"{fe.get('loss', float('nan')):.4f}" if t.get("steps") else "training record not found")
    overrides = "".join(" --set " + kv for kv in res.get("export_set", []))
    chunk = f", chunk {res['export_chunk']}" if res["prefill_attention"] == "windowed" else ""
    lines = [f"Device: {res['device']}, torch {res['torch']}, onnxruntime {res['onnxruntime']}; model "
             f"{m['layers']} x {m['hidden']}, {m['experts']} experts, vocab {m['vocab']}, {m['params'] / 1e6:.2f}M "
             f"params, {trained}; held-out data {res['data']}, {res['eval_tokens']} tokens; export config "
             f"{Path(res['export_config']).name}{overrides} (prefill attention {res['prefill_attention']}{chunk})", "",
             f"| model | val loss | perplexity | next-token acc | argmax = FP32 "
             f"| greedy = FP32 ({res['greedy_prompts']} x 32) | max abs logit diff vs FP32 |",
             "|---|---|---|---|---|---|---|"]
    for r in res["results"]:
        lines.append(f"| {r['model']} | {r['val_loss']:.4f} | {r['val_ppl']:.2f} | {r['val_acc'] * 100:.2f}% "
                     f"| {r['argmax_agreement'] * 100:.2f}% | {r['greedy_agreement'] * 100:.1f}% "
                     f"| {r['max_abs_logit_diff']:.3g} |")
    lines += ["", f"| model | size (MB) | x smaller than safetensors | x smaller than FP32 ONNX "
                  f"| prefill {res['prefill_len']} (ms) | decode (ms/token) |", "|---|---|---|---|---|---|"]
    for r in res["results"]:
        lines.append(f"| {r['model']} | {r['size_mb']:.1f} | {r['safetensors_over_size']:.2f} "
                     f"| {r['fp32_onnx_over_size']:.2f} | {r['prefill_ms']:.1f} | {r['decode_ms_per_token']:.2f} |")
    lines += ["", "| ratio | value | target |", "|---|---|---|"]
    for k, v in res["ratios"].items():
        lines.append(f"| {k} | {v:.3f} | {targets.get(k, '')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, default=None, help="a trained run directory; default: train one here")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="export recipe config (YAML)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override an export config value by its dotted path, e.g. prefill_attention=dense "
                        "or calibration.windows=8 (repeatable)")
    p.add_argument("--data", type=Path, default=None,
                   help="held-out corpus (default: the one the model trained on; when training here, "
                        "Tiny Shakespeare if present)")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="where tokenized corpora are cached")
    p.add_argument("--preset", default="small", help="preset trained here when --model-dir is not given")
    p.add_argument("--vocab-size", type=int, default=None, help="tokenizer vocabulary when training here")
    p.add_argument("--train-seconds", type=float, default=300, help="training budget when training here")
    p.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime intra-op threads")
    p.add_argument("--prefill-len", type=int, default=512, help="prompt tokens of the prefill timing")
    p.add_argument("--decode-tokens", type=int, default=16, help="decode steps timed after the prefill")
    p.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds (median)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per held-out window")
    p.add_argument("--eval-batches", type=int, default=16, help="held-out batches of 4 windows")
    p.add_argument("--greedy-prompts", type=int, default=8, help="held-out prompts for greedy agreement")
    p.add_argument("--out", type=Path, default=None, help="results folder (default: docs/results)")
    p.add_argument("--name", default="quantization", help="results file name (NAME.json, NAME.md)")
    args = p.parse_args()
    if any("=" not in kv for kv in args.set):
        p.error("--set takes KEY=VALUE, e.g. --set prefill_attention=dense")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger().setLevel(logging.WARNING)
    for name in ("quantization", "autoglm"):
        logging.getLogger(name).setLevel(logging.INFO)
    res = run(args)
    save_results(args.out, args.name, res, to_markdown(res))


if __name__ == "__main__":
    main()
