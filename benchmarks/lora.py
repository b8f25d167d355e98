"""LoRA vs full fine-tuning for domain adaptation of a pre-trained `small` model, side by side.

1. `small` is pre-trained with the pretrain recipe on the base corpus: the built-in
   corpus of Python standard-library docstrings plus, with --base-share S (default 0.25),
   the first S of the new-domain file (cut at a blank line), as a general pre-trained LM
   has seen some text like the one it is later adapted to; the BPE tokenizer is trained
   on that base corpus and kept for both domains. --base-share 0 pre-trains on the
   docstrings alone (domain replacement: the new domain shares almost nothing with the
   base). The docstrings' held-out tail is never trained on; forgetting is measured there.
2. It is adapted to the rest of the second text (Tiny Shakespeare from ../shared/data, or
   --new-data; the part given to the base never reaches the adaptation or held-out text)
   for the same steps and batches, with the finetune recipe (`autoglm finetune`): full
   fine-tuning, LoRA through PEFT with the default config (r=8, alpha=16, q_proj/v_proj)
   and, optionally (--wide-targets), LoRA on more modules. --adapt-share F < 1 trains on
   only the first F of the adaptation text (low-resource adaptation); --steps takes a
   comma-separated grid, chosen on validation together with the learning rate.
   The new domain's held-out tail (last 10%) is split in two: its first half is the
   *validation* split, its second half the *test* split. Each method trains once per
   learning rate in its grid (--lr, --lora-lr: comma-separated) and the rate with the
   lowest validation loss is chosen; the test split is only reported, never used to choose.
   Each run happens in its own fresh process (multiprocessing spawn) so its peak memory
   can be read: on CPU the peak resident set (sampled every 2 ms while `finetune` runs:
   model load, training, evaluation, checkpointing) minus the resident set just before
   it; on CUDA torch.cuda.max_memory_allocated.
3. Test loss on the new domain, and held-out loss on the base domain (forgetting), before
   and after.

Writes docs/results/lora.{json,md}.

    python benchmarks/lora.py                  # base 3000 steps, then 3 + 3 fine-tuning runs of 300 steps (--device cuda)
    python benchmarks/lora.py --base-steps 10 --steps 10 --seq-len 64 --lr 1e-3 --lora-lr 1e-2   # smoke run

Targets (issue #4): LoRA trains < 1% of the parameters and its new-domain held-out loss
is within 5% of full fine-tuning's.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import platform
import queue
import resource
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from autoglm.rundir import RunDir
from results_io import save_results

ROOT = Path(__file__).resolve().parent
SHAKESPEARE = ROOT.parent.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
HELD_OUT = 0.1  # the adaptation text's last 10% of tokens: validation and test halves


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


def _cfg(args, steps: int, lr: float, eval_every: int = 0):
    from autoglm.training import TrainConfig

    return TrainConfig(batch_size=args.batch_size, seq_len=args.seq_len, lr=lr, max_steps=steps,
                       eval_every=eval_every, save_every=0, eval_batches=args.eval_batches,
                       seed=args.seed, log_every=max(1, steps // 5))


def _batches(tokens, args):
    """The fixed held-out batches of a token split (the same ones at every evaluation)."""
    from autoglm.data import iter_eval_batches

    return lambda: iter_eval_batches(tokens, args.batch_size, args.seq_len, max_batches=args.eval_batches)


def _split_heldout(tokens):
    """The new domain's held-out tail -> (validation, test): its first and second halves."""
    half = len(tokens.val) // 2
    return tokens.val[:half], tokens.val[half:]


def _eval_on(model, val_tokens, args) -> dict:
    from autoglm.training import evaluate

    return evaluate(model, _batches(val_tokens, args)())


def _child(run: dict, args, base_dir: str, new_data: str, cache: str, q) -> None:
    """One fine-tuning run in a fresh process; puts its results (or {"error": ...}) on q."""
    try:
        _child_run(run, args, base_dir, new_data, cache, q)
    except BaseException as e:  # the parent waits on q: never leave it hanging
        q.put({"error": f"{type(e).__name__}: {e}"})
        raise


