"""Early-exit trade-off: decode speed vs held-out loss, on a model trained with the exit loss.

The model is trained by the pretrain recipe with exits (`autoglm train --early-exit`), in
phases given as config files (configs/early-exit-*.yaml: the first trains exits after every
layer, the later ones continue from the previous phase with the exit after layer 2 weighted
up), or loaded from a run directory (`--run`). The corpus's held-out tail (the run's
validation split) is cut in two: its first half is the *validation* split, on which the
threshold is chosen (the lowest one whose loss stays within `--max-loss-increase` % of full
depth), its second half the *test* split, on which the table is reported. For each
threshold:

* held-out loss of the distributions the early-exit decoder would actually use: one
  teacher-forced pass with `early_exit_forward` (each position takes the exit layer's
  distribution where its top probability reaches the threshold, the last layer's where not;
  at most 16 exits in a row, the engine's cap; every K/V is the full model's, as the
  engine's deferred rows make it), the mean exit layer, and how often its argmax equals the
  full model's;
* decode tokens/s of the engine (`LLMEngine`, the paged decode path with deferred rows) at
  batch 1 after prompts from the test split, for each of `--temperatures` (1.0 = the API's
  default sampling, seeded per prompt; 0 = greedy); thresholds are timed in interleaved
  rounds and each keeps its fastest of `--rounds` (wall clock and process CPU time);
  speed-up = tok/s over threshold 1.0's; agreement of the tokens with threshold 1.0.

    python benchmarks/early_exit.py --work-dir runs/ee       # train the four phases (1.yaml, then 2.yaml three times) + measure
    python benchmarks/early_exit.py --run runs/ee/phase-4    # measure a trained run only

Writes docs/results/early_exit.{json,md}. Timings are from a shared machine: compare the
ratios within one run.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from autoglm.data import iter_eval_batches, prepare_corpus
from autoglm.inference import EngineConfig, LLMEngine, SamplingParams
from autoglm.inference.early_exit import early_exit_forward
from autoglm.losses import lm_loss
from autoglm.recipes.pretrain import PretrainConfig, pretrain
from autoglm.rundir import RunDir
from autoglm.settings import load_config
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


def train_phases(configs: list[Path], work: Path, data: Path | None) -> Path:
    """Run the pretrain recipe once per config, each phase continuing from the previous one
    (`init_from`); returns the last run directory."""
    prev = None
    for i, cfg_file in enumerate(configs, 1):
        overrides = {"out": work / f"phase-{i}", "sample_prompt": ""}
        if data is not None:
            overrides["data.path"] = data
        if prev is not None:
            overrides["init_from"] = prev
        cfg = load_config(PretrainConfig, cfg_file, overrides)
        t = time.perf_counter()
        res = pretrain(cfg, progress=False).result
        print(f"phase {i} ({cfg_file}): {res.steps} steps in {time.perf_counter() - t:.0f} s, "
              f"full-depth validation loss {res.final_eval['loss']:.4f}", flush=True)
        prev = work / f"phase-{i}"
    return prev


def choose_threshold(val: dict, max_increase_pct: float) -> float:
    """The lowest threshold whose validation loss is within `max_increase_pct` % of full depth's."""
    full = val[1.0][0]
    ok = [t for t, (loss, _, _) in val.items() if 100 * (loss / full - 1) <= max_increase_pct]
    return min(ok)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", default="configs/early-exit-1.yaml" + ",configs/early-exit-2.yaml" * 3,
                    help="comma list of pretrain configs, one per phase (ignored with --run)")
    ap.add_argument("--run", type=Path, default=None, help="measure this trained run directory; no training")
    ap.add_argument("--work-dir", type=Path, default=Path("runs/early-exit"), help="where the phases are trained")
    ap.add_argument("--data", type=Path, default=None, help="training text (default Tiny Shakespeare if present)")
    ap.add_argument("--exit-layers", default=None, help="layers after which the engine may exit (default: the "
                                                        "run's trained exits)")
    ap.add_argument("--thresholds", default="1.0,0.5,0.2,0.15,0.12,0.1,0.08")
    ap.add_argument("--max-loss-increase", type=float, default=2.0, help="%% over full depth allowed when choosing "
                                                                         "the threshold on the validation split")
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=4, help="test-split prompts decoded per threshold")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (fastest kept)")
    ap.add_argument("--temperatures", default="1.0,0",
                    help="decode temperatures, each its own timed table (0 = greedy; > 0 samples, seeded per prompt)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--eval-batches", type=int, default=15, help="held-out batches per split")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="results folder (default: docs/results)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    data = a.data if a.data is not None else (SHAKESPEARE if SHAKESPEARE.is_file() else None)
    run_path = a.run or train_phases([Path(c) for c in a.train.split(",") if c], a.work_dir, data)
    run = RunDir.open(run_path)
    model, tok = run.load()
    L = model.config.num_hidden_layers
    trained_exits = run.info.get("early_exit", {}).get("layers")
    exit_layers = (tuple(int(x) for x in a.exit_layers.split(",") if x) if a.exit_layers
                   else tuple(trained_exits or range(1, L)))
    thresholds = sorted({1.0, *(float(t) for t in a.thresholds.split(","))}, reverse=True)
    held_out = prepare_corpus(run.data_source, Path(run.info["config"]["data"]["cache_dir"]), tokenizer=tok,
                              val_fraction=run.info["config"]["data"]["val_fraction"]).tokens.val
    half = len(held_out) // 2
    splits = {"validation": held_out[:half], "test": held_out[half:]}
    batches = {k: list(iter_eval_batches(v, a.batch_size, a.seq_len, max_batches=a.eval_batches))
               for k, v in splits.items()}
    val = val_losses(model, batches["validation"], thresholds, exit_layers)
    chosen = choose_threshold(val, a.max_loss_increase)
    test = val_losses(model, batches["test"], thresholds, exit_layers)
    step = len(splits["test"]) // max(1, a.prompts)
    prompts = [splits["test"][i * step:i * step + 32].tolist() for i in range(a.prompts)]
    temps = [float(x) for x in a.temperatures.split(",") if x]
    decs = {T: decode_table(model, prompts, a.decode_tokens, thresholds, exit_layers, a.rounds, T) for T in temps}
    full_val, full_test = val[1.0][0], test[1.0][0]
    rows = []
    for t in thresholds:
        row = dict(threshold=t, chosen=t == chosen, val_loss=round(val[t][0], 4),
                   val_loss_vs_full_pct=round(100 * (val[t][0] / full_val - 1), 2), test_loss=round(test[t][0], 4),
                   test_loss_vs_full_pct=round(100 * (test[t][0] / full_test - 1), 2),
                   mean_exit_layer_test=round(test[t][1], 2), argmax_agreement_test_pct=round(100 * test[t][2], 1),
                   decode={})
        for T, dec in decs.items():
            d, base = dec[t], dec[1.0]
            row["decode"][T] = dict(tok_s=round(d["tok_s"], 1), speedup=round(d["tok_s"] / base["tok_s"], 2),
                                    speedup_cpu_time=round(d["cpu_tok_s"] / base["cpu_tok_s"], 2),
                                    mean_layers=round(d["mean_layers"], 2), token_agreement_pct=round(100 * d["agreement"], 1),
                                    round_wall_s=d["round_wall_s"])
        rows.append(row)
    res = dict(run=str(run_path), run_config=run.info.get("config"), data=run.info.get("data"), vocab=len(tok),
               layers=L, exit_layers=list(exit_layers), chosen_threshold=chosen,
               max_loss_increase_pct=a.max_loss_increase, rows=rows)
    name = lambda T: "greedy" if T == 0 else f"T={T:g}"  # noqa: E731
    head = (f"{L}-layer model (vocab {len(tok)}) from {run_path}, trained on {Path(str(run.info.get('data'))).name}; "
            f"the engine tries exits after layers {list(exit_layers)}. Threshold chosen on the validation half of the "
            f"held-out text (lowest with validation loss within {a.max_loss_increase:g}% of full depth): "
            f"**{chosen}**; losses and decode prompts below are from the test half. Decode at batch 1; speed-up = "
            f"tok/s over threshold 1.0's (wall / process CPU time).")
    md = [head, "",
          "| threshold | val loss vs full % | test loss | test vs full % | mean exit layer (test) | argmax = full (test) % | "
          + " | ".join(f"{name(T)} tok/s | {name(T)} speed-up | {name(T)} tokens = thr. 1.0 %" for T in temps) + " |",
          "|" + "---|" * (6 + 3 * len(temps))]
    for r in rows:
        cells = [f"{d['tok_s']} | {d['speedup']}x / {d['speedup_cpu_time']}x | {d['token_agreement_pct']}"
                 for d in r["decode"].values()]
        thr = f"**{r['threshold']}** (chosen)" if r["chosen"] else str(r["threshold"])
        md.append(f"| {thr} | {r['val_loss_vs_full_pct']:+.2f} | {r['test_loss']} | {r['test_loss_vs_full_pct']:+.2f} | "
                  f"{r['mean_exit_layer_test']} | {r['argmax_agreement_test_pct']} | " + " | ".join(cells) + " |")
    save_results(a.out, "early_exit", res, "\n".join(md))


if __name__ == "__main__":
    main()
