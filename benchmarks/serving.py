"""Serving benchmark: HF `generate()` (batched, left-padded) vs the engine (continuous batching).

Side by side in one run on the same weights (a randomly initialised preset, or --model-dir):
`--requests` requests with prompt lengths uniform in [prompt-min, prompt-max] and output
lengths uniform in [out-min, out-max], all arriving at t=0, greedy, EOS ignored so both
systems produce exactly the requested lengths. Reports output tokens/s, TTFT and time per
output token (p50/p99), KV memory waste (allocated but unused slots / allocated, averaged
over decode steps), greedy agreement between the two, early-exit trade-off (decode speed
and agreement with the full model per threshold) and a load check through the HTTP server
(`--load-requests` with `--load-in-flight` concurrent, official openai client): errors
and leaked KV blocks.

    python benchmarks/serving.py --preset small                 # full size (slow on CPU)
    python benchmarks/serving.py --preset small --requests 16 --prompt-max 128 --out-max 64 --load-requests 100

Writes benchmarks/results/serving.json and serving.md. Timings on a shared machine are
noisy: compare the ratios measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from autoglm import OpenAutoGLMConfig
from autoglm.hf import OpenAutoGLMForCausalLM
from autoglm.inference import EngineConfig, LLMEngine, SamplingParams
from results_io import save_results


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


class StepClock(LogitsProcessor):
    """Records the wall time of every generation step of HF generate (called once per new token)."""

    def __init__(self):
        self.times = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def run_hf(model, prompts, outs, batch_size, pad_id):
    """Left-padded batches in arrival order; a batch runs until its longest output is done."""
    t0 = time.perf_counter()
    ttft, tpot, tokens, waste_alloc, waste_used, outputs = [], [], 0, 0, 0, []
    for s in range(0, len(prompts), batch_size):
        ps, ns = prompts[s:s + batch_size], outs[s:s + batch_size]
        P, S = max(map(len, ps)), max(ns)
        ids = torch.full((len(ps), P), pad_id)
        mask = torch.zeros((len(ps), P), dtype=torch.long)
        for i, p in enumerate(ps):
            ids[i, P - len(p):] = torch.tensor(p)
            mask[i, P - len(p):] = 1
        clock = StepClock()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=S, do_sample=False, eos_token_id=None,
                                 pad_token_id=pad_id, logits_processor=LogitsProcessorList([clock]))
        for i, (p, n) in enumerate(zip(ps, ns)):
            outputs.append(out[i, P:P + n].tolist())
            ttft.append(clock.times[0] - t0)
            if n > 1:
                tpot.append((clock.times[n - 1] - clock.times[0]) / (n - 1))
            tokens += n
        for step in range(S):  # KV slots held by the padded cache vs slots a request still needs
            waste_alloc += len(ps) * (P + step)
            waste_used += sum(len(p) + step for p, n in zip(ps, ns) if step < n)
    wall = time.perf_counter() - t0
    return dict(wall=wall, tokens=tokens, ttft=ttft, tpot=tpot, kv_waste=1 - waste_used / waste_alloc), outputs


def run_engine(model, prompts, outs, cfg):
    eng = LLMEngine(model, config=cfg)
    t0 = time.perf_counter()
    reqs = [eng.requests[eng.add_request(p, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))]
            for p, n in zip(prompts, outs)]
    for r in reqs:
        r.arrival_time = t0
    while eng.has_unfinished():
        eng.step()
    wall = time.perf_counter() - t0
    ttft = [r.first_token_time - r.arrival_time for r in reqs]
    tpot = [(r.token_times[-1] - r.token_times[0]) / (len(r.token_times) - 1) for r in reqs if len(r.token_times) > 1]
    assert eng.pool.num_free == eng.pool.num_blocks, "leaked KV blocks"
    return dict(wall=wall, tokens=sum(len(r.output_ids) for r in reqs), ttft=ttft, tpot=tpot,
                kv_waste=eng.stats.kv_waste, preemptions=eng.stats.preemptions, steps=eng.stats.steps,
                layers_run=eng.stats.layers_run, decode_steps=eng.stats.decode_steps), [r.output_ids for r in reqs]


def summary(name, r):
    return dict(system=name, wall_s=round(r["wall"], 2), out_tok_s=round(r["tokens"] / r["wall"], 1),
                ttft_p50=round(pct(r["ttft"], 50), 3), ttft_p99=round(pct(r["ttft"], 99), 3),
                tpot_p50_ms=round(1e3 * pct(r["tpot"], 50), 2), tpot_p99_ms=round(1e3 * pct(r["tpot"], 99), 2),
                kv_waste_pct=round(100 * r["kv_waste"], 2))


def early_exit_curve(model, prompts, outs, cfg, thresholds, full_outputs):
    rows = []
    for th in thresholds:
        c = EngineConfig(**{**cfg.__dict__, "early_exit_threshold": th})
        r, o = run_engine(model, prompts, outs, c)
        same = sum(a == b for x, y in zip(o, full_outputs) for a, b in zip(x, y)) / sum(map(len, o))
        rows.append(dict(threshold=th, out_tok_s=round(r["tokens"] / r["wall"], 1),
                         mean_layers=round(r["layers_run"] / max(1, r["decode_steps"]), 2),
                         token_agreement_pct=round(100 * same, 1)))
    return rows


def load_check(model, tokenizer_dir, n, in_flight, cfg):
    import openai

    from autoglm.inference.async_engine import AsyncEngine
    from autoglm.inference.server import BackgroundServer, create_app
    from autoglm.tokenizer import load_tokenizer

    engine = LLMEngine(model, load_tokenizer(tokenizer_dir), cfg)
    app = create_app(AsyncEngine(engine), model_name="bench", max_concurrent=in_flight)
    with BackgroundServer(app) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        sem = asyncio.Semaphore(in_flight)
        errors = []

        async def one(i):
            async with sem:
                try:
                    if i % 2:
                        stream = await client.completions.create(model="bench", prompt=f"def f{i}(x):", max_tokens=8 + i % 24,
                                                                 stream=True, temperature=0.8, seed=i)
                        async for _ in stream:
                            pass
                    else:
                        await client.completions.create(model="bench", prompt=f"Return {i}", max_tokens=8 + i % 24)
                except Exception as e:  # noqa: BLE001 - counted and reported
                    errors.append(repr(e))

        async def main():
            await asyncio.gather(*(one(i) for i in range(n)))

        t = time.perf_counter()
        asyncio.run(main())
        wall = time.perf_counter() - t
        time.sleep(0.2)
        leaked = engine.pool.num_used
    return dict(requests=n, in_flight=in_flight, errors=len(errors), first_errors=errors[:3], leaked_blocks=leaked,
                wall_s=round(wall, 1))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--model-dir", default=None, help="a trained run directory instead of random weights")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt-min", type=int, default=16)
    ap.add_argument("--prompt-max", type=int, default=512)
    ap.add_argument("--out-min", type=int, default=16)
    ap.add_argument("--out-max", type=int, default=256)
    ap.add_argument("--hf-batch", type=int, default=16, help="HF generate batch size (left padding)")
    ap.add_argument("--block-size", type=int, default=4)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-batched-tokens", type=int, default=512)
    ap.add_argument("--exit-thresholds", default="", help="early-exit curve on these weights, e.g. 1.0,0.9 (random weights rarely exit: see benchmarks/early_exit.py)")
    ap.add_argument("--exit-requests", type=int, default=8)
    ap.add_argument("--load-requests", type=int, default=500)
    ap.add_argument("--load-in-flight", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="results folder (default: docs/results)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    if a.model_dir:
        model = OpenAutoGLMForCausalLM.from_pretrained(a.model_dir).eval()
    else:
        model = OpenAutoGLMForCausalLM(OpenAutoGLMConfig.from_name(a.preset, initializer_range=0.1)).eval()
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(a.seed)
    lens = torch.randint(a.prompt_min, a.prompt_max + 1, (a.requests,), generator=g).tolist()
    outs = torch.randint(a.out_min, a.out_max + 1, (a.requests,), generator=g).tolist()
    prompts = [torch.randint(2, V, (n,), generator=g).tolist() for n in lens]
    max_len = a.prompt_max + a.out_max
    num_blocks = a.max_num_seqs * (-(-max_len // a.block_size) + 1)  # room for every request at once (dense)
    cfg = EngineConfig(block_size=a.block_size, num_blocks=num_blocks, max_num_seqs=a.max_num_seqs,
                       max_num_batched_tokens=a.max_batched_tokens)
    print(f"{a.requests} requests, prompts {a.prompt_min}-{a.prompt_max}, outputs {a.out_min}-{a.out_max}, "
          f"preset {a.preset}, torch threads {torch.get_num_threads()}", flush=True)
    hf, hf_out = run_hf(model, prompts, outs, a.hf_batch, model.config.pad_token_id)
    print("hf done", summary("hf", hf), flush=True)
    en, en_out = run_engine(model, prompts, outs, cfg)
    print("engine done", summary("engine", en), flush=True)
    agree = sum(x == y for x, y in zip(hf_out, en_out)) / len(hf_out)
    rows = [summary(f"HF generate (batch {a.hf_batch}, padded)", hf), summary("engine (continuous batching)", en)]
    res = dict(args=vars(a), rows=rows, throughput_ratio=round(en["tokens"] / en["wall"] / (hf["tokens"] / hf["wall"]), 2),
               greedy_identical_requests_pct=round(100 * agree, 1), engine_preemptions=en["preemptions"])
    th = [float(x) for x in a.exit_thresholds.split(",") if x]
    if th:
        k = a.exit_requests
        res["early_exit"] = early_exit_curve(model, prompts[:k], outs[:k], cfg, th, en_out[:k])
        print("early exit", res["early_exit"], flush=True)
    if a.load_requests:
        import tempfile

        from autoglm.data import stdlib_docstring_corpus
        from autoglm.tokenizer import save_tokenizer, train_tokenizer
        with tempfile.TemporaryDirectory() as d:
            save_tokenizer(train_tokenizer(stdlib_docstring_corpus()[:500], vocab_size=V), d)
            lc = EngineConfig(block_size=a.block_size, num_blocks=num_blocks, max_num_seqs=a.load_in_flight)
            res["load_check"] = load_check(model, d, a.load_requests, a.load_in_flight, lc)
        print("load check", res["load_check"], flush=True)
    md = ["| system | wall s | output tok/s | TTFT p50 s | TTFT p99 s | TPOT p50 ms | TPOT p99 ms | KV waste % |",
          "|---|---|---|---|---|---|---|---|"]
    md += [f"| {r['system']} | {r['wall_s']} | {r['out_tok_s']} | {r['ttft_p50']} | {r['ttft_p99']} | "
           f"{r['tpot_p50_ms']} | {r['tpot_p99_ms']} | {r['kv_waste_pct']} |" for r in rows]
    md.append(f"\nthroughput engine / HF: **{res['throughput_ratio']}x**; requests with identical greedy output: "
              f"{res['greedy_identical_requests_pct']}%")
    if "early_exit" in res:
        md += ["", "| exit threshold | output tok/s | mean layers per decode step | tokens equal to full model % |",
               "|---|---|---|---|"]
        md += [f"| {r['threshold']} | {r['out_tok_s']} | {r['mean_layers']} | {r['token_agreement_pct']} |"
               for r in res["early_exit"]]
    if "load_check" in res:
        lc = res["load_check"]
        md.append(f"\nload check: {lc['requests']} requests, {lc['in_flight']} in flight, {lc['errors']} errors, "
                  f"{lc['leaked_blocks']} leaked blocks, {lc['wall_s']} s")
    save_results(a.out, "serving", res, "\n".join(md))


if __name__ == "__main__":
    main()