def _child_run(run: dict, args, base_dir: str, new_data: str, cache: str, q) -> None:
    train_data = run.get("train_data") or new_data  # --adapt-share < 1: a prefix of the adaptation text
    torch.set_num_threads(args.threads)
    from autoglm.data import build_token_cache, read_corpus
    from autoglm.recipes.finetune import FinetuneConfig, LoraSpec, finetune
    from autoglm.tokenizer import load_tokenizer

    tok = load_tokenizer(base_dir)
    base_tokens = build_token_cache(read_corpus(None), tok, cache)
    new_tokens = build_token_cache(read_corpus(new_data), tok, cache, val_fraction=HELD_OUT,
                                   source=str(Path(new_data).resolve()))
    val, test = _split_heldout(new_tokens)
    cfg = _cfg(args, run["steps"], run["lr"], args.eval_every)
    device = args.device
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    stop = BestStep(test, base_tokens.val, args) if args.eval_every else None
    rss0 = _rss_kb()
    sampler = PeakRSS().start()
    t0 = time.perf_counter()
    ft = FinetuneConfig(base=Path(base_dir), data=Path(train_data), out=Path(args.work) / run["name"], train=cfg,
                        lora=LoraSpec(run["lora"], tuple(run["targets"] or ("q_proj", "v_proj")), args.rank,
                                      2 * args.rank),
                        val_fraction=0.0 if run.get("train_data") else HELD_OUT, cache_dir=Path(cache), device=device)
    out = finetune(ft, progress=False, eval_data=_batches(val, args), callbacks=[stop] if stop else ())
    model, result, info = out.model, out.result, out.info
    seconds = time.perf_counter() - t0
    peak_kb = sampler.stop()
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else (peak_kb - rss0) / 1024)
    if stop is None:  # the model after the last step
        test_eval, base_eval = _eval_on(model, test, args), _eval_on(model, base_tokens.val, args)
        best = {"step": run["steps"], "val": info["eval_after"]["loss"], "test": test_eval, "base": base_eval}
    else:  # early stopping: the step with the best validation loss (the final evaluation included)
        best = stop.best
    q.put({**run, "trainable": info["trainable_params"], "total": info["total_params"],
           "val_before": info["eval_before"]["loss"], "val_after": best["val"], "best_step": best["step"],
           "test_after": best["test"]["loss"], "test_acc_after": best["test"]["accuracy"],
           "base_after": best["base"]["loss"], "peak_train_mem_mb": peak, "seconds": seconds,
           "tokens_per_s": result.tokens_per_s})


class BestStep:
    """Trainer callback for early stopping without checkpoints: at every evaluation whose
    validation loss is the best so far, the test and base-domain losses of the model as it is
    then are recorded (`best`), so a run reports the step validation would have stopped at."""

    def __init__(self, test, base_val, args) -> None:
        self.test, self.base_val, self.args, self.best = test, base_val, args, None

    def on_eval(self, trainer, row: dict) -> None:
        if self.best is None or row["val_loss"] < self.best["val"]:
            self.best = {"step": row["step"], "val": row["val_loss"],
                         "test": _eval_on(trainer.model, self.test, self.args),
                         "base": _eval_on(trainer.model, self.base_val, self.args)}


def _run_children(specs: list[dict], args, work: Path, new_data, cache: Path) -> dict[str, dict]:
    """Each fine-tuning run in its own spawned process, at most --parallel at a time (each with
    --threads threads; its peak memory is its own process's). Returns {run name: result}."""
    ctx = mp.get_context("spawn")
    pending, active, done = list(specs), [], {}
    while pending or active:
        while pending and len(active) < max(1, args.parallel):
            spec = pending.pop(0)
            shutil.rmtree(work / spec["name"], ignore_errors=True)  # a run dir left by an earlier invocation
            q = ctx.Queue()
            p = ctx.Process(target=_child, args=(spec, args, str(work / "base"), str(new_data), str(cache), q))
            p.start()
            active.append((spec, p, q))
        (spec, p, q), out = _first_result(active)
        p.join()
        active.remove((spec, p, q))
        if "error" in out:
            for _, other, _ in active:
                other.terminate()
            raise SystemExit(f"{spec['name']} failed: {out['error']}")
        done[spec["name"]] = out
        logging.info("%s: %s", spec["name"], out)
    return done


def _first_result(active: list[tuple[dict, Any, Any]]) -> tuple[tuple[dict, Any, Any], dict]:
    """Wait for the first of the (spec, process, queue) runs to put its result; a process that
    exits without one ends the benchmark."""
    while True:
        for item in active:
            try:
                return item, item[2].get(timeout=0.5)
            except queue.Empty:
                if not item[1].is_alive() and item[2].empty():
                    raise SystemExit(f"{item[0]['name']} died (exit code {item[1].exitcode}) without a result")


def _grid(text: str) -> list[float]:
    return [float(v) for v in str(text).split(",") if v.strip()]


