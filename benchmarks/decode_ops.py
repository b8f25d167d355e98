"""The two per-step operations of a decode step outside the layers, as the engine runs them
and as PyTorch's plain call would, side by side: the LM head on the sampled rows and the
greedy pick.

* LM head: `nn.Linear` (what `model.lm_head(h)` runs) against `h @ W^T` with a contiguous
  transposed copy of the weight (`inference.runner.LMHead(transposed=True)`), and what the
  engine's `LMHead` picks by timing both on its first call at that row count;
* greedy pick: `logits.argmax(-1)` against `inference.sampling.greedy_ids` (`max(-1).indices`,
  the same index, first on ties).

Each pair gives the same result (checked here too) and is timed interleaved, median of
`--repeats` calls, at the vocabulary and width of each preset and the given row counts
(1: batch-1 decode; 3: a k = 2 speculative verify; 32, 64: batch decode).

    python benchmarks/decode_ops.py --threads 1

Writes docs/results/decode-ops.{json,md} (--name, --out to change).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from decode import DTYPES, sync
from results_io import save_results

from autoglm import OpenAutoGLMConfig
from autoglm.inference.runner import LMHead
from autoglm.inference.sampling import greedy_ids


def interleaved(fns: dict, device, repeats: int) -> dict[str, float]:
    """Median milliseconds per call of each function, the calls taken in turn."""
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            sync(device)
            t = time.perf_counter()
            f()
            sync(device)
            times[k].append(time.perf_counter() - t)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="small,base", help="presets whose vocabulary and width are used")
    ap.add_argument("--rows", default="1,3,32,64", help="rows (sampled positions) per step")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--repeats", type=int, default=50, help="timed calls per cell (the median counts)")
    ap.add_argument("--out", default=None, help="results folder (default: docs/results)")
    ap.add_argument("--name", default="decode-ops")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device, dtype = torch.device(a.device), DTYPES[a.dtype]
    rows = []
    torch.manual_seed(0)
    for preset in [p for p in a.presets.split(",") if p]:
        cfg = OpenAutoGLMConfig.from_name(preset)
        # built outside inference mode, as a model is (LMHead follows the weight's version counter)
        lin = torch.nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, device=device, dtype=dtype)
        model = torch.nn.Module()
        model.lm_head = lin
        head = LMHead(model, transposed=True)
        auto = LMHead(model)
        with torch.inference_mode():
            for n in (int(x) for x in a.rows.split(",")):
                h = torch.randn(n, cfg.hidden_size, device=device, dtype=dtype)
                logits = lin(h)
                torch.testing.assert_close(head(h), logits, atol=1e-4, rtol=1e-4)
                auto(h)  # times both forms for this row count
                if not torch.equal(greedy_ids(logits), logits.argmax(-1)):
                    raise SystemExit("greedy_ids differs from argmax")
                t = interleaved({"linear": lambda: lin(h), "lmhead": lambda: head(h),
                                 "argmax": lambda: logits.argmax(-1), "greedy_ids": lambda: greedy_ids(logits)},
                                device, a.repeats)
                picked = "W^T" if auto.choice[LMHead.bucket(n)] else "nn.Linear"
                row = {"preset": preset, "vocab": cfg.vocab_size, "hidden": cfg.hidden_size, "rows": n, **t,
                       "lmhead_picks": picked,
                       "head_speedup": t["linear"] / t["lmhead"], "pick_speedup": t["argmax"] / t["greedy_ids"]}
                rows.append(row)
                print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    md = [f"Per-step decode operations outside the layers, {a.device}, {a.dtype}, inference mode; random weights; "
          f"median of {a.repeats} interleaved calls, milliseconds. Each pair gives the same result (checked).", "",
          "| preset (vocab x width) | rows | LM head: nn.Linear | LM head: h @ W^T | ratio | LMHead picks | "
          "argmax(-1) | greedy_ids | ratio |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['preset']} ({r['vocab']} x {r['hidden']}) | {r['rows']} | {r['linear']:.3f} | "
                  f"{r['lmhead']:.3f} | {r['head_speedup']:.2f}x | {r['lmhead_picks']} | {r['argmax']:.3f} | {r['greedy_ids']:.3f} | "
                  f"{r['pick_speedup']:.2f}x |")
    save_results(a.out, a.name, {"device": a.device, "dtype": a.dtype, "repeats": a.repeats, "rows": rows},
                 "\n".join(md))


if __name__ == "__main__":
    main()
