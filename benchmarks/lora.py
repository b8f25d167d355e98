"""LoRA vs full fine-tuning for domain adaptation of a pre-trained `small` model, side by side.

1. `small` is pre-trained on the base domain (the built-in corpus of Python standard
   library docstrings) with the pretrain recipe; its tokenizer is kept for both domains.
2. It is adapted to a second text (Tiny Shakespeare from ../shared/data, or --new-data)
   twice, for the same steps and batches, with `autoglm.training.finetune.finetune`:
   full fine-tuning, and LoRA through PEFT (default r=8, alpha=16, q_proj/v_proj).
   Each run happens in its own fresh process (multiprocessing spawn) so its peak memory
   can be read: on CPU the peak resident set (sampled every 2 ms while `finetune` runs:
   model load, training, evaluation) minus the resident set just before it; on CUDA
   torch.cuda.max_memory_allocated.
3. Held-out loss on the new domain, and on the base domain (forgetting), before and after.

Writes benchmarks/results/lora.{json,md}.

    python benchmarks/lora.py                                   # default: ~10 min on 2 CPU cores
    python benchmarks/lora.py --base-steps 10 --steps 10 --seq-len 64      # smoke run

Targets (issue #4): LoRA trains < 1% of the parameters and its new-domain held-out loss
is within 5% of full fine-tuning's.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import platform
import resource
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
SHAKESPEARE = ROOT.parent.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


def _rss_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() // 1024


class PeakRSS:
    """Samples this process's resident set every `interval` s in a thread; `peak_kb` is the
    largest value seen between start() and stop() (ru_maxrss cannot be reset per phase)."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval, self.peak_kb, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, _rss_kb())
            time.sleep(self.interval)

    def start(self) -> "PeakRSS":
        self.peak_kb = _rss_kb()
        self._thread.start()
        return self

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak_kb, _rss_kb())


def _cfg(args, steps: int, lr: float):
    from autoglm.training import TrainConfig

    return TrainConfig(batch_size=args.batch_size, seq_len=args.seq_len, lr=lr, max_steps=steps,
                       warmup_steps=max(1, steps // 10), eval_every=0, save_every=0, eval_batches=args.eval_batches,
                       seed=args.seed, log_every=max(1, steps // 5))


def _eval_on(model, tokens, args) -> dict:
    from autoglm.training import evaluate
    from autoglm.training.pretrain import eval_batches_for

    return evaluate(model, eval_batches_for(tokens.val, _cfg(args, 1, 1e-3))())


def _child(mode: str, args, base_dir: str, new_data: str, cache: str, q) -> None:
    """One fine-tuning run in a fresh process; puts its results on q."""
    torch.set_num_threads(args.threads)
    from autoglm.data import build_token_cache, read_corpus
    from autoglm.tokenizer import load_tokenizer
    from autoglm.training.finetune import finetune

    tok = load_tokenizer(base_dir)
    base_tokens = build_token_cache(read_corpus(None), tok, cache)
    device = args.device
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    rss0 = _rss_kb()
    sampler = PeakRSS().start()
    t0 = time.perf_counter()
    lora = mode == "lora"
    model, result, info = finetune(base_dir, new_data, Path(args.work) / mode, _cfg(args, args.steps, args.lora_lr
                                   if lora else args.lr), lora=lora, cache_dir=cache, progress=False,
                                   device=device, targets=args.targets.split(","), r=args.rank,
                                   alpha=2 * args.rank)
    seconds = time.perf_counter() - t0
    peak_kb = sampler.stop()
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else (peak_kb - rss0) / 1024)
    base_eval = _eval_on(model, base_tokens, args)
    q.put({"mode": mode, "trainable": info["trainable_params"], "total": info["total_params"],
           "new_before": info["eval_before"]["loss"], "new_after": info["eval_after"]["loss"],
           "new_acc_after": info["eval_after"]["accuracy"], "base_after": base_eval["loss"],
           "peak_train_mem_mb": peak, "seconds": seconds, "tokens_per_s": result.tokens_per_s})


def run(args) -> dict:
    from autoglm.training.pretrain import pretrain

    new_data = args.new_data or (SHAKESPEARE if SHAKESPEARE.is_file() else None)
    if new_data is None:
        raise SystemExit(f"no second-domain text: {SHAKESPEARE} is missing; pass --new-data FILE")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="autoglm-lora-bench-"))
    args.work = str(work)
    cache = work / "cache"
    t0 = time.perf_counter()
    base, prepared, res = pretrain("small", work / "base", _cfg(args, args.base_steps, args.base_lr), data=None,
                                   cache_dir=cache, vocab_size=args.vocab_size, progress=False)
    logging.info("base model pre-trained on the built-in corpus in %.0f s", time.perf_counter() - t0)
    base_on_base = res.final_eval["loss"]
    # tokenize the new domain once here, so neither child's peak memory includes it
    from autoglm.data import build_token_cache, read_corpus
    build_token_cache(read_corpus(new_data), prepared.tokenizer, cache, val_fraction=0.1)
    ctx = mp.get_context("spawn")
    rows = {}
    for mode in ("full", "lora"):
        q = ctx.Queue()
        p = ctx.Process(target=_child, args=(mode, args, str(work / "base"), str(new_data), str(cache), q))
        p.start()
        rows[mode] = q.get()
        p.join()
        logging.info("%s fine-tuning: %s", mode, rows[mode])
    full, lora = rows["full"], rows["lora"]
    summary = {
        "lora_trainable_pct": 100 * lora["trainable"] / lora["total"],
        "peak_mem_ratio_lora_over_full": lora["peak_train_mem_mb"] / full["peak_train_mem_mb"],
        "new_domain_loss_ratio_lora_over_full": lora["new_after"] / full["new_after"],
        "base_domain_loss_before": base_on_base,
        "forgetting_full": full["base_after"] - base_on_base,
        "forgetting_lora": lora["base_after"] - base_on_base,
    }
    summary["targets_met"] = {"trainable_lt_1pct": summary["lora_trainable_pct"] < 1.0,
                              "new_loss_within_5pct": summary["new_domain_loss_ratio_lora_over_full"] <= 1.05}
    return {"args": {k: str(v) for k, v in vars(args).items()}, "new_data": str(new_data),
            "base_data": "builtin:stdlib-docstrings",
            "device": f"{platform.machine()} ({args.threads} threads), fp32, torch {torch.__version__}, {args.device}",
            "rows": rows, "summary": summary}


