"""One MoE layer's forward per dispatch, from decode batch sizes to prefill lengths.

Times `autoglm.modules.moe.MoEFeedForward` at a preset's width and expert sizes (random
weights, inference mode) for each `--dispatch` and each count of input tokens: `sorted`
(a loop over the hit experts), `grouped` (grouped GEMMs), `gather` (each token copy's expert
weights gathered) and `dense` (every expert on every token). Alongside: the FLOPs the top-k
experts do and the bytes of expert weights the layer reads, so the table shows where the
layer stops being bound by weight reads and starts being bound by arithmetic.

    python benchmarks/moe_dispatch.py --threads 1                     # CPU, `small`
    python benchmarks/moe_dispatch.py --preset base --device cuda --dtype bf16

Writes docs/results/moe-dispatch.{json,md} (--name, --out to change).
"""

from __future__ import annotations

import argparse

import torch
from decode import DTYPES, timed
from results_io import save_results

from autoglm import OpenAutoGLMConfig
from autoglm.modules.moe import MoEFeedForward


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small", help="model preset whose MoE layer is timed")
    ap.add_argument("--tokens", default="1,2,8,16,32,64,256,1024,4096", help="input token counts")
    ap.add_argument("--dispatch", default="sorted,grouped,gather,dense", help="dispatches to time")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--gather-max-tokens", type=int, default=256,
                    help="time `gather` only up to this many tokens (it copies every token copy's expert weights: "
                         "gigabytes for a long prefill of `base`)")
    ap.add_argument("--repeats", type=int, default=30, help="timed calls per cell (the median counts)")
    ap.add_argument("--out", default=None, help="results folder (default: docs/results)")
    ap.add_argument("--name", default="moe-dispatch")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device, dtype = torch.device(a.device), DTYPES[a.dtype]
    cfg = OpenAutoGLMConfig.from_name(a.preset)
    if not cfg.num_experts:
        raise SystemExit(f"preset {a.preset!r} has no experts; give a sparse preset, e.g. small or base")
    d, h, E, k = cfg.hidden_size, cfg.expert_intermediate_size, cfg.num_experts, cfg.num_experts_per_tok
    torch.manual_seed(0)
    layer = MoEFeedForward(d, h, E, k).to(device=device, dtype=dtype).eval()
    weight_mb = sum(p.numel() * p.element_size() for p in layer.experts.parameters()) / 1e6
    dispatches = [x for x in a.dispatch.split(",") if x]
    rows = []
    with torch.inference_mode():
        for n in (int(x) for x in a.tokens.split(",")):
            x = torch.randn(n, d, device=device, dtype=dtype)
            row = {"tokens": n, "top_k_mflop": 2 * 3 * d * h * n * k / 1e6}
            for name in dispatches:
                if name == "gather" and n > a.gather_max_tokens:
                    row[name], row[f"{name}_error"] = None, f"not timed above {a.gather_max_tokens} tokens"
                    continue
                layer.dispatch = name
                try:
                    layer(x)  # warm-up
                    row[name] = 1e3 * timed(lambda: layer(x), device, a.repeats)[0]
                except (RuntimeError, ValueError) as e:  # e.g. no grouped-GEMM kernel for this dtype/device
                    row[name] = None
                    row[f"{name}_error"] = str(e)[:200]
            rows.append(row)
            print(n, {name: row[name] and round(row[name], 3) for name in dispatches}, flush=True)
    res = {"preset": a.preset, "device": a.device, "dtype": a.dtype, "dim": d, "expert_hidden": h, "experts": E,
           "top_k": k, "expert_weights_mb": weight_mb, "rows": rows}
    md = [f"MoE layer of `{a.preset}` ({E} experts, top-{k}, {d} -> 2 x {h} -> {d}; {weight_mb:.1f} MB of expert "
          f"weights), {a.device}, {a.dtype}, inference mode; median of {a.repeats} calls, milliseconds.", "",
          "| tokens | top-k MFLOP | " + " | ".join(dispatches) + " | fastest |",
          "|---|---|" + "---|" * len(dispatches) + "---|"]
    for r in rows:
        ok = {name: r[name] for name in dispatches if r[name] is not None}
        md.append(f"| {r['tokens']} | {r['top_k_mflop']:.1f} | "
                  + " | ".join(("-" if "not timed" in r.get(f"{name}_error", "") else "failed")
                               if r[name] is None else f"{r[name]:.3f}" for name in dispatches)
                  + f" | {min(ok, key=ok.get) if ok else '-'} |")
    save_results(a.out, a.name, res, "\n".join(md))


if __name__ == "__main__":
    main()
