"""Early-exit trade-off: decode speed vs validation loss, on a model trained with the exit loss.

Trains `--preset` twice from the same initialisation for the same number of steps on the
built-in corpus (stdlib docstrings): with the plain LM objective and with
`EarlyExitObjective` (LayerSkip-style losses on every intermediate layer through the
shared head). Then, for the early-exit model and each threshold:

* validation loss when every position takes the logits of the first layer whose top
  probability reaches the threshold (the last layer otherwise), from one forward with
  all hidden states (this ignores that exited positions' upper-layer K/V come from their
  exit state; the engine's tokens include that effect - see the agreement column);
* decode tokens/s of the engine at batch 1 (greedy, `--decode-tokens` tokens after a
  short prompt), mean layers run per decode step, and agreement with threshold 1.0.

    python benchmarks/early_exit.py --preset small --steps 300

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

from autoglm.inference import EngineConfig, LLMEngine, SamplingParams
from autoglm.inference.early_exit import EarlyExitObjective, exit_logits
from autoglm.losses import lm_loss
from autoglm.training import TrainConfig, Trainer
from autoglm.training.objectives import CausalLMObjective
from autoglm.training.pretrain import build_model, eval_batches_for, prepare_data
from autoglm.data import sample_batch


@torch.no_grad()
def val_losses(model, batches, thresholds, exit_layers=None):
    """{threshold: mean loss with per-position early exit}, plus mean exit layer per threshold."""
    L = model.config.num_hidden_layers
    allowed = set(exit_layers or range(1, L))
    tot = {t: 0.0 for t in thresholds}
    layers = {t: 0.0 for t in thresholds}
    n = 0
    for x, y in batches:
        hs = model(x, output_hidden_states=True).hidden_states
        logits = [exit_logits(model, hs[l]) for l in range(1, L)] + [model.lm_head(model.model.norm(hs[L]))]
        conf = [lg.float().softmax(-1).amax(-1) for lg in logits]
        for t in thresholds:
            chosen = logits[-1].clone()
            layer = torch.full(x.shape, float(L))
            done = torch.zeros(x.shape, dtype=torch.bool)
            if t < 1.0:
                for l in range(L - 1):
                    if l + 1 not in allowed:
                        continue
                    take = (conf[l] >= t) & ~done
                    chosen[take] = logits[l][take]
                    layer[take] = l + 1
                    done |= take
            tot[t] += float(lm_loss(chosen, y))
            layers[t] += float(layer.mean())
        n += 1
    return {t: tot[t] / n for t in thresholds}, {t: layers[t] / n for t in thresholds}


def decode_speed(model, prompt, n_tokens, threshold, ref=None, exit_layers=None):
    eng = LLMEngine(model, config=EngineConfig(block_size=16, num_blocks=128, early_exit_threshold=threshold,
                                               exit_layers=exit_layers))
    rid = eng.add_request(prompt, SamplingParams(max_tokens=n_tokens, temperature=0, ignore_eos=True))
    req = eng.requests[rid]
    eng.step()  # prefill (+ first token) is not decode
    t = time.perf_counter()
    while eng.has_unfinished():
        eng.step()
    dt = time.perf_counter() - t
    agree = None if ref is None else sum(a == b for a, b in zip(req.output_ids, ref)) / len(ref)
    return (n_tokens - 1) / dt, eng.stats.layers_run / max(1, eng.stats.decode_steps), req.output_ids, agree


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--exit-weight", type=float, default=1.0)
    ap.add_argument("--thresholds", default="1.0,0.95,0.9,0.8,0.7,0.6,0.5")
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--eval-batches", type=int, default=10)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--exit-layers", default="", help="layers after which the engine may exit, e.g. 2,4 (default: all)")
    ap.add_argument("--skip-plain", action="store_true", help="train only the early-exit model")
    a = ap.parse_args()
    thresholds = [float(t) for t in a.thresholds.split(",")]
    cache = a.cache_dir or tempfile.mkdtemp(prefix="autoglm-ee-")
    prep = prepare_data(None, cache, a.vocab)
    cfg = TrainConfig(batch_size=a.batch_size, seq_len=a.seq_len, lr=a.lr, max_steps=a.steps,
                      warmup_steps=max(1, a.steps // 10), eval_every=0, save_every=0, eval_batches=a.eval_batches,
                      precision="fp32")
    torch.manual_seed(0)
    init = build_model(a.preset, len(prep.tokenizer))
    train = prep.tokens.train
    models, train_s = {}, {}
    runs = [("plain", CausalLMObjective())] if not a.skip_plain else []
    for name, obj in runs + [("early-exit", EarlyExitObjective(a.exit_weight))]:
        m = copy.deepcopy(init)
        t = time.perf_counter()
        Trainer(m, cfg, train_batch=lambda i: sample_batch(train, cfg.batch_size, cfg.seq_len, i, cfg.seed),
                objective=obj, progress=False).fit()
        train_s[name] = time.perf_counter() - t
        models[name] = m.eval()
        print(f"trained {name} in {train_s[name]:.0f}s", flush=True)
    batches = list(eval_batches_for(prep.tokens.val, cfg)())
    plain_loss = val_losses(models["plain"], batches, [1.0])[0] if "plain" in models else {1.0: float("nan")}
    exit_layers = tuple(int(x) for x in a.exit_layers.split(",") if x) or None
    ee_loss, ee_layers = val_losses(models["early-exit"], batches, thresholds, exit_layers)
    prompt = prep.tokenizer("Return the ").input_ids
    rows, ref, base_speed = [], None, None
    for t in thresholds:
        speed, layers, out, agree = decode_speed(models["early-exit"], prompt, a.decode_tokens, t, ref, exit_layers)
        if ref is None:
            ref, base_speed, agree = out, speed, 1.0
        rows.append(dict(threshold=t, val_loss=round(ee_loss[t], 4),
                         val_loss_vs_full_pct=round(100 * (ee_loss[t] / ee_loss[1.0] - 1), 2),
                         mean_exit_layer_val=round(ee_layers[t], 2), decode_tok_s=round(speed, 1),
                         decode_speedup=round(speed / base_speed, 2), decode_mean_layers=round(layers, 2),
                         token_agreement_pct=round(100 * agree, 1)))
        print(rows[-1], flush=True)
    res = dict(args=vars(a), plain_val_loss=round(plain_loss[1.0], 4), train_seconds=train_s, rows=rows)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "early_exit.json").write_text(json.dumps(res, indent=2))
    md = [f"preset {a.preset}, {a.steps} steps: val loss plain objective {res['plain_val_loss']}, "
          f"early-exit objective (full depth) {rows[0]['val_loss'] if rows[0]['threshold'] == 1.0 else 'n/a'}", "",
          "| threshold | val loss | vs full depth % | mean exit layer (val) | decode tok/s (batch 1) | speedup |"
          " mean layers (decode) | tokens equal to threshold 1.0 % |", "|---|---|---|---|---|---|---|---|"]
    md += [f"| {r['threshold']} | {r['val_loss']} | {r['val_loss_vs_full_pct']} | {r['mean_exit_layer_val']} | "
           f"{r['decode_tok_s']} | {r['decode_speedup']}x | {r['decode_mean_layers']} | {r['token_agreement_pct']} |"
           for r in rows]
    (out / "early_exit.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
