"""Decode speed at batch 1 and 32: the engine vs HF `generate()` at its best setting and vs
transformers' own Llama and Mixtral of the same size; and self-speculative decoding.

Side by side in one run (random init; EOS ignored so every system makes exactly the
requested tokens), for each preset given, at each batch of `--batches` (the same prompt in
every row: a uniform batch, no padding):

* HF `generate()` on the same model (DynamicCache, eager), with a static cache (eager), and
  with a static cache + torch.compile;
* transformers' `LlamaForCausalLM` and `MixtralForCausalLM` built at the preset's width,
  depth, heads, vocabulary and expert sizes, with `generate()` eager (dynamic or static
  cache) and at HF's best setting, static cache + `torch.compile` of the forward
  ("reduce-overhead" on a GPU);
* the engine eager, and with CUDA-graph decode (+ torch.compile with `--systems`) on a GPU;
  on CPU the same two systems run the fixed-shape decode buckets without capture
  (`cuda_graph_capture=False`), eager and compiled: the CPU check of what compiling buys.

Decode tokens/s = batch x N / the time from the first new token to the (1 + N)-th, each
token's time taken when it is ready (HF: a logits processor that records it; the engine:
after each step), so prefill is excluded for all; greedy agreement of our systems with HF's
tokens; forward (prefill) latency at `--forward-lens` tokens with its MFU against
`--peak-tflops`; peak GPU memory.

`--speculative-run RUN` measures self-speculative decoding of a trained early-exit run
instead (docs/results/speculative.*): the exit layer and k are chosen on validation prompts
from the run's held-out text, then plain and speculative engines run the test prompts
interleaved, reporting the speed-up, tokens per step, acceptance and whether the greedy
tokens are identical.

    python benchmarks/decode.py --device cuda --dtype bf16 --presets base,standard-base
    python benchmarks/decode.py --threads 1 --presets small --forward-lens '' --name decode-cpu
    python benchmarks/decode.py --threads 1 --speculative-run runs/spec-ee2 --prompt-len 64 --new-tokens 64

Writes docs/results/decode.json and decode.md (--name, --out to change).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from autoglm import OpenAutoGLMConfig
from autoglm.hf import OpenAutoGLMForCausalLM
from autoglm.inference import EngineConfig, LLMEngine, SamplingParams
from baselines import hf_generate
from results_io import interleaved, save_results

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


def make_engine(model, max_tokens, graphs, block_size, batch=1, compile_decode=False):
    on_cuda = next(model.parameters()).device.type == "cuda"
    cfg = EngineConfig(block_size=block_size, num_blocks=batch * (-(-(max_tokens + 1) // block_size) + 2),
                       max_num_seqs=batch, max_num_batched_tokens=max(512, max_tokens * batch), cuda_graphs=graphs,
                       cuda_graph_capture=on_cuda, compile_decode=compile_decode,
                       prefix_caching=False)  # every row has the same prompt: compute it per row, as HF does
    return LLMEngine(model, config=cfg)


def engine_generate_stamped(eng, prompt, n, batch=1):
    """(output ids per row, stamps): stamps[i] is when every row had i + 1 new tokens (the
    engine's streaming loop, as `generate()` runs it)."""
    sp = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    outs = {eng.add_request(prompt, sp): [] for _ in range(batch)}
    stamps = []
    while eng.has_unfinished():
        for o in eng.step():
            outs[o.request_id] += o.new_token_ids
        while len(stamps) < min(map(len, outs.values())):
            stamps.append(time.perf_counter())
    return list(outs.values()), stamps


class TokenStamps:
    """A logits processor that only records when `generate()` has the logits of each new token
    (after a device sync, so the step's work is done)."""

    def __init__(self, device) -> None:
        self.device, self.stamps = device, []

    def __call__(self, input_ids, scores):
        sync(self.device)
        self.stamps.append(time.perf_counter())
        return scores


def decode_rate(run, n, batch=1, repeat=3):
    """(tokens/s, outputs) of the decode steps alone: `run(k)` makes k new tokens per row and
    returns (outputs, stamps), the time each new token was ready; with 1 + n tokens the n steps
    after the first token (the prefill's) are timed, best of `repeat`. Timing the steps
    directly keeps a long prompt's prefill, and its run-to-run noise, out of the figure."""
    best, out = float("inf"), None
    for _ in range(repeat):
        out, stamps = run(1 + n)
        best = min(best, stamps[n] - stamps[0])
    return batch * n / max(best, 1e-9), out


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


SYSTEM_LABELS = {
    "hf": "HF generate, same model (dynamic cache)",
    "hf-static": "HF generate, same model, static cache",
    "hf-static-compile": "HF generate, same model, static cache + torch.compile",
    "llama": "transformers Llama, generate (dynamic cache)",
    "llama-static": "transformers Llama, static cache",
    "llama-static-compile": "transformers Llama, static cache + torch.compile",
    "mixtral": "transformers Mixtral, generate (dynamic cache)",
    "mixtral-static": "transformers Mixtral, static cache",
    "mixtral-static-compile": "transformers Mixtral, static cache + torch.compile",
    "engine": "engine (eager)",
    "engine-graphs": "engine, fixed-shape decode (CUDA graphs on a GPU)",
    "engine-graphs-compile": "engine, fixed-shape decode + torch.compile (CUDA graphs on a GPU)",
}


def build_systems(model, names, device, block_size, max_tokens, batches):
    """name -> callable(batch, n) returning the (batch, n) new token ids, or an error string."""
    from baselines import compiled_copy, llama_like, mixtral_like, num_params

    mc = model.config
    out, sizes = {}, {"hf": num_params(model)}
    others = {}
    for base, make in (("llama", llama_like), ("mixtral", mixtral_like)):
        if any(n.split("-")[0] == base for n in names):
            torch.manual_seed(0)
            others[base] = make(mc).to(device=device, dtype=next(model.parameters()).dtype)
            sizes[base] = num_params(others[base])
    def hf_runner(m, static):
        def run(prompt, b, n):
            ids, st = torch.tensor([prompt] * b, device=device), TokenStamps(device)
            return hf_generate(m, ids, n, static=static, logits_processor=[st])[:, len(prompt):].tolist(), st.stamps
        return run

    for name in names:
        base = name.split("-")[0]
        if name.startswith("engine"):
            graphs, comp = name != "engine", name == "engine-graphs-compile"
            engines = {b: make_engine(model, max_tokens, graphs, block_size, batch=b, compile_decode=comp)
                       for b in batches}
            out[name] = (lambda engines: lambda prompt, b, n: engine_generate_stamped(engines[b], prompt, n,
                                                                                      batch=b))(engines)
        elif base in ("hf", "llama", "mixtral"):
            m = model if base == "hf" else others[base]
            if name.endswith("static-compile"):
                m = compiled_copy(m, device)
            out[name] = hf_runner(m, "-static" in name)
    return out, sizes


def bench_preset(name, a, device, dtype):
    torch.manual_seed(0)
    cfg = OpenAutoGLMConfig.from_name(name, max_position_embeddings=max(a.forward_lens + [2048]))
    with torch.device(device):
        model = OpenAutoGLMForCausalLM(cfg)
    model = model.to(dtype).eval()
    V = cfg.vocab_size
    prompt = torch.randint(2, V, (a.prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
    res = dict(preset=name, params_total=sum(p.numel() for n, p in model.named_parameters() if "adapters" not in n),
               params_active=active_params(model), decode={})
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    names = [s for s in a.systems.split(",") if s]
    systems, sizes = build_systems(model, names, device, a.block_size, len(prompt) + a.new_tokens + 1, a.batches)
    res["baseline_params_total"] = sizes
    rates: dict[tuple[str, int], float] = {}
    outputs: dict[tuple[str, int], list] = {}
    errors: dict[str, str] = {}
    warm: dict[str, float] = {}
    for sysname, run in systems.items():  # warm-up: graph capture, torch.compile (both shapes), first calls
        t0 = time.perf_counter()
        try:
            for b in a.batches:
                run(prompt, b, 2)
                run(prompt, b, 1 + a.new_tokens)
        except Exception as e:  # noqa: BLE001 - reported as the row's result
            errors[sysname] = f"{type(e).__name__}: {e}"[:300]
            print(f"[{name}] {SYSTEM_LABELS[sysname]}: failed: {errors[sysname]}", flush=True)
            continue
        warm[sysname] = time.perf_counter() - t0
        print(f"[{name}] {SYSTEM_LABELS[sysname]}: warm-up {warm[sysname]:.1f} s", flush=True)
    live = [s for s in systems if s not in errors]
    for _, sysname in interleaved(live, a.repeats):  # the best run counts
        for b in a.batches:
            rate, out = decode_rate(lambda k: systems[sysname](prompt, b, k), a.new_tokens, b)
            if rate > rates.get((sysname, b), 0.0):
                rates[sysname, b], outputs[sysname, b] = rate, out
    for b in a.batches:
        hf = rates.get(("hf", b))
        ref = outputs.get(("hf", b))
        for sysname in systems:
            row = dict(system=sysname, label=SYSTEM_LABELS[sysname], batch=b)
            if sysname in errors:
                row["error"] = errors[sysname]
            else:
                row["tok_s"] = rates[sysname, b]
                row["warmup_s"] = warm[sysname]
                if hf:
                    row["vs_hf"] = rates[sysname, b] / hf
                if ref is not None and sysname.startswith(("engine", "hf")):
                    row["greedy_equal_to_hf"] = outputs[sysname, b] == ref
            res["decode"].setdefault(str(b), []).append(row)
            if "tok_s" in row:
                print(f"[{name}] batch {b} {SYSTEM_LABELS[sysname]}: {row['tok_s']:.1f} tok/s"
                      + (f" ({row['vs_hf']:.2f}x HF)" if "vs_hf" in row else ""), flush=True)
    best_engine = max((rates[s, 1] for s in systems if s.startswith("engine") and (s, 1) in rates), default=0.0)
    res["decode_mfu_pct"] = 100 * 2 * res["params_active"] * best_engine / (a.peak_tflops * 1e12)

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
    del model, systems
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


def held_out_prompts(run, tok, length: int, n_val: int, n_test: int) -> tuple[list, list]:
    """`n_val` prompts of `length` tokens spread over the first half of a run's held-out text
    (validation: settings are chosen there) and `n_test` over the second half (reported)."""
    from autoglm.data import prepare_corpus

    held = prepare_corpus(run.data_source, Path(run.info["config"]["data"]["cache_dir"]), tokenizer=tok,
                          val_fraction=run.info["config"]["data"]["val_fraction"]).tokens.val
    half = len(held) // 2

    def take(lo, hi, n):
        step = (hi - lo - length) // max(n, 1)
        return [held[lo + i * step: lo + i * step + length].tolist() for i in range(n)]

    return take(0, half, n_val), take(half, len(held), n_test)


def speculative(a, device):
    """Self-speculative decoding of a trained early-exit run at batch 1 (and `--spec-batch`):
    (exit layer, k) chosen on validation prompts (the first half of the run's held-out text),
    then plain vs speculative engine on test prompts (the second half), interleaved."""
    from autoglm.rundir import RunDir

    run = RunDir.open(a.speculative_run)
    model, tok = run.load()
    model = model.to(device).eval()
    trained = (run.info.get("early_exit") or {}).get("layers")
    if not trained:
        raise SystemExit(f"{a.speculative_run} records no trained early exit (run.json early_exit); train one with "
                         f"`autoglm train --config configs/speculative.yaml` first")
    layers = [int(x) for x in a.spec_layers.split(",")] if a.spec_layers else list(trained)
    val, test = held_out_prompts(run, tok, a.prompt_len, a.spec_val_prompts, a.spec_test_prompts)
    sp = SamplingParams(max_tokens=a.new_tokens, temperature=0, ignore_eos=True)

    def engine(E=None, k=0, batch=1, min_prob=0.0, draft_vocab=0):
        cfg = EngineConfig(block_size=a.block_size, num_blocks=batch * (-(-(a.prompt_len + a.new_tokens + 8)
                                                                         // a.block_size) + 2),
                           max_num_seqs=batch, max_num_batched_tokens=max(512, batch * (a.prompt_len + 8)),
                           speculative_layer=E, speculative_tokens=k, speculative_min_prob=min_prob,
                           speculative_draft_vocab=draft_vocab,
                           prefix_caching=False)  # the warm-up prompt is a test prompt: no head start
        return LLMEngine(model, config=cfg)

    def timed_run(eng, prompts, batch=1):
        """(seconds, outputs) for the prompts, `batch` at a time (prefill included for both systems)."""
        eng.generate([prompts[0]], SamplingParams(max_tokens=4, temperature=0))  # warm-up
        t0, outs = time.perf_counter(), []
        for i in range(0, len(prompts), batch):
            outs += [r.output_ids for r in eng.generate(prompts[i:i + batch], sp)]
        return time.perf_counter() - t0, outs

    def compare(prompts, E, k, mp, dv=0, batch=1, repeats=1):
        plain_t, spec_t, ref, got, stats = [], [], {}, {}, None
        for rep, (label, e, kk) in interleaved([("plain", None, 0), ("spec", E, k)], repeats):
            eng = engine(e, kk, batch, mp if e else 0.0, dv if e else 0)
            t, outs = timed_run(eng, prompts, batch)
            if label == "plain":
                plain_t.append(t)
                ref[rep] = outs
            else:
                spec_t.append(t)
                got[rep], stats = outs, eng.stats
        same = all(got[rep] == ref[rep] for rep in range(repeats))
        n_tok = len(prompts) * a.new_tokens
        return dict(layer=E, k=k, min_prob=mp, draft_vocab=dv, batch=batch, plain_tok_s=n_tok / min(plain_t), spec_tok_s=n_tok / min(spec_t),
                    speedup=min(plain_t) / min(spec_t), identical_greedy_tokens=same,
                    tokens_per_step=stats.tokens_per_spec_step, acceptance_rate=stats.acceptance_rate,
                    spec_steps=stats.spec_steps)

    load0 = os.getloadavg()
    grid = []
    for E, k, mp, dv in [(E, int(k), float(mp), int(dv)) for E in layers for k in a.spec_k.split(",")
                         for mp in a.spec_min_prob.split(",") for dv in a.spec_draft_vocab.split(",")]:
        r = compare(val, E, k, mp, dv)
        grid.append(r)
        print(f"[validation] exit {E} k {k} min_prob {mp} draft vocab {dv or 'all'}: {r['speedup']:.2f}x plain, "
              f"{r['tokens_per_step']:.2f} tokens/step, acceptance {r['acceptance_rate']:.2f}, "
              f"identical {r['identical_greedy_tokens']}", flush=True)
    best = max(grid, key=lambda r: r["speedup"])
    E, k, mp, dv = best["layer"], best["k"], best["min_prob"], best["draft_vocab"]
    test_rows = [compare(test, E, k, mp, dv, repeats=a.repeats)]
    for b in [x for x in a.spec_batches if x > 1]:
        test_rows.append(compare((test * -(-b // len(test)))[:b], E, k, mp, dv, batch=b, repeats=a.repeats))
    for r in test_rows:
        print(f"[test] batch {r['batch']}, exit {E} k {k}: plain {r['plain_tok_s']:.1f} tok/s, speculative "
              f"{r['spec_tok_s']:.1f} tok/s ({r['speedup']:.2f}x), {r['tokens_per_step']:.2f} tokens/step, "
              f"identical greedy tokens {r['identical_greedy_tokens']}", flush=True)
    load1 = os.getloadavg()
    L = model.config.num_hidden_layers
    md = [f"Self-speculative decoding of `{a.speculative_run}` ({model.config.num_hidden_layers} layers, trained exits "
          f"after layers {trained}); greedy, {a.prompt_len}-token prompts from the run's held-out text, "
          f"{a.new_tokens} new tokens each (EOS ignored), one request at a time unless a batch is given; "
          f"times include the prefill. Exit layer and k chosen on {len(val)} validation prompts (first half of the "
          f"held-out text), reported on {len(test)} test prompts (second half); best of {a.repeats} interleaved runs.",
          "", "Validation grid:", "",
          "| exit layer | k | min_prob | draft vocabulary | speculative / plain | tokens per step | draft acceptance "
          "| identical tokens |", "|---|---|---|---|---|---|---|---|"]
    md += [f"| {r['layer']} / {L} | {r['k']} | {r['min_prob']} | {r['draft_vocab'] or 'all'} | {r['speedup']:.2f}x | {r['tokens_per_step']:.2f} | "
           f"{r['acceptance_rate']:.2f} | {r['identical_greedy_tokens']} |" for r in grid]
    md += ["", f"Test (exit after layer {E}, k {k}, min_prob {mp}, draft vocabulary {dv or 'all'}):", "",
           "| batch | plain engine tok/s | speculative tok/s | **speculative / plain** | tokens per step | "
           "draft acceptance | greedy tokens identical to plain |", "|---|---|---|---|---|---|---|"]
    md += [f"| {r['batch']} | {r['plain_tok_s']:.1f} | {r['spec_tok_s']:.1f} | **{r['speedup']:.2f}x** | "
           f"{r['tokens_per_step']:.2f} | {r['acceptance_rate']:.2f} | {r['identical_greedy_tokens']} |"
           for r in test_rows]
    md += ["", f"Load average (1, 5, 15 min) at start {tuple(round(x, 2) for x in load0)}, at end "
               f"{tuple(round(x, 2) for x in load1)}: the machine is shared, compare ratios within this run."]
    save_results(a.out, a.name or "speculative", dict(run=str(a.speculative_run), trained_exits=trained, grid=grid,
                                                      chosen=dict(layer=E, k=k, min_prob=mp, draft_vocab=dv),
                                                      test=test_rows, load_start=load0,
                                                      load_end=load1, args=vars(a)), "\n".join(md))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="base,standard-base")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: bf16 on GPU, fp32 on CPU")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64, help="decode tokens timed per sequence")
    ap.add_argument("--batches", default="1,32", help="batch sizes timed (same prompt repeated: a uniform batch)")
    ap.add_argument("--systems", default=",".join(SYSTEM_LABELS), help=f"any of {','.join(SYSTEM_LABELS)}")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved runs per system; the best counts")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--forward-lens", default="512,2048,8192")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak for MFU (H100/H200 SXM: 989)")
    ap.add_argument("--speculative-run", default=None, help="measure self-speculative decoding of this trained "
                                                           "early-exit run instead (writes speculative.*)")
    ap.add_argument("--spec-layers", default=None, help="exit layers tried for drafting (default: the run's trained)")
    ap.add_argument("--spec-k", default="2,3,4", help="draft tokens per step tried on the validation prompts")
    ap.add_argument("--spec-min-prob", default="0,0.3", help="draft confidence floors tried (speculative_min_prob)")
    ap.add_argument("--spec-draft-vocab", default="0", help="draft vocabularies tried (speculative_draft_vocab: "
                                                            "the N lowest token ids; 0 = all)")
    ap.add_argument("--spec-val-prompts", type=int, default=4)
    ap.add_argument("--spec-test-prompts", type=int, default=8)
    ap.add_argument("--spec-batches", default="1", help="batches the chosen setting is also reported at")
    ap.add_argument("--name", default=None, help="results file name (default: decode, or speculative)")
    ap.add_argument("--out", default=None, help="results folder (default: docs/results)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    a.forward_lens = [int(x) for x in a.forward_lens.split(",") if x]
    a.batches = [int(x) for x in a.batches.split(",") if x]
    a.spec_batches = [int(x) for x in a.spec_batches.split(",") if x]
    device = torch.device(a.device)
    if a.speculative_run:
        return speculative(a, device)
    dtype = DTYPES[a.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device {dev_name}, dtype {dtype}, torch {torch.__version__}", flush=True)
    load0 = os.getloadavg()
    rows = [bench_preset(p, a, device, dtype) for p in a.presets.split(",")]
    load1 = os.getloadavg()
    lens = a.forward_lens
    md = [f"Device: {dev_name}, {dtype}, torch {torch.__version__}; prompt {a.prompt_len} tokens (the same prompt in "
          f"every row of a batch), {a.new_tokens} new tokens per sequence, greedy, EOS ignored; decode tokens/s = "
          f"batch x new tokens / (time from the first new token to the last, each token timed when it is "
          f"ready), so prefill is excluded for every system; best of {a.repeats} interleaved runs. transformers' "
          f"Llama and Mixtral are built at the preset's width, depth, heads, vocabulary and expert sizes (random "
          f"weights).", ""]
    for r in rows:
        others = "".join(f"; {k} {v / 1e6:.1f}M" for k, v in r["baseline_params_total"].items() if k != "hf")
        md += [f"**{r['preset']}** ({r['params_total'] / 1e6:.1f}M parameters, {r['params_active'] / 1e6:.1f}M "
               f"active{others})",
               "", "| system | batch | decode tok/s | vs HF generate | greedy tokens = HF | warm-up s |",
               "|---|---|---|---|---|---|"]
        for b, brows in r["decode"].items():
            for x in brows:
                if "error" in x:
                    md.append(f"| {x['label']} | {b} | not run: {x['error'][:120]} | | | |")
                    continue
                eq = {True: "yes", False: "no"}.get(x.get("greedy_equal_to_hf"), "")
                md.append(f"| {x['label']} | {b} | {x['tok_s']:.1f} | {x.get('vs_hf', float('nan')):.2f}x | {eq} | "
                          f"{x['warmup_s']:.1f} |")
        if lens and r["forward_ms"]:
            md += ["", "| forward tokens | ms | MFU % |", "|---|---|---|"]
            md += [f"| {T} | {r['forward_ms'][T]:.2f} | {r['forward_mfu_pct'][T]:.1f} |" for T in lens
                   if T in r["forward_ms"]]
        md.append("")
    md.append(f"Load average (1, 5, 15 min) at start {tuple(round(x, 2) for x in load0)}, at end "
              f"{tuple(round(x, 2) for x in load1)}.")
    save_results(a.out, a.name or "decode", dict(device=dev_name, dtype=str(dtype), args=vars(a), rows=rows,
                                                 load_start=load0, load_end=load1), "\n".join(md))


if __name__ == "__main__":
    main()