def _split_new_domain(new_data: Path, share: float, work: Path) -> tuple[str, Path]:
    """The first `share` of the new-domain file (cut at a blank line) for the base corpus, and
    the rest written to work/adapt.txt as the adaptation text (share 0: the whole file)."""
    if share <= 0:
        return "", Path(new_data)
    text = Path(new_data).read_text(encoding="utf-8")
    cut = text.find("\n\n", int(len(text) * share))
    if cut < 0:
        raise SystemExit(f"--base-share {share} leaves no adaptation text in {new_data}")
    head, rest = text[:cut].strip() + "\n", text[cut:].lstrip("\n")
    adapt = work / "adapt.txt"
    adapt.parent.mkdir(parents=True, exist_ok=True)
    if not adapt.is_file() or adapt.read_text(encoding="utf-8") != rest:
        adapt.write_text(rest, encoding="utf-8")
    return head, adapt


def _adapt_prefix(adapt: Path, share: float, work: Path, tokenizer, cache: Path, n_train: int) -> str:
    """--adapt-share < 1 (low-resource adaptation): the first `share` of the adaptation text's
    training part (cut at a blank line) written to work/adapt_train.txt and tokenized into the
    cache here, as the children's `finetune` will read it (so no child's peak memory includes
    it). The held-out validation and test halves stay those of the whole text; a prefix longer
    than the training part's `n_train` tokens (it would reach them) is refused. Returns the path."""
    from autoglm.data import build_token_cache, read_corpus

    text = Path(adapt).read_text(encoding="utf-8")
    cut = text.find("\n\n", int(len(text) * (1 - HELD_OUT) * share)) if 0 < share < 1 else -1
    if cut < 0:
        raise SystemExit(f"--adapt-share must be in (0, 1) and leave a prefix of the adaptation text; got {share}")
    out = work / "adapt_train.txt"
    out.write_text(text[:cut].strip() + "\n", encoding="utf-8")
    n = len(build_token_cache(read_corpus(out), tokenizer, cache, val_fraction=0.0, source=str(out.resolve())).train)
    if n > n_train:
        raise SystemExit(f"--adapt-share {share}: the prefix ({n} tokens) reaches the held-out tail (the training "
                         f"part has {n_train}); use a smaller share")
    return str(out)


def _pretrain_base(args, work: Path, head: str, cfg):
    """The base model: `small` trained with the pretrain recipe on the base corpus (its BPE
    tokenizer trained there too): the built-in docstrings plus, with --base-share > 0, the
    head of the new-domain file as extra training text. The docstrings' held-out tail (the
    split the forgetting numbers use) is the run's validation split, never trained on."""
    from autoglm.recipes.common import ModelSpec, TextData
    from autoglm.recipes.pretrain import PretrainConfig, pretrain

    extra = ()
    if head:
        (work / "base_head.txt").write_text(head, encoding="utf-8")
        extra = (work / "base_head.txt",)
    out = pretrain(PretrainConfig(out=work / "base", model=ModelSpec("small", args.vocab_size),
                                  data=TextData(None, work / "cache", extra_train=extra), train=cfg,
                                  device=args.device, sample_prompt=""), progress=False)
    return out.model, out.tokenizer, out.result.final_eval["loss"]


def _base_data(args) -> str:
    return "builtin:stdlib-docstrings" + (f" + first {args.base_share:g} of the new-domain file"
                                          if args.base_share > 0 else "")


