"""FP32 PyTorch vs FP32 ONNX Runtime vs INT8 dynamic vs INT8 static (QDQ), side by side in one run.

The reference table's columns: model type, size (MB), prefill latency for 512 tokens and
per-token decode latency (ms, batch 1, median of interleaved repeats), held-out loss, and greedy-token
agreement with FP32 PyTorch (32 free-running greedy tokens from held-out prompts,
position by position), plus next-token argmax agreement on the held-out windows. The
PyTorch INT8 row is torch's own dynamic (weight) int8 for nn.Linear, the candidate
"native int8 path for the PyTorch engine".

Model: --model-dir, or a `small` model trained here for --train-seconds on Tiny
Shakespeare (../shared/data) when present, else on the built-in corpus. Held-out data:
the last 10% of the corpus tokens (the training split never sees it); evaluation windows
come from its start, calibration windows from its end (disjoint).

Writes benchmarks/results/quantization.{json,md}.

    python benchmarks/quantization.py --train-seconds 300
    python benchmarks/quantization.py --model-dir runs/a

Targets (issue #6): INT8 files >= 3.5x smaller than FP32, INT8 >= 1.5x lower latency than
FP32 ONNX Runtime, held-out loss within 2% of FP32.
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from autoglm.data import build_token_cache, iter_eval_batches, read_corpus
from autoglm.export import OrtCausalLM, export_onnx, load_model_dir, quantize_export
from autoglm.export.quantize import calibration_windows
from autoglm.export.runtime import evaluate_ort
from autoglm.export.storage import directory_size_mb
from autoglm.tokenizer import load_tokenizer
from autoglm.training import TrainConfig, evaluate
from autoglm.recipes.common import ModelSpec, TextData
from autoglm.recipes.pretrain import PretrainConfig, pretrain
from results_io import save_results

ROOT = Path(__file__).resolve().parent
SHAKESPEARE = ROOT.parent.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
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


def argmax_of(lm, batches) -> np.ndarray:
    return np.concatenate([lm.prefill(x.numpy())[0].argmax(-1).ravel() for x, _ in batches])


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="autoglm-quant-bench-"))
    data = args.data if args.data is not None else (SHAKESPEARE if SHAKESPEARE.is_file() else None)
    if args.model_dir is None:
        log.info("training %s for %ds on %s", args.preset, args.train_seconds, data or "the built-in corpus")
        cfg = TrainConfig(batch_size=8, seq_len=256, max_steps=100000, max_seconds=args.train_seconds,
                          warmup_steps=30, eval_every=0, save_every=0, eval_batches=4)
        pretrain(PretrainConfig(out=work / "model", model=ModelSpec(args.preset, args.vocab_size),
                                data=TextData(data, work / "cache"), train=cfg, sample_prompt=""), progress=False)
        model_dir = work / "model"
    else:
        model_dir = Path(args.model_dir)
    model = load_model_dir(model_dir)
    tok = load_tokenizer(model_dir)
    val = build_token_cache(read_corpus(data), tok, work / "cache").val
    eval_batches = list(iter_eval_batches(val, 4, args.seq_len, max_batches=args.eval_batches))
    n_eval_tokens = sum(x.numel() for x, _ in eval_batches) + len(eval_batches)
    calib = calibration_windows(val, args.calib_windows, args.seq_len)
    if n_eval_tokens > len(val) - len(calib) * args.seq_len:
        raise ValueError("held-out split too small for disjoint evaluation and calibration windows; "
                         "lower --eval-batches / --calib-windows / --seq-len")
    dirs = {"fp32": work / "onnx-fp32", "int8": work / "onnx-int8", "int8-static": work / "onnx-int8-static"}
    t = time.perf_counter()
    export_onnx(model_dir, dirs["fp32"], model=model, prefill_attention=args.prefill_attention,
                chunk=args.export_chunk)
    log.info("exported in %.0fs", time.perf_counter() - t)
    quantize_export(dirs["fp32"], dirs["int8"], "int8")
    quantize_export(dirs["fp32"], dirs["int8-static"], "int8-static", calibration=calib)

    fp32_copy = load_model_dir(model_dir)
    spec = {name: torch.ao.quantization.default_dynamic_qconfig for name, mod in fp32_copy.named_modules()
            if isinstance(mod, torch.nn.Linear) and ".router" not in name}  # the router reads .weight directly
    torch_int8 = torch.ao.quantization.quantize_dynamic(fp32_copy, spec, dtype=torch.qint8)
    torch_int8_path = work / "torch-int8.pt"
    torch.save(torch_int8.state_dict(), torch_int8_path)
    rows = {
        "FP32 PyTorch": (TorchLM(model), (model_dir / "model.safetensors").stat().st_size / 1e6),
        "INT8 PyTorch (torch dynamic, Linear)": (TorchLM(torch_int8), torch_int8_path.stat().st_size / 1e6),
        "FP32 ONNX Runtime": (OrtLM(OrtCausalLM(dirs["fp32"], threads=args.threads)), directory_size_mb(dirs["fp32"])),
        "INT8 dynamic (ORT)": (OrtLM(OrtCausalLM(dirs["int8"], threads=args.threads)), directory_size_mb(dirs["int8"])),
        "INT8 static QDQ (ORT)": (OrtLM(OrtCausalLM(dirs["int8-static"], threads=args.threads)),
                                  directory_size_mb(dirs["int8-static"])),
    }
    prompt = val[: args.prefill_len][None].astype(np.int64)
    prompts = [val[i * 97: i * 97 + 16][None].astype(np.int64) for i in range(args.greedy_prompts)]
    ref_greedy = [greedy(rows["FP32 PyTorch"][0], p, 32) for p in prompts]
    ref_argmax = argmax_of(rows["FP32 PyTorch"][0], eval_batches)
    times = timings({k: v[0] for k, v in rows.items()}, prompt, args.decode_tokens, args.repeats)
    results = []
    for name, (lm, size) in rows.items():
        pre_ms, dec_ms = times[name]
        if isinstance(lm, TorchLM):
            ev = evaluate(lm.model, eval_batches)
        else:
            ev = evaluate_ort(lm.lm, eval_batches)
        g = [greedy(lm, p, 32) for p in prompts]
        agree = float(np.mean([np.mean(np.array(a) == np.array(b)) for a, b in zip(g, ref_greedy)]))
        results.append({"model": name, "size_mb": size, "prefill_ms": pre_ms, "decode_ms_per_token": dec_ms,
                        "heldout_loss": ev["loss"], "greedy_agreement": agree,
                        "argmax_agreement": float(np.mean(argmax_of(lm, eval_batches) == ref_argmax))})
        log.info("%s", results[-1])
    by = {r["model"]: r for r in results}
    f, d, s = by["FP32 ONNX Runtime"], by["INT8 dynamic (ORT)"], by["INT8 static QDQ (ORT)"]
    ratios = {
        "size fp32/int8-dynamic": f["size_mb"] / d["size_mb"],
        "size fp32/int8-static": f["size_mb"] / s["size_mb"],
        "prefill fp32-ort/int8-dynamic": f["prefill_ms"] / d["prefill_ms"],
        "decode fp32-ort/int8-dynamic": f["decode_ms_per_token"] / d["decode_ms_per_token"],
        "prefill fp32-ort/int8-static": f["prefill_ms"] / s["prefill_ms"],
        "decode fp32-ort/int8-static": f["decode_ms_per_token"] / s["decode_ms_per_token"],
        "loss rel. diff int8-dynamic": (d["heldout_loss"] - f["heldout_loss"]) / f["heldout_loss"],
        "loss rel. diff int8-static": (s["heldout_loss"] - f["heldout_loss"]) / f["heldout_loss"],
        "prefill fp32-torch/fp32-ort": by["FP32 PyTorch"]["prefill_ms"] / f["prefill_ms"],
        "decode fp32-torch/int8-torch": (by["FP32 PyTorch"]["decode_ms_per_token"]
                                         / by["INT8 PyTorch (torch dynamic, Linear)"]["decode_ms_per_token"]),
    }
    cfg = model.config
    return {"device": f"{platform.machine()} ({args.threads} threads, shared machine)",
            "torch": torch.__version__, "onnxruntime": __import__("onnxruntime").__version__,
            "model": {"dir": str(model_dir), "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size,
                      "experts": cfg.num_experts, "vocab": cfg.vocab_size,
                      "params": model.num_parameters_summary()["total"]},
            "data": str(data or "builtin:stdlib-docstrings"), "prefill_len": args.prefill_len,
            "prefill_attention": args.prefill_attention, "export_chunk": args.export_chunk,
            "eval_tokens": int(sum(y.numel() for _, y in eval_batches)), "calibration_windows": len(calib),
            "results": results, "ratios": ratios}


def to_markdown(res: dict) -> str:
    targets = {"size fp32/int8-dynamic": ">= 3.5", "size fp32/int8-static": ">= 3.5",
               "prefill fp32-ort/int8-dynamic": ">= 1.5", "decode fp32-ort/int8-dynamic": ">= 1.5",
               "prefill fp32-ort/int8-static": ">= 1.5", "decode fp32-ort/int8-static": ">= 1.5",
               "loss rel. diff int8-dynamic": "<= 0.02", "loss rel. diff int8-static": "<= 0.02"}
    m = res["model"]
    lines = [f"Device: {res['device']}, torch {res['torch']}, onnxruntime {res['onnxruntime']}; model "
             f"{m['layers']} x {m['hidden']}, {m['experts']} experts, vocab {m['vocab']}, {m['params'] / 1e6:.2f}M "
             f"params; data {Path(res['data']).name}; held-out tokens {res['eval_tokens']}; exported prefill "
             f"attention {res.get('prefill_attention', 'dense')}"
             + (f" (chunk {res['export_chunk']})" if res.get("prefill_attention") == "windowed" else ""), "",
             f"| model | size (MB) | prefill {res['prefill_len']} (ms) | decode (ms/token) | held-out loss "
             f"| greedy agreement | next-token agreement |", "|---|---|---|---|---|---|---|"]
    for r in res["results"]:
        lines.append(f"| {r['model']} | {r['size_mb']:.1f} | {r['prefill_ms']:.1f} | {r['decode_ms_per_token']:.2f} "
                     f"| {r['heldout_loss']:.4f} | {r['greedy_agreement'] * 100:.1f}% "
                     f"| {r['argmax_agreement'] * 100:.1f}% |")
    lines += ["", "| ratio | value | target |", "|---|---|---|"]
    for k, v in res["ratios"].items():
        lines.append(f"| {k} | {v:.3f} | {targets.get(k, '')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, default=None, help="a saved model; default: train one here")
    p.add_argument("--data", type=Path, default=None, help="corpus (default: Tiny Shakespeare if present)")
    p.add_argument("--preset", default="small")
    p.add_argument("--vocab-size", type=int, default=None)
    p.add_argument("--train-seconds", type=float, default=300)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prefill-len", type=int, default=512)
    p.add_argument("--prefill-attention", choices=("windowed", "dense"), default="windowed",
                   help="attention of the exported prefill graph (dense: the (T, T)-mask reference)")
    p.add_argument("--export-chunk", type=int, default=32, help="query chunk of the windowed prefill attention")
    p.add_argument("--decode-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--calib-windows", type=int, default=32)
    p.add_argument("--greedy-prompts", type=int, default=8)
    p.add_argument("--out", type=Path, default=None, help="results folder (default: docs/results)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger().setLevel(logging.WARNING)
    for name in ("quantization", "autoglm"):
        logging.getLogger(name).setLevel(logging.INFO)
    res = run(args)
    save_results(args.out, "quantization", res, to_markdown(res))


if __name__ == "__main__":
    main()
