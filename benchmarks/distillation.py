"""Two-teacher distillation vs the same student trained from scratch, side by side (DistilBERT style).

1. Teacher A (`small`: sparse attention + MoE) is pre-trained with the pretrain recipe on
   Tiny Shakespeare (../shared/data when present, else the built-in corpus); it trains
   the BPE tokenizer. Teacher B (`standard-small`: dense) trains on the same tokens with
   the same tokenizer.
2. The student (a narrower, shallower `small`) trains for the same steps and on the same
   batches twice: with the distill recipe (`autoglm distill`: both teachers, reference KD
   loss) and with the pretrain recipe from scratch (plain next-token cross-entropy).
3. All four models are evaluated on the same held-out batches.

Reports params (student / teachers), student size %, inference speed-up (forward
latency, median of repeats), training throughput, held-out loss / next-token accuracy
and % of the better teacher's accuracy retained. Writes
docs/results/distillation.{json,md}.

    python benchmarks/distillation.py                      # default: ~15 min on 2 CPU cores
    python benchmarks/distillation.py --teacher-steps 20 --student-steps 20 --seq-len 64   # smoke run
    python benchmarks/distillation.py --work-dir W --reuse-teachers --temperature 2   # student variants, same teachers

`--device cuda` trains and times on a GPU (bf16 autocast training, fp32 evaluation).

Targets (issue #4): the distilled student beats the scratch student on held-out loss and
keeps >= 95% of the better teacher's next-token accuracy at <= 40% of its parameters.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from autoglm.data import iter_eval_batches, prepare_corpus
from autoglm.recipes.common import ModelSpec, TextData
from autoglm.recipes.distill import DistillRecipeConfig, distill
from autoglm.recipes.pretrain import PretrainConfig, pretrain
from autoglm.rundir import RunDir
from autoglm.settings import to_dict
from autoglm.training import TrainConfig, evaluate
from autoglm.training.distill import DistillConfig
from results_io import save_results

ROOT = Path(__file__).resolve().parent
SHAKESPEARE = ROOT.parent.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


def student_spec(args) -> ModelSpec:
    return ModelSpec("small", args.vocab_size, {"hidden_size": args.student_hidden,
                                                "num_hidden_layers": args.student_layers, "num_attention_heads": 4,
                                                "expert_intermediate_size": args.student_expert_size})


def train_cfg(args, steps: int) -> TrainConfig:
    return TrainConfig(batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, max_steps=steps,
                       eval_every=0, save_every=0, eval_batches=args.eval_batches, seed=args.seed,
                       log_every=max(1, steps // 10))


def train_lm(args, out: Path, spec: ModelSpec, steps: int, data, tokenizer=None, seed: int | None = None):
    """The pretrain recipe, as `autoglm train` runs it (shared tokenizer when given)."""
    cfg = PretrainConfig(out=out, model=spec, data=data, train=train_cfg(args, steps), device=args.device,
                         sample_prompt="")
    if seed is not None:
        cfg.train.seed = seed
    shutil.rmtree(out, ignore_errors=True)  # a rerun over --work-dir starts afresh
    return pretrain(cfg, progress=False, tokenizer=tokenizer)


def latencies_ms(models: dict, batch: int, seq_len: int, repeats: int) -> dict[str, float]:
    """Median forward time (ms) per model of one (batch, seq_len) input, no KV cache. The
    models are timed round-robin (one call each per repeat, after a warm-up), so load from
    other processes on a shared machine hits all of them alike."""
    vocab = min(m.config.vocab_size for m in models.values())
    device = next(next(iter(models.values())).parameters()).device
    x = torch.randint(2, vocab, (batch, seq_len), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode():
        for i in range(repeats + 1):
            for name, model in models.items():
                sync()
                t = time.perf_counter()
                model(x, use_cache=False)
                sync()
                if i:
                    times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1000 for k, v in times.items()}


def total_params(model) -> int:
    return model.num_parameters_summary()["total"]


def run(args) -> dict:
    corpus = args.data if args.data is not None else (SHAKESPEARE if SHAKESPEARE.is_file() else None)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="autoglm-distill-bench-"))
    data = TextData(corpus, work / "cache")
    dev = args.device
    # ---- teachers (or, with --reuse-teachers, the ones an earlier run left in --work-dir)
    t_cfg = train_cfg(args, args.teacher_steps)
    stats_file = work / "teacher_stats.json"
    if args.reuse_teachers and stats_file.is_file():
        stats = json.loads(stats_file.read_text())
        if stats["teacher_config"] != {k: str(v) for k, v in vars(t_cfg).items()}:
            raise SystemExit(f"{work} holds teachers trained with {stats['teacher_config']}; not reusing them")
        teacher_a, tok = RunDir.open(work / "teacher_a").load(device=dev)
        teacher_b = RunDir.open(work / "teacher_b").load_model(device=dev)
        tps = stats["tokens_per_s"]
        logging.info("reusing the teachers in %s", work)
    else:
        t0 = time.perf_counter()
        a = train_lm(args, work / "teacher_a", ModelSpec(args.teacher_a, args.vocab_size), args.teacher_steps, data)
        logging.info("teacher A (%s) trained in %.0f s", args.teacher_a, time.perf_counter() - t0)
        t0 = time.perf_counter()
        b = train_lm(args, work / "teacher_b", ModelSpec(args.teacher_b, args.vocab_size), args.teacher_steps, data,
                     tokenizer=a.tokenizer, seed=args.seed + 1)
        logging.info("teacher B (%s) trained in %.0f s", args.teacher_b, time.perf_counter() - t0)
        teacher_a, teacher_b, tok = a.model, b.model, a.tokenizer
        tps = [a.result.tokens_per_s, b.result.tokens_per_s]
        stats_file.write_text(json.dumps({"teacher_config": {k: str(v) for k, v in vars(t_cfg).items()},
                                          "tokens_per_s": tps}))
    # ---- students: same init seed, same batches, same steps
    kd_cfg = DistillRecipeConfig(
        teachers=(work / "teacher_a", work / "teacher_b"), out=work / "student_kd", student=student_spec(args),
        data=data, train=train_cfg(args, args.student_steps), logit_cache=work / "logit-cache", device=dev,
        distill=DistillConfig(alpha=args.alpha, alpha_end=args.alpha_end, rounds=args.rounds,
                              temperature=args.temperature, combine=args.combine, hard_weight=args.hard_weight,
                              cache_top_k=args.cache_top_k))
    shutil.rmtree(kd_cfg.out, ignore_errors=True)  # a rerun over --work-dir: start the student afresh
    shutil.rmtree(work / "logit-cache", ignore_errors=True)
    t0 = time.perf_counter()
    kd = distill(kd_cfg, progress=False)
    distilled, res_d = kd.model, kd.result
    time_kd = time.perf_counter() - t0
    t0 = time.perf_counter()
    sc = train_lm(args, work / "student_scratch", student_spec(args), args.student_steps, data, tokenizer=tok)
    scratch, res_s = sc.model, sc.result
    time_scratch = time.perf_counter() - t0
    val = prepare_corpus(corpus, data.cache_dir, tokenizer=tok).tokens.val
    # ---- evaluation on the same held-out batches
    models = {"teacher A (" + args.teacher_a + ")": (teacher_a, tps[0]),
              "teacher B (" + args.teacher_b + ")": (teacher_b, tps[1]),
              "student, distilled": (distilled, res_d.tokens_per_s), "student, scratch": (scratch, res_s.tokens_per_s)}
    rows = {}
    lat = latencies_ms({k: m.to(dev).eval() for k, (m, _) in models.items()}, args.batch_size, args.seq_len,
                       args.repeats)
    for name, (model, train_tps) in models.items():
        model.eval()
        ev = evaluate(model, iter_eval_batches(val, args.batch_size, args.seq_len, max_batches=args.eval_batches))
        rows[name] = {"params": total_params(model), "active": model.num_parameters_summary()["active"],
                      "val_loss": ev["loss"], "val_acc": ev["accuracy"], "train_tokens_per_s": train_tps,
                      "latency_ms": lat[name]}
    teachers = [k for k in rows if k.startswith("teacher")]
    best = max(teachers, key=lambda k: rows[k]["val_acc"])
    kd, sc = rows["student, distilled"], rows["student, scratch"]
    summary = {
        "better_teacher": best,
        "student_size_pct": 100 * kd["params"] / rows[best]["params"],
        "inference_speedup_vs_better_teacher": rows[best]["latency_ms"] / kd["latency_ms"],
        "accuracy_retained_pct": 100 * kd["val_acc"] / rows[best]["val_acc"],
        "scratch_accuracy_retained_pct": 100 * sc["val_acc"] / rows[best]["val_acc"],
        "loss_delta_kd_minus_scratch": kd["val_loss"] - sc["val_loss"],
        "train_time_ratio_kd_over_scratch": time_kd / time_scratch,
    }
    summary["targets_met"] = {
        "kd_beats_scratch_loss": summary["loss_delta_kd_minus_scratch"] < 0,
        "retained_ge_95pct": summary["accuracy_retained_pct"] >= 95.0,
        "size_le_40pct": summary["student_size_pct"] <= 40.0,
    }
    return {"args": {k: str(v) for k, v in vars(args).items()}, "distill_config": to_dict(kd_cfg),
            "data": str(corpus or "builtin:stdlib-docstrings"),
            "device": (f"{torch.cuda.get_device_name()}, " if dev.startswith("cuda") else "") +
                      f"{platform.machine()} ({torch.get_num_threads()} threads), "
                      f"{'bf16 autocast training, fp32 eval' if dev.startswith('cuda') else 'fp32'}, "
                      f"torch {torch.__version__}",
            "rows": rows, "summary": summary}


def markdown(res: dict) -> str:
    out = [f"Device: {res['device']}; data: {res['data']}", "",
           "| model | params | active | size % of better teacher | val loss | val acc | fwd latency (ms) | "
           "train tok/s |", "|---|---|---|---|---|---|---|---|"]
    best = res["rows"][res["summary"]["better_teacher"]]
    for name, r in res["rows"].items():
        out.append(f"| {name} | {r['params'] / 1e6:.2f}M | {r['active'] / 1e6:.2f}M | "
                   f"{100 * r['params'] / best['params']:.1f}% | {r['val_loss']:.3f} | {100 * r['val_acc']:.2f}% | "
                   f"{r['latency_ms']:.1f} | {r['train_tokens_per_s']:,.0f} |")
    s = res["summary"]
    kd, sc = res["rows"]["student, distilled"], res["rows"]["student, scratch"]
    out += ["", "| summary | value | target |", "|---|---|---|",
            f"| training steps, teachers / each student | {res['args']['teacher_steps']} / "
            f"{res['args']['student_steps']} | |",
            f"| student size % of better teacher | {s['student_size_pct']:.1f}% | <= 40% |",
            f"| inference speed-up vs better teacher | {s['inference_speedup_vs_better_teacher']:.2f}x | |",
            f"| accuracy retained (distilled) | {s['accuracy_retained_pct']:.1f}% | >= 95% |",
            f"| accuracy retained (scratch) | {s['scratch_accuracy_retained_pct']:.1f}% | |",
            f"| val accuracy distilled - scratch | {100 * (kd['val_acc'] - sc['val_acc']):+.2f} points | |",
            f"| val loss distilled - scratch | {s['loss_delta_kd_minus_scratch']:+.3f} | < 0 |",
            f"| training time distilled / scratch | {s['train_time_ratio_kd_over_scratch']:.2f}x | |"]
    return "\n".join(out) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=None, help="Corpus (default: Tiny Shakespeare if present)")
    p.add_argument("--work-dir", type=Path, default=None, help="Where models are written (default: a temp dir)")
    p.add_argument("--teacher-a", default="small")
    p.add_argument("--teacher-b", default="standard-small")
    p.add_argument("--teacher-steps", type=int, default=300)
    p.add_argument("--student-steps", type=int, default=300)
    p.add_argument("--student-hidden", type=int, default=160)
    p.add_argument("--student-layers", type=int, default=4)
    p.add_argument("--student-expert-size", type=int, default=224)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--alpha", type=float, default=0.7)
    p.add_argument("--alpha-end", type=float, default=0.7)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--combine", default="confidence", choices=["fixed", "confidence"])
    p.add_argument("--hard-weight", type=float, default=0.5)
    p.add_argument("--cache-top-k", type=int, default=0)
    p.add_argument("--eval-batches", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="cpu")
    p.add_argument("--reuse-teachers", action="store_true",
                   help="Reuse the teachers an earlier run with the same teacher settings left in --work-dir")
    p.add_argument("--out", type=Path, default=None, help="results folder (default: docs/results)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    res = run(args)
    save_results(args.out, "distillation", res, markdown(res))


if __name__ == "__main__":
    main()
