"""Early-exit trade-off: decode speed vs validation loss, on a model trained with the exit loss.

Trains `--preset` (default `small` with a 2048-token BPE vocabulary) on Tiny Shakespeare
(../shared/data when present, else the built-in stdlib corpus, or `--data`) with
`EarlyExitObjective` (LayerSkip-style: the shared final norm + LM head on intermediate
layers, loss weights rising with depth), and optionally the plain LM objective from the
same initialisation for comparison. Then, for each threshold:

* validation loss of the distributions the early-exit decoder would actually use: one
  teacher-forced pass over held-out text with `early_exit_forward` (each position takes the
  exit layer's distribution where its top probability reaches the threshold, the last
  layer's where not; at most 16 exits in a row, the engine's cap; every K/V is the full
  model's, as the engine's deferred rows make it), the mean exit layer over the positions
  that may exit, and how often its argmax equals the full model's (teacher-forced, so
  errors do not compound);
* decode tokens/s of the engine (`LLMEngine`, the real paged decode path, deferred rows
  included) at batch 1, for each of `--temperatures` (default 1.0, the API's default
  sampling, seeded per prompt, and 0 = greedy),
  `--decode-tokens` tokens after each of `--prompts` held-out prompts; thresholds are timed
  in interleaved rounds and each keeps its fastest of `--rounds` (wall clock, and process
  CPU time, which leaves out waits for a core on a shared machine); speed-up = tok/s /
  tok/s at threshold 1.0; mean layers per decode step; agreement of the tokens with
  threshold 1.0 position by position (free-running: after the first different token the
  continuations part).

    python benchmarks/early_exit.py --skip-plain --save-dir runs/ee   # train (1200 steps) + measure
    python benchmarks/early_exit.py --init-from runs/ee --skip-plain --train-only --steps 600 --lr 1e-3 \
        --exit-weight 3 --train-exit-layers 2 --eval-every 200 --save-dir runs/ee2   # stress the layer-2 exit
    python benchmarks/early_exit.py --load-dir runs/ee2 --exit-layers 2 \
        --thresholds 1.0,0.9,0.7,0.5,0.3,0.2,0.15,0.12,0.1                         # re-measure only (README table)

Writes benchmarks/results/early_exit.json and early_exit.md. Timings are from a shared
machine: compare the ratios within one run.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch

from autoglm import OpenAutoGLMForCausalLM
from autoglm.data import sample_batch
from autoglm.inference import EngineConfig, LLMEngine, SamplingParams
from autoglm.inference.early_exit import EarlyExitObjective, early_exit_forward
from autoglm.losses import lm_loss
from autoglm.training import TrainConfig, Trainer
from autoglm.training.objectives import CausalLMObjective
from autoglm.training.pretrain import build_model, eval_batches_for, prepare_data
from results_io import save_results

ROOT = Path(__file__).resolve().parent.parent
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


BLOCK_SIZE = 16  # the engine's KV block size here, which is also its cap on consecutive exits (max_deferred)


@torch.no_grad()
def val_losses(model, batches, thresholds, exit_layers):
    """{threshold: (mean loss of the decoder's distributions, mean exit layer of positions >= 1,
    fraction of positions whose argmax equals the full model's)}, teacher-forced on held-out text."""
    full = [model(x).logits.argmax(-1) for x, _ in batches]
    res = {}
    for t in thresholds:
        tot, layers, same, n = 0.0, 0.0, 0.0, 0
        for (x, y), f in zip(batches, full):
            logits, exit_at = early_exit_forward(model, x, t, exit_layers, prompt_len=1, max_run=BLOCK_SIZE)
            tot += float(lm_loss(logits, y))
            layers += float(exit_at[:, 1:].float().mean())
            same += float((logits.argmax(-1) == f).float().mean())
            n += 1
        res[t] = (tot / n, layers / n, same / n)
    return res


def decode_once(model, prompt, n_tokens, threshold, exit_layers, temperature=0.0, seed=0):
    """One batch-1 decode on the engine (greedy, or sampled at `temperature` with `seed`):
    (wall s, process CPU s, layers run, decode steps, tokens)."""
    eng = LLMEngine(model, config=EngineConfig(block_size=BLOCK_SIZE, num_blocks=128, early_exit_threshold=threshold,
                                               exit_layers=exit_layers))
    rid = eng.add_request(prompt, SamplingParams(max_tokens=n_tokens, temperature=temperature, seed=seed,
                                                 ignore_eos=True))
    req = eng.requests[rid]
    eng.step()  # prefill (+ first token) is not decode
    t, c = time.perf_counter(), time.process_time()
    while eng.has_unfinished():
        eng.step()
    return (time.perf_counter() - t, time.process_time() - c, eng.stats.layers_run, eng.stats.decode_steps,
            list(req.output_ids))


def decode_table(model, prompts, n_tokens, thresholds, exit_layers, rounds, temperature=0.0):
    """Interleaved rounds (every threshold decodes every prompt once per round). On a shared
    machine other jobs only ever add time, so each (threshold, prompt) keeps its fastest
    round, for wall time and for process CPU time (1 thread: CPU time leaves out the time the
    process waited for a core)."""
    wall = {(t, i): [] for t in thresholds for i in range(len(prompts))}
    cpu = {(t, i): [] for t in thresholds for i in range(len(prompts))}
    layers, steps, outs = {}, {}, {}
    for _ in range(rounds):
        for i, p in enumerate(prompts):
            for t in thresholds:
                w, c, a, b, o = decode_once(model, p, n_tokens, t, exit_layers, temperature, seed=i)
                wall[t, i].append(w)
                cpu[t, i].append(c)
                layers[t, i], steps[t, i], outs[t, i] = a, b, o
    n_dec = len(prompts) * (n_tokens - 1)
    res = {}
    for t in thresholds:
        idx = range(len(prompts))
        agree = sum(a == b for i in idx for a, b in zip(outs[t, i], outs[thresholds[0], i]))
        res[t] = dict(tok_s=n_dec / sum(min(wall[t, i]) for i in idx),
                      cpu_tok_s=n_dec / sum(min(cpu[t, i]) for i in idx),
                      mean_layers=sum(layers[t, i] for i in idx) / max(1, sum(steps[t, i] for i in idx)),
                      agreement=agree / sum(len(outs[thresholds[0], i]) for i in idx),
                      round_wall_s=[round(sum(wall[t, i][r] for i in idx), 3) for r in range(rounds)])
    return res


def train(init, name, obj, cfg, prep, save_dir):
    """Train a copy of init (on CUDA when there is one), save it, return it on the CPU."""
    m = copy.deepcopy(init)
    t = time.perf_counter()
    r = Trainer(m, cfg, train_batch=lambda i: sample_batch(prep.tokens.train, cfg.batch_size, cfg.seq_len, i, cfg.seed),
                eval_batches=eval_batches_for(prep.tokens.val, cfg), objective=obj, progress=False).fit()
    info = dict(seconds=round(time.perf_counter() - t, 1), steps=r.steps, stop_reason=r.stop_reason,
                device=str(next(m.parameters()).device),
                val_curve=[(h["step"], round(h["val_loss"], 4)) for h in r.history if "val_loss" in h])
    print(f"trained {name}: {info}", flush=True)
    m = m.cpu().float().eval()
    if save_dir is not None:
        m.save_pretrained(save_dir / name)
        prep.tokenizer.save_pretrained(save_dir / name)
    return m, info


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=None, help="training text (default Tiny Shakespeare if present)")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--exit-weight", type=float, default=1.0)
    ap.add_argument("--train-exit-layers", default="", help="layers given an exit loss, e.g. 2,4 (default: all)")
    ap.add_argument("--exit-layers", default="2,4", help="layers after which the engine may exit ('' = all)")
    ap.add_argument("--thresholds", default="1.0,0.95,0.9,0.8,0.7,0.6,0.5")
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=4, help="held-out prompts decoded per threshold")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (fastest kept)")
    ap.add_argument("--temperatures", default="1.0,0",
                    help="decode temperatures, each its own timed table (0 = greedy; > 0 samples, seeded per prompt)")
    ap.add_argument("--eval-batches", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="results folder (default: docs/results)")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--save-dir", type=Path, default=None, help="save the trained models here")
    ap.add_argument("--load-dir", type=Path, default=None, help="load models saved by --save-dir; no training")
    ap.add_argument("--skip-plain", action="store_true", help="train only the early-exit model")
    ap.add_argument("--dropout", type=float, default=0.0, help="residual/embedding dropout while training")
    ap.add_argument("--eval-every", type=int, default=0, help="validation-curve interval while training")
    ap.add_argument("--max-train-seconds", type=float, default=None, help="time budget per model")
    ap.add_argument("--train-only", action="store_true", help="train and save, measure nothing")
    ap.add_argument("--init-from", type=Path, default=None,
                    help="continue from a model saved by --save-dir (DIR/early-exit) instead of a fresh init")
    ap.add_argument("--plain-only", action="store_true", help="train only the plain model; report its val loss")
    ap.add_argument("--val-threads", type=int, default=None, help="torch threads for the val-loss pass (default --threads)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 training, also on a GPU
    thresholds = [float(t) for t in a.thresholds.split(",")]
    if thresholds[0] != 1.0:
        thresholds = [1.0] + thresholds  # the reference row
    data = a.data if a.data is not None else (SHAKESPEARE if SHAKESPEARE.is_file() else None)
    cache = a.cache_dir or tempfile.mkdtemp(prefix="autoglm-ee-")
    src_dir = a.load_dir if a.load_dir is not None else a.init_from
    tok_dir = (src_dir / "early-exit") if src_dir is not None else None
    prep = prepare_data(data, cache, a.vocab, tokenizer_dir=tok_dir)
    cfg = TrainConfig(batch_size=a.batch_size, seq_len=a.seq_len, lr=a.lr, max_steps=a.steps,
                      warmup_steps=max(1, a.steps // 10), eval_every=a.eval_every, save_every=0,
                      eval_batches=a.eval_batches, precision="fp32", max_seconds=a.max_train_seconds)
    train_layers = tuple(int(x) for x in a.train_exit_layers.split(",") if x) or None
    models, train_s = {}, {}
    if a.load_dir is not None:
        for name in ("plain", "early-exit"):
            if (a.load_dir / name).is_dir():
                models[name] = OpenAutoGLMForCausalLM.from_pretrained(a.load_dir / name).eval()
    else:
        torch.manual_seed(0)
        if a.init_from is not None:
            init = OpenAutoGLMForCausalLM.from_pretrained(a.init_from / "early-exit")
        else:
            init = build_model(a.preset, len(prep.tokenizer), dropout=a.dropout)
        runs = [] if a.skip_plain else [("plain", CausalLMObjective())]
        if not a.plain_only:
            runs.append(("early-exit", EarlyExitObjective(a.exit_weight, train_layers)))
        for name, obj in runs:
            models[name], train_s[name] = train(init, name, obj, cfg, prep, a.save_dir)
        if a.train_only:
            return
    model = models.get("early-exit", models.get("plain"))
    L = model.config.num_hidden_layers
    exit_layers = tuple(int(x) for x in a.exit_layers.split(",") if x) or tuple(range(1, L))
    batches = list(eval_batches_for(prep.tokens.val, cfg)())
    torch.set_num_threads(a.val_threads or a.threads)
    plain = val_losses(models["plain"], batches, [1.0], exit_layers)[1.0][0] if "plain" in models else None
    if a.plain_only:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "early_exit_plain.json").write_text(json.dumps(dict(plain_val_loss=plain, training=train_s), indent=2))
        print("plain val loss", plain)
        return
    vl = val_losses(model, batches, thresholds, exit_layers)
    torch.set_num_threads(a.threads)
    print("val", vl, flush=True)
    val = prep.tokens.val
    step = len(val) // max(1, a.prompts)
    prompts = [val[i * step:i * step + 32].tolist() for i in range(a.prompts)]
    temps = [float(x) for x in a.temperatures.split(",") if x]
    decs = {T: decode_table(model, prompts, a.decode_tokens, thresholds, exit_layers, a.rounds, T) for T in temps}
    full_loss = vl[1.0][0]
    rows = []
    for t in thresholds:
        row = dict(threshold=t, val_loss=round(vl[t][0], 4), val_loss_vs_full_pct=round(100 * (vl[t][0] / full_loss - 1), 2),
                   mean_exit_layer_val=round(vl[t][1], 2), argmax_agreement_val_pct=round(100 * vl[t][2], 1), decode={})
        for T, dec in decs.items():
            d, base = dec[t], dec[1.0]
            row["decode"][T] = dict(tok_s=round(d["tok_s"], 1), speedup=round(d["tok_s"] / base["tok_s"], 2),
                                    speedup_cpu_time=round(d["cpu_tok_s"] / base["cpu_tok_s"], 2),
                                    mean_layers=round(d["mean_layers"], 2), token_agreement_pct=round(100 * d["agreement"], 1),
                                    round_wall_s=d["round_wall_s"])
        rows.append(row)
    for r in rows:
        print(r, flush=True)
    res = dict(args={k: str(v) for k, v in vars(a).items()}, data=prep.source, vocab=len(prep.tokenizer), layers=L,
               exit_layers=exit_layers, plain_val_loss=None if plain is None else round(plain, 4),
               training=train_s, rows=rows)
    trained = f"loaded from {a.load_dir}" if a.load_dir is not None else f"{a.steps} steps"
    head = (f"preset {a.preset} ({L} layers, vocab {len(prep.tokenizer)}), {trained} on {Path(prep.source).name}; "
            f"engine exits after layers {list(exit_layers)}; val loss at full depth {rows[0]['val_loss']}"
            + ("" if plain is None else f" (plain objective: {round(plain, 4)})")
            + "; decode at batch 1, T = temperature (0 = greedy), speed-up = tok/s over threshold 1.0's (wall / CPU time)")
    name = lambda T: "greedy" if T == 0 else f"T={T:g}"  # noqa: E731
    md = [head, "",
          "| threshold | val loss | vs full depth % | mean exit layer (val) | argmax = full (val) % | "
          + " | ".join(f"{name(T)} tok/s | {name(T)} speed-up | {name(T)} mean layers | {name(T)} tokens = thr. 1.0 %"
                       for T in temps) + " |",
          "|" + "---|" * (5 + 4 * len(temps))]
    for r in rows:
        cells = [f"{d['tok_s']} | {d['speedup']}x / {d['speedup_cpu_time']}x | {d['mean_layers']} | {d['token_agreement_pct']}"
                 for d in r["decode"].values()]
        md.append(f"| {r['threshold']} | {r['val_loss']} | {r['val_loss_vs_full_pct']} | {r['mean_exit_layer_val']} | "
                  f"{r['argmax_agreement_val_pct']} | " + " | ".join(cells) + " |")
    save_results(a.out, "early_exit", res, "\n".join(md))


if __name__ == "__main__":
    main()