def run(args) -> dict:
    new_data = args.new_data or (SHAKESPEARE if SHAKESPEARE.is_file() else None)
    if new_data is None:
        raise SystemExit(f"no second-domain text: {SHAKESPEARE} is missing; pass --new-data FILE")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="autoglm-lora-bench-"))
    args.work = str(work)
    cache = work / "cache"
    t0 = time.perf_counter()
    base_cfg = _cfg(args, args.base_steps, args.base_lr)
    head, new_data = _split_new_domain(new_data, args.base_share, work)
    if args.reuse_base and (work / "base" / "config.json").is_file():  # the base an earlier run left in --work-dir
        from autoglm.data import build_token_cache, read_corpus
        from autoglm.settings import to_dict

        run_dir = RunDir.open(work / "base")
        saved = run_dir.info.get("config", {})
        head_file = work / "base_head.txt"
        saved_head = head_file.read_text(encoding="utf-8") if head_file.is_file() else ""
        if saved.get("train") != to_dict(base_cfg) or saved_head != head:
            raise SystemExit(f"{work / 'base'} was pre-trained with {saved.get('train')} on "
                             f"{run_dir.info.get('data')}; not reusing it")
        base, tokenizer = run_dir.load(device=args.device)
        base_on_base = _eval_on(base, build_token_cache(read_corpus(None), tokenizer, cache).val, args)["loss"]
        logging.info("reusing the base model in %s", work / "base")
    else:
        base, tokenizer, base_on_base = _pretrain_base(args, work, head, base_cfg)
        logging.info("base model pre-trained on %s in %.0f s", _base_data(args), time.perf_counter() - t0)
    # tokenize the new domain once here, so no child's peak memory includes it
    from autoglm.data import build_token_cache, read_corpus
    new_tokens = build_token_cache(read_corpus(new_data), tokenizer, cache, val_fraction=HELD_OUT,
                                   source=str(Path(new_data).resolve()))
    _, test = _split_heldout(new_tokens)
    base.to(args.device)
    new_before = _eval_on(base, test, args)
    del base
    methods = {"full": dict(lora=False, targets=None, lrs=_grid(args.lr)),
               "lora": dict(lora=True, targets=args.targets.split(","), lrs=_grid(args.lora_lr))}
    if args.wide_targets:
        methods["lora-wide"] = dict(lora=True, targets=args.wide_targets.split(","),
                                    lrs=_grid(args.wide_lr or args.lora_lr))
    step_grid = [int(v) for v in _grid(args.steps)]
    train_data = (_adapt_prefix(new_data, args.adapt_share, work, tokenizer, cache, len(new_tokens.train))
                  if args.adapt_share < 1 else None)
    many = len(step_grid) > 1
    specs = [{"name": f"{name}-lr{lr:g}" + (f"-steps{steps}" if many else ""), "method": name, "lora": m["lora"],
              "targets": m["targets"], "lr": lr, "steps": steps, "train_data": train_data,
              "setting": f"{lr:g}" + (f" x {steps} steps" if many else "")}
             for name, m in methods.items() for lr in m["lrs"] for steps in step_grid]
    done = _run_children(specs, args, work, new_data, cache)
    runs: dict[str, list[dict]] = {name: [done[s["name"]] for s in specs if s["method"] == name] for name in methods}
    rows = {name: min(rs, key=lambda r: r["val_after"]) for name, rs in runs.items()}  # chosen on validation
    full = rows["full"]
    summary = {"base_domain_loss_before": base_on_base, "new_domain_test_loss_before": new_before["loss"]}
    for name, r in rows.items():
        if name == "full":
            continue
        summary[name] = {"trainable_pct": 100 * r["trainable"] / r["total"],
                         "peak_mem_ratio_over_full": r["peak_train_mem_mb"] / full["peak_train_mem_mb"],
                         "test_loss_ratio_over_full": r["test_after"] / full["test_after"],
                         # share of full fine-tuning's test-loss reduction this method reaches
                         "gain_share_of_full": (new_before["loss"] - r["test_after"])
                                               / (new_before["loss"] - full["test_after"]),
                         "targets_met": {"trainable_lt_1pct": 100 * r["trainable"] / r["total"] < 1.0,
                                         "new_loss_within_5pct": r["test_after"] / full["test_after"] <= 1.05}}
    for name, r in rows.items():
        summary[f"forgetting_{name}"] = r["base_after"] - base_on_base
    return {"args": {k: str(v) for k, v in vars(args).items()}, "new_data": str(new_data),
            "adapt_train": (f"the first {args.adapt_share:g} of its training part ({train_data})" if train_data
                            else "its whole training part (first 90%)"),
            "base_data": _base_data(args), "base_config": RunDir.open(work / "base").info.get("config"),
            "device": f"{platform.machine()} ({args.threads} threads), "
                      f"{'bf16 autocast training, fp32 eval' if args.device.startswith('cuda') else 'fp32'}, "
                      f"torch {torch.__version__}, {args.device}" +
                      (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else ""),
            "rows": rows, "all_runs": runs, "summary": summary}


def _setting(run: dict) -> str:
    """A run's grid point, and the step early stopping chose when that is not the last."""
    stopped = run["best_step"] != run["steps"]
    return run["setting"] + (f" (best at step {run['best_step']})" if stopped else "")