def markdown(res: dict) -> str:
    mem = "peak train mem (MB over pre-train RSS)" if res["args"]["device"] == "cpu" else "peak CUDA mem (MB)"
    out = [f"Device: {res['device']}; base domain: {res['base_data']}; new domain: {res['new_data']}", "",
           f"| method | trainable params | % of model | {mem} | new-domain val loss (before -> after) | "
           f"new-domain acc | base-domain val loss after | tok/s |", "|---|---|---|---|---|---|---|---|"]
    for mode, r in res["rows"].items():
        out.append(f"| {mode} | {r['trainable']:,} | {100 * r['trainable'] / r['total']:.2f}% | "
                   f"{r['peak_train_mem_mb']:.0f} | {r['new_before']:.3f} -> {r['new_after']:.3f} | "
                   f"{100 * r['new_acc_after']:.2f}% | {r['base_after']:.3f} | {r['tokens_per_s']:,.0f} |")
    s = res["summary"]
    out += ["", "| summary | value | target |", "|---|---|---|",
            f"| LoRA targets, rank | {res['args']['targets']}, r={res['args']['rank']} | |",
            f"| LoRA trainable % | {s['lora_trainable_pct']:.2f}% | < 1% |",
            f"| peak training memory LoRA / full | {s['peak_mem_ratio_lora_over_full']:.2f} | |",
            f"| new-domain loss LoRA / full | {s['new_domain_loss_ratio_lora_over_full']:.3f} | <= 1.05 |",
            f"| base-domain loss before fine-tuning | {s['base_domain_loss_before']:.3f} | |",
            f"| forgetting (base loss increase), full | {s['forgetting_full']:+.3f} | |",
            f"| forgetting (base loss increase), LoRA | {s['forgetting_lora']:+.3f} | |"]
    return "\n".join(out) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--new-data", type=Path, default=None, help="Second-domain text (default: Tiny Shakespeare)")
    p.add_argument("--work-dir", type=Path, default=None)
    p.add_argument("--base-steps", type=int, default=200)
    p.add_argument("--base-lr", type=float, default=3e-3)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3, help="Full fine-tuning learning rate")
    p.add_argument("--lora-lr", type=float, default=5e-3, help="LoRA learning rate")
    p.add_argument("--targets", default="q_proj,v_proj", help="LoRA target modules, comma separated "
                                                                 "('experts' = every expert projection)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r (lora_alpha = 2r, as the default 8/16)")
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--eval-batches", type=int, default=10)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--out", type=Path, default=ROOT / "results")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    res = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lora.json").write_text(json.dumps(res, indent=2))
    md = markdown(res)
    (args.out / "lora.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
