"""Batch-1 decode speed, forward latency, MFU and memory: HF `generate()` vs the engine.

Side by side in one run on the same weights (random init; EOS ignored so every system
makes exactly the requested tokens), for each preset given:

* decode tokens/s at batch 1: HF `generate()` (DynamicCache, eager), the engine eager,
  the engine with CUDA-graph decode (GPU only). Decode time per token is
  (time for 1 + N new tokens - time for 1 new token) / N, so prefill is excluded for all;
* greedy agreement of the engine's tokens with HF's;
* engine throughput at a larger batch (`--batch`), CUDA graphs on;
* forward (prefill) latency at `--forward-lens` tokens, and its MFU against `--peak-tflops`;
* peak GPU memory of each part.

    python benchmarks/decode.py --device cuda --dtype bf16 --presets base,standard-base
    python benchmarks/decode.py --presets tiny --new-tokens 32      # CPU smoke run

Writes benchmarks/results/decode.json and decode.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from autoglm import OpenAutoGLMConfig
from autoglm.hf import OpenAutoGLMForCausalLM
from autoglm.inference import EngineConfig, LLMEngine, SamplingParams
from results_io import save_results

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeat=1):
    ts = []
    for _ in range(repeat):
        sync(device)
        t = time.perf_counter()
        out = fn()
        sync(device)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), out


def hf_generate(model, ids, n):
    return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                          pad_token_id=model.config.pad_token_id)


def make_engine(model, max_tokens, graphs, block_size, batch=1, compile_decode=False):
    cfg = EngineConfig(block_size=block_size, num_blocks=batch * (-(-(max_tokens + 1) // block_size) + 2),
                       max_num_seqs=batch, max_num_batched_tokens=max(512, max_tokens * batch), cuda_graphs=graphs,
                       compile_decode=compile_decode)
    return LLMEngine(model, config=cfg)


def engine_generate(eng, prompt, n, batch=1):
    return eng.generate([prompt] * batch, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))


def decode_rate(run, device, n):
    """(tokens/s, outputs) from timing 1 + n new tokens against 1 new token."""
    t1, _ = timed(lambda: run(1), device, repeat=3)
    tn, out = timed(lambda: run(1 + n), device, repeat=3)
    return n / max(tn - t1, 1e-9), out


def active_params(model) -> int:
    """Parameters a token passes through, minus the embedding lookup (FLOP count basis)."""
    c = model.config
    total = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "adapters" not in n)
    if c.num_experts:
        per_expert = 3 * c.hidden_size * c.expert_intermediate_size
        n_moe = sum(c.is_moe_layer(i) for i in range(c.num_hidden_layers))
        total -= n_moe * (c.num_experts - c.num_experts_per_tok) * per_expert
    if c.tie_word_embeddings:
        total += c.vocab_size * c.hidden_size  # the tied LM head is a real matmul
    return total


def forward_flops(model, T: int) -> float:
    c = model.config
    keys = min(T, c.window_size + c.num_global_tokens) if c.attention == "sparse" else T / 2
    attn = 4 * T * keys * c.num_attention_heads * c.head_dim * c.num_hidden_layers
    return 2 * active_params(model) * T + attn


def bench_preset(name, a, device, dtype):
    torch.manual_seed(0)
    cfg = OpenAutoGLMConfig.from_name(name, max_position_embeddings=max(a.forward_lens + [2048]))
    with torch.device(device):
        model = OpenAutoGLMForCausalLM(cfg)
    model = model.to(dtype).eval()
    V = cfg.vocab_size
    prompt = torch.randint(2, V, (a.prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
    ids = torch.tensor([prompt], device=device)
    res = dict(preset=name, params_total=sum(p.numel() for n, p in model.named_parameters() if "adapters" not in n),
               params_active=active_params(model))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    with torch.inference_mode():
        hf_generate(model, ids, 4)  # warm-up
        hf_rate, hf_out = decode_rate(lambda k: hf_generate(model, ids, k), device, a.hf_tokens)
    hf_tokens = hf_out[0, len(prompt):].tolist()
    res["hf_tok_s"] = hf_rate
    print(f"[{name}] HF generate batch 1: {hf_rate:.1f} tok/s", flush=True)

    modes = [("engine eager", False, False)]
    if device.type == "cuda":
        modes.append(("engine CUDA graphs", True, False))
        if a.compile:
            modes.append(("engine CUDA graphs + torch.compile", True, True))
    for label, graphs, comp in modes:
        eng = make_engine(model, len(prompt) + a.new_tokens + 1, graphs, a.block_size, compile_decode=comp)
        t0 = time.perf_counter()
        try:
            engine_generate(eng, prompt, 4)  # warm-up (and graph capture / compile)
        except Exception as e:  # noqa: BLE001 - reported
            print(f"[{name}] {label}: failed: {e!r}"[:500], flush=True)
            continue
        print(f"[{name}] {label}: warm-up {time.perf_counter() - t0:.1f} s", flush=True)
        rate, reqs = decode_rate(lambda k: engine_generate(eng, prompt, k), device, a.new_tokens)
        out = reqs[0].output_ids
        n = min(len(out), len(hf_tokens))
        agree = next((i for i in range(n) if out[i] != hf_tokens[i]), n)
        key = "compiled" if comp else "graph" if graphs else "eager"
        if graphs:
            same = sum(x == y for x, y in zip(out, res["eager_tokens"])) / len(out)
            res["graph_tokens_equal_to_eager_pct"] = 100 * same
            print(f"[{name}] CUDA-graph tokens equal to eager engine tokens: {100 * same:.1f}%", flush=True)
        else:
            res["eager_tokens"] = out
        res[f"{key}_tok_s"] = rate
        res[f"{key}_greedy_prefix_equal_to_hf"] = f"{agree}/{n}"
        print(f"[{name}] {label} batch 1: {rate:.1f} tok/s ({rate / hf_rate:.1f}x HF); greedy tokens equal to HF "
              f"before the first difference: {agree}/{n}", flush=True)
    best = max(res.get(k, 0.0) for k in ("eager_tok_s", "graph_tok_s", "compiled_tok_s"))
    res["decode_speedup_vs_hf"] = best / hf_rate
    res["decode_mfu_pct"] = 100 * 2 * res["params_active"] * best / (a.peak_tflops * 1e12)

    if a.batch > 1:
        eng = make_engine(model, len(prompt) + a.new_tokens + 1, None, a.block_size, batch=a.batch)
        engine_generate(eng, prompt, 4, batch=a.batch)  # warm-up (and graph capture)
        t, _ = timed(lambda: engine_generate(eng, prompt, a.new_tokens, batch=a.batch), device)
        res[f"engine_batch{a.batch}_tok_s"] = a.batch * a.new_tokens / t
        print(f"[{name}] engine batch {a.batch}: {res[f'engine_batch{a.batch}_tok_s']:.0f} tok/s (prefill included)",
              flush=True)

    res["forward_ms"], res["forward_mfu_pct"] = {}, {}
    with torch.inference_mode():
        for T in a.forward_lens:
            x = torch.randint(2, V, (1, T), device=device)
            try:
                for _ in range(2):
                    model(x)
                ms, _ = timed(lambda: model(x), device, repeat=5)
            except Exception as e:  # noqa: BLE001 - reported (e.g. out of memory at a long length)
                print(f"[{name}] forward {T}: failed: {e!r}"[:300], flush=True)
                continue
            res["forward_ms"][T] = 1e3 * ms
            res["forward_mfu_pct"][T] = 100 * forward_flops(model, T) / ms / (a.peak_tflops * 1e12)
            print(f"[{name}] forward {T}: {1e3 * ms:.2f} ms, MFU {res['forward_mfu_pct'][T]:.1f}%", flush=True)
    if device.type == "cuda":
        res["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="base,standard-base")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: bf16 on GPU, fp32 on CPU")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128, help="decode tokens timed for the engine")
    ap.add_argument("--hf-tokens", type=int, default=64, help="decode tokens timed for HF generate")
    ap.add_argument("--batch", type=int, default=32, help="also time the engine at this batch (0 = skip)")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--compile", action="store_true", help="also time CUDA graphs of a torch.compile'd decode step")
    ap.add_argument("--forward-lens", default="512,2048,8192")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak for MFU (H100/H200 SXM: 989)")
    ap.add_argument("--out", default=None, help="results folder (default: docs/results)")
    a = ap.parse_args()
    a.forward_lens = [int(x) for x in a.forward_lens.split(",") if x]
    device = torch.device(a.device)
    dtype = DTYPES[a.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device {dev_name}, dtype {dtype}, torch {torch.__version__}", flush=True)
    rows = [bench_preset(p, a, device, dtype) for p in a.presets.split(",")]
    lens = a.forward_lens
    md = [f"Device: {dev_name}, {dtype}, torch {torch.__version__}; prompt {a.prompt_len} tokens, batch 1 decode", "",
          "| preset | params total | params active | HF generate tok/s | engine eager tok/s | engine CUDA graphs tok/s "
          "| + torch.compile tok/s | best / HF | decode MFU % | " + " | ".join(f"fwd {T} ms (MFU %)" for T in lens) + " | peak GiB |",
          "|---|---|---|---|---|---|---|---|---|" + "---|" * len(lens) + "---|"]
    for r in rows:
        fw = " | ".join(f"{r['forward_ms'][T]:.2f} ({r['forward_mfu_pct'][T]:.1f})" if T in r["forward_ms"] else "-"
                        for T in lens)
        md.append(f"| {r['preset']} | {r['params_total'] / 1e6:.1f}M | {r['params_active'] / 1e6:.1f}M | "
                  f"{r['hf_tok_s']:.1f} | {r['eager_tok_s']:.1f} | {r.get('graph_tok_s', float('nan')):.1f} | "
                  f"{r.get('compiled_tok_s', float('nan')):.1f} | "
                  f"**{r['decode_speedup_vs_hf']:.1f}x** | {r['decode_mfu_pct']:.2f} | {fw} | "
                  f"{r.get('peak_mem_gib', float('nan')):.2f} |")
    save_results(a.out, "decode", dict(device=dev_name, dtype=str(dtype), args=vars(a), rows=rows), "\n".join(md))


if __name__ == "__main__":
    main()