def markdown(res: dict) -> str:
    mem = "peak train mem (MB over pre-train RSS)" if res["args"]["device"] == "cpu" else "peak CUDA mem (MB)"
    s = res["summary"]
    out = [f"Device: {res['device']}; base domain: {res['base_data']}; new domain: {res['new_data']} "
           f"(held-out tail split into validation and test halves); adaptation trains on "
           f"{res['adapt_train']}", "",
           "| method | grid (lr[ x steps]): validation loss | chosen |", "|---|---|---|"]
    for name, rs in res["all_runs"].items():
        grid = ", ".join(f"{_setting(r)}: {r['val_after']:.3f}" for r in rs)
        out.append(f"| {name} | {grid} | {_setting(res['rows'][name])} |")
    out += ["", f"| method | targets | trainable params | % of model | {mem} | new-domain test loss (before -> after) "
            f"| new-domain test acc | base-domain val loss after | tok/s |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in res["rows"].items():
        targets = "all" if r["targets"] is None else ",".join(r["targets"]) + f" r={res['args']['rank']}"
        out.append(f"| {name} | {targets} | {r['trainable']:,} | {100 * r['trainable'] / r['total']:.2f}% | "
                   f"{r['peak_train_mem_mb']:.0f} | {s['new_domain_test_loss_before']:.3f} -> {r['test_after']:.3f} | "
                   f"{100 * r['test_acc_after']:.2f}% | {r['base_after']:.3f} | {r['tokens_per_s']:,.0f} |")
    out += ["", "| summary | value | target |", "|---|---|---|"]
    for name, v in s.items():
        if not isinstance(v, dict):
            continue
        out += [f"| {name}: trainable % | {v['trainable_pct']:.2f}% | < 1% |",
                f"| {name}: peak training memory / full | {v['peak_mem_ratio_over_full']:.2f} | |",
                f"| {name}: new-domain test loss / full | {v['test_loss_ratio_over_full']:.3f} | <= 1.05 |",
                f"| {name}: share of full fine-tuning's test-loss reduction | {100 * v['gain_share_of_full']:.0f}% | |"]
    out.append(f"| base-domain loss before fine-tuning | {s['base_domain_loss_before']:.3f} | |")
    for name in res["rows"]:
        out.append(f"| forgetting (base loss increase), {name} | {s['forgetting_' + name]:+.3f} | |")
    return "\n".join(out) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--new-data", type=Path, default=None, help="Second-domain text (default: Tiny Shakespeare)")
    p.add_argument("--work-dir", type=Path, default=None)
    p.add_argument("--base-steps", type=int, default=3000)
    p.add_argument("--base-lr", type=float, default=3e-3)
    p.add_argument("--base-share", type=float, default=0.25,
                   help="Share of the new-domain file (its start, cut at a blank line) added to the base corpus "
                        "and tokenizer; the rest is the adaptation text, whose last 10%% is held out. 0: base on "
                        "the docstrings only (domain replacement)")
    p.add_argument("--steps", default="300", help="Fine-tuning steps; a comma-separated grid is chosen on "
                                                   "validation together with the learning rate")
    p.add_argument("--adapt-share", type=float, default=1.0,
                   help="Low-resource adaptation: train on only this leading fraction of the adaptation text "
                        "(validation and test stay the held-out tail)")
    p.add_argument("--lr", default="1e-3,3e-3,6e-3",
                   help="Full fine-tuning learning rates, comma separated (chosen on the validation split)")
    p.add_argument("--lora-lr", default="3e-3,1e-2,3e-2", help="LoRA learning rates, comma separated")
    p.add_argument("--targets", default="q_proj,v_proj", help="LoRA target modules, comma separated "
                                                                 "('experts' = every expert projection)")
    p.add_argument("--wide-targets", default="", help="Also report LoRA on these targets (e.g. "
                                                     "q_proj,k_proj,v_proj,o_proj,experts); empty: not run")
    p.add_argument("--reuse-base", action="store_true",
                   help="Reuse the base model an earlier run with the same base settings left in --work-dir")
    p.add_argument("--wide-lr", default="", help="Learning rates for the --wide-targets row (default: --lora-lr)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r (lora_alpha = 2r, as the default 8/16)")
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--eval-batches", type=int, default=10)
    p.add_argument("--parallel", type=int, default=1,
                   help="Fine-tuning runs at once, each in its own process with --threads threads")
    p.add_argument("--eval-every", type=int, default=0,
                   help="Evaluate every N steps and report each run at its best-validation step (early "
                        "stopping); 0: the model after the last step")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--out", type=Path, default=None, help="results folder (default: docs/results)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    res = run(args)
    save_results(args.out, "lora", res, markdown(res))


if __name__ == "__main__":
    main()
