"""Serving benchmark: the engine called directly, the same engine through HTTP (`autoglm serve`),
HF `generate()` on the same model and HF `generate()` on transformers' own Llama of the same
size, side by side in one run at several concurrencies.

Workload (one per concurrency c in --concurrency, default 1, 16, 64): c requests arrive
together, prompts of random token ids with lengths uniform in [prompt-min, prompt-max],
--out-tokens new tokens each, greedy, EOS ignored, so every system produces exactly the
same number of tokens. Systems:

* engine: `LLMEngine.generate` (continuous batching, paged KV, prefix caching,
  detokenisation and stop checks included), c requests at once;
* engine-nocache: the same with prefix caching off (`EngineConfig(prefix_caching=False)`);
* HTTP: the same engine config behind `autoglm serve` in its own process (started here on a
  saved copy of the same weights), c concurrent streaming /v1/completions clients in this
  process (SSE, `stream_options.include_usage`); the ratio HTTP / engine is what the server
  path keeps of the engine's throughput;
* HF generate: `model.generate` on the same model, one left-padded batch of c;
* Llama generate: `model.generate` on `transformers.LlamaForCausalLM` built from a
  `LlamaConfig` with the same width, depth, heads, vocabulary and total parameter count
  (random weights: no download), one batch of c;
* Mixtral generate: the same with `transformers.MixtralForCausalLM` at our expert count,
  width and top-k (benchmarks/baselines.py builds both).

Shared prefix (--shared-prefix P): every prompt of the workload starts with the same P random
token ids (a system prompt, few-shot examples) before its own [prompt-min, prompt-max]
tokens. The engine computes the prefix's full blocks once and shares them; HF generate
and the engine without the cache compute it for every request. HF's own way to reuse a
prompt is a row of its own (hf-prefix, llama-prefix, mixtral-prefix): the prefix's K/V
computed once into a `DynamicCache` (timed), repeated over the batch, `generate()`
continuing from it; its greedy tokens are checked against the plain row's. The table gives
each engine run's prefix hit rate (prompt tokens served from cached blocks).

Conversations (--chat N, instead of the above): N conversations at once, two turns each. Turn 1
is a prompt of [prompt-min, prompt-max] random token ids and --out-tokens answer tokens. Turn 2's
prompt repeats turn 1's prompt and answer, then --chat-followup new tokens; only turn 2 is
timed. The engine keeps its cache between the turns (engine-nocache: prefix caching off). HF
generate recomputes the conversation (hf), or keeps turn 1's cache and continues from it
(hf-prefix: `return_dict_in_generate`'s past key values passed back to `generate()`, the
batch's layout kept, which is transformers' own way to continue a conversation).

Mixed workload (--mixed N, instead of the above): N requests at once, prompts uniform in
[prompt-min, prompt-max], outputs uniform in --mixed-out; the engine serves them with
continuous batching, HF generate (same model, Llama, Mixtral) in arrival-order left-padded
batches of each size in --hf-batches, each batch run for its longest request; useful output
tokens/s (only the tokens asked for) and the engine over each baseline at its best batch.

Every system runs --repeats times, interleaved (the order reversed every other repeat);
the table shows each system's best run (noise on a shared machine only slows things down)
and the HTTP / engine ratio is the median over repeats of the two measured back to back. Reports output tokens/s, TTFT and time per output token
(p50), KV waste, greedy agreement of engine and HF, and a load check through the server
(--load-requests requests, --load-in-flight at once, the official openai client: errors and
KV blocks still held afterwards). Pin threads (--threads, and OMP_NUM_THREADS for the
server) so the systems compete on equal terms.

Scoring workload (--scoring-prompts N, 0 = skip): what an evaluation harness sends, prompt
log-probabilities only. N prompts of --scoring-len random token ids, each scored token by
token (teacher-forced log-probabilities, no generation): the engine (`SamplingParams(
max_tokens=0, prompt_logprobs=0)`, computed in its prefill), HTTP (`echo` + `logprobs` +
`max_tokens: 0`, --scoring-batch prompts per request as a token-id batch, as
lm-evaluation-harness's local-completions sends them, --load-in-flight requests at once)
and HF (one forward per right-padded batch of --scoring-batch prompts and a log-softmax
gather, what lm-eval's HF backend does). Reports prompt tokens scored per second and the
largest difference of the engine's scores from HF's.

    python benchmarks/serving.py --threads 1
    python benchmarks/serving.py --threads 1 --concurrency 16,64 --systems engine,http --out /tmp/r
    python benchmarks/serving.py --threads 1 --concurrency 1 --systems engine,http,hf --scoring-prompts 256 --out /tmp/r
    python benchmarks/serving.py --threads 1 --mixed 32 --prompt-min 16 --prompt-max 256 --systems engine,hf,llama,mixtral \
        --load-requests 0 --name serving-mixed                  # docs/results/serving-mixed.*
    python benchmarks/serving.py --threads 1 --concurrency 1 --systems engine,http,hf --repeats 1 --load-requests 0 \
        --scoring-prompts 128 --name serving-scoring            # docs/results/serving-scoring.*
    python benchmarks/serving.py --threads 1 --concurrency 1,32 --shared-prefix 512 --prompt-min 16 --prompt-max 64 \
        --out-tokens 32 --systems engine,engine-nocache,hf,hf-prefix,llama,llama-prefix,mixtral,mixtral-prefix \
        --load-requests 0 --name serving-prefix                 # docs/results/serving-prefix.*
    python benchmarks/serving.py --threads 1 --chat 32 --prompt-min 64 --prompt-max 256 --out-tokens 32 \
        --systems engine,engine-nocache,hf,hf-prefix --load-requests 0 --name serving-chat   # docs/results/serving-chat.*

Writes docs/results/serving.json and serving.md (--out and --name to change).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import replace

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from autoglm import OpenAutoGLMConfig
from autoglm.hf import OpenAutoGLMForCausalLM
from autoglm.inference import EngineConfig, LLMEngine, SamplingParams
from baselines import llama_like, mixtral_like
from results_io import interleaved, save_results

SYSTEMS = ("engine", "engine-nocache", "http", "hf", "llama", "mixtral", "hf-prefix", "llama-prefix", "mixtral-prefix")
SAME_AS = {"engine-nocache": "engine", "hf-prefix": "hf", "llama-prefix": "llama", "mixtral-prefix": "mixtral"}


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


def left_pad(prompts, pad_id, shared=0):
    """(ids, mask) of one batch: each prompt left-padded to the longest, the pads after the
    prompts' common first `shared` tokens (so those stay at the same positions in every row)."""
    if any(p[:shared] != prompts[0][:shared] for p in prompts):
        raise ValueError(f"the prompts do not share their first {shared} tokens")
    P = max(map(len, prompts))
    ids = torch.full((len(prompts), P), pad_id)
    mask = torch.zeros((len(prompts), P), dtype=torch.long)
    ids[:, :shared], mask[:, :shared] = torch.tensor(prompts[0][:shared]), 1
    for i, p in enumerate(prompts):
        ids[i, P - len(p) + shared:] = torch.tensor(p[shared:])
        mask[i, P - len(p) + shared:] = 1
    return ids, mask


def pct_identical(outs, ref) -> float:
    """Share of requests (%) whose output equals the reference's."""
    return round(100 * sum(x == y for x, y in zip(outs, ref)) / len(ref), 1)


def run_hf(model, prompts, n_out, pad_id, shared=0):
    """One left-padded batch of all prompts, n_out new tokens each. `shared` > 0: HF's prompt
    reuse for the prompts' common first `shared` tokens (timed): their K/V computed once into a
    `DynamicCache`, repeated over the batch, and `generate()` continues from it (each prompt's
    own tokens left-padded after the prefix, the pads masked)."""
    ids, mask = left_pad(prompts, pad_id, shared)
    P = ids.shape[1]
    clock = StepClock()
    t0 = time.perf_counter()
    kw = {}
    with torch.inference_mode():
        if shared:
            from transformers import DynamicCache

            prefix = ids[:1, :shared]
            kw["cache"] = DynamicCache(config=model.config)
            model(prefix, cache=kw["cache"], use_cache=True)
            kw["cache"].batch_repeat_interleave(len(prompts))
        out = model.generate(ids, attention_mask=mask, max_new_tokens=n_out, min_new_tokens=n_out, do_sample=False,
                             eos_token_id=None, pad_token_id=pad_id, logits_processor=LogitsProcessorList([clock]), **kw)
    wall = time.perf_counter() - t0
    alloc = sum(len(prompts) * (P + s) for s in range(n_out))  # padded cache slots held vs needed
    used = sum(len(p) + s for p in prompts for s in range(n_out))
    ttft = [clock.times[0] - t0] * len(prompts)
    tpot = [(clock.times[-1] - clock.times[0]) / (n_out - 1)] * len(prompts) if n_out > 1 else []
    return dict(wall=wall, tokens=len(prompts) * n_out, ttft=ttft, tpot=tpot, kv_waste=1 - used / alloc), \
        [o[P:].tolist() for o in out]


def run_engine(model, tokenizer, prompts, n_out, cfg):
    eng = LLMEngine(model, tokenizer, cfg)
    t0 = time.perf_counter()
    reqs = eng.generate(prompts, SamplingParams(max_tokens=n_out, temperature=0, ignore_eos=True))
    wall = time.perf_counter() - t0
    assert eng.pool.num_free == eng.pool.num_blocks, "leaked KV blocks"
    return dict(wall=wall, tokens=sum(len(r.output_ids) for r in reqs), kv_waste=eng.stats.kv_waste,
                prefix_hit=eng.stats.prefix_hit_rate,
                ttft=[r.first_token_time - t0 for r in reqs],
                tpot=[(r.token_times[-1] - r.token_times[0]) / (len(r.token_times) - 1) for r in reqs
                      if len(r.token_times) > 1]), [r.output_ids for r in reqs]


# --------------------------------------------------------------------- scoring
def score_engine(model, tokenizer, prompts, cfg):
    eng = LLMEngine(model, tokenizer, cfg)
    t0 = time.perf_counter()
    reqs = eng.generate(prompts, SamplingParams(max_tokens=0, prompt_logprobs=0))
    wall = time.perf_counter() - t0
    assert eng.pool.num_free == eng.pool.num_blocks, "leaked KV blocks"
    return wall, [[e.logprob for e in r.prompt_logprobs] for r in reqs]


def score_hf(model, prompts, batch, pad_id):
    out = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(prompts), batch):
            chunk = prompts[i:i + batch]
            P = max(map(len, chunk))
            ids = torch.full((len(chunk), P), pad_id)
            for j, p in enumerate(chunk):
                ids[j, :len(p)] = torch.tensor(p)  # right padding: causal rows never see it
            lp = model(ids).logits.float().log_softmax(-1)
            nxt = lp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
            out += [nxt[j, :len(p) - 1].tolist() for j, p in enumerate(chunk)]
    return time.perf_counter() - t0, out


def score_http(url, prompts, batch, in_flight):
    def post(chunk):
        body = json.dumps({"model": "bench", "prompt": chunk, "max_tokens": 0, "echo": True, "logprobs": 0}).encode()
        req = urllib.request.Request(url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            choices = sorted(json.load(r)["choices"], key=lambda c: c["index"])
        return [c["logprobs"]["token_logprobs"][1:] for c in choices]

    chunks = [prompts[i:i + batch] for i in range(0, len(prompts), batch)]
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(in_flight) as pool:
        results = list(pool.map(post, chunks))
    return time.perf_counter() - t0, [lp for r in results for lp in r]


def measure_scoring(a, systems, model, tokenizer, cfg, url):
    """Prompt tokens scored per second by each system; best of --repeats, interleaved."""
    g = torch.Generator().manual_seed(a.seed + 1)
    prompts = [torch.randint(2, model.config.vocab_size, (a.scoring_len,), generator=g).tolist()
               for _ in range(a.scoring_prompts)]
    n_scored = sum(len(p) - 1 for p in prompts)
    score_engine(model, tokenizer, prompts[:2], cfg)  # warm-up
    best, scores = {}, {}
    for rep, s in interleaved(systems, a.repeats):
        if s == "engine":
            wall, out = score_engine(model, tokenizer, prompts, cfg)
        elif s == "http":
            wall, out = score_http(url, prompts, a.scoring_batch, a.load_in_flight)
        elif s == "hf":
            wall, out = score_hf(model, prompts, a.scoring_batch, model.config.pad_token_id)
        else:
            continue  # the Llama baseline has other weights: its scores are not comparable
        scores[s] = out
        best[s] = min(best.get(s, wall), wall)
        print(f"scoring rep {rep} {s}: {n_scored / wall:.0f} prompt tok/s", flush=True)
    diff = {s: max(abs(x - y) for a_, b_ in zip(scores[s], scores["hf"]) for x, y in zip(a_, b_))
            for s in scores if s != "hf" and "hf" in scores}
    return dict(prompts=a.scoring_prompts, prompt_len=a.scoring_len, batch=a.scoring_batch,
                rows=[dict(system=s, wall_s=round(w, 3), prompt_tok_s=round(n_scored / w, 1),
                           max_abs_diff_vs_hf=None if s not in diff else float(f"{diff[s]:.2e}"))
                      for s, w in best.items()])


# ------------------------------------------------------------------ conversations
def measure_chat(a, systems, model, g):
    """--chat N conversations, two turns; turn 2 timed (see the module docstring)."""
    mc, n, out, pad = model.config, a.chat, a.out_tokens, model.config.pad_token_id
    p1 = [torch.randint(2, mc.vocab_size, (int(k),), generator=g).tolist()
          for k in torch.randint(a.prompt_min, a.prompt_max + 1, (n,), generator=g)]
    follow = [torch.randint(2, mc.vocab_size, (a.chat_followup,), generator=g).tolist() for _ in range(n)]
    longest = a.prompt_max + 2 * out + a.chat_followup
    cfg = EngineConfig(block_size=a.block_size, num_blocks=2 * n * (-(-longest // a.block_size) + 1), max_num_seqs=n,
                       max_num_batched_tokens=a.max_batched_tokens)
    sp = SamplingParams(max_tokens=out, temperature=0, ignore_eos=True)

    def engine(cache: bool):
        eng = LLMEngine(model, config=replace(cfg, prefix_caching=cache))
        r1 = eng.generate(p1, sp)
        p2 = [p + r.output_ids + f for p, r, f in zip(p1, r1, follow)]
        q0, h0 = eng.stats.prefix_queried, eng.stats.prefix_hits
        t0 = time.perf_counter()
        r2 = eng.generate(p2, sp)
        wall = time.perf_counter() - t0
        hit = (eng.stats.prefix_hits - h0) / max(eng.stats.prefix_queried - q0, 1)
        return dict(wall=wall, ttft=[r.first_token_time - t0 for r in r2], hit=hit), [r.output_ids for r in r2]

    def hf(keep: bool):
        ids, mask = left_pad(p1, pad)
        gen = dict(max_new_tokens=out, min_new_tokens=out, do_sample=False, eos_token_id=None, pad_token_id=pad)
        with torch.inference_mode():
            o1 = model.generate(ids, attention_mask=mask, return_dict_in_generate=True, **gen)
            ids2 = torch.cat([o1.sequences, torch.tensor(follow)], 1)
            mask2 = torch.cat([mask, torch.ones(n, out + a.chat_followup, dtype=torch.long)], 1)
            kw = {"cache": o1.past_key_values} if keep else {}
            clock = StepClock()
            t0 = time.perf_counter()
            o2 = model.generate(ids2, attention_mask=mask2, logits_processor=LogitsProcessorList([clock]), **gen, **kw)
            wall = time.perf_counter() - t0
        return dict(wall=wall, ttft=[clock.times[0] - t0] * n, hit=None), o2[:, ids2.shape[1]:].tolist()

    runs = {"engine": lambda: engine(True), "engine-nocache": lambda: engine(False), "hf": lambda: hf(False),
            "hf-prefix": lambda: hf(True)}
    runs = {k: f for k, f in runs.items() if k in systems}
    best, outs = {}, {}
    for rep, key in interleaved(runs, a.repeats):
        r, o = runs[key]()
        print(f"chat rep {rep} {key}: turn 2 {n * out / r['wall']:.1f} tok/s, TTFT p50 {pct(r['ttft'], 50):.3f} s",
              flush=True)
        if key not in best or r["wall"] < best[key]["wall"]:
            best[key], outs[key] = r, o
    names = {"engine": "engine (cache kept between turns)", "engine-nocache": "engine, prefix caching off",
             "hf": "HF generate, conversation recomputed", "hf-prefix": "HF generate, turn 1's cache kept"}
    rows = [dict(id=k, system=names[k], wall_s=round(r["wall"], 3), out_tok_s=round(n * out / r["wall"], 1),
                 ttft_p50_s=round(pct(r["ttft"], 50), 3),
                 prefix_hit_pct=None if r["hit"] is None else round(100 * r["hit"], 1)) for k, r in best.items()]
    ref = outs.get("hf")
    same = {k: pct_identical(o, ref) for k, o in outs.items() if ref and k != "hf"}
    return dict(chat=dict(conversations=n, rows=rows, identical_to_hf_pct=same))


def markdown_chat(a, res) -> str:
    c = res["chat"]
    eng = next((r for r in c["rows"] if r["id"] == "engine"), None)
    md = [f"Conversations: {c['conversations']} at once, two turns each; turn 1 a prompt of {a.prompt_min}-"
          f"{a.prompt_max} random token ids and {a.out_tokens} answer tokens, turn 2 that prompt + answer + "
          f"{a.chat_followup} new tokens and {a.out_tokens} answer tokens (greedy, EOS ignored); only turn 2 is "
          f"timed. Model: the `{a.preset}` preset, random weights ({res['params_total'] / 1e6:.1f}M parameters). "
          f"Best of {a.repeats} interleaved runs; torch threads {a.threads}.", "",
          "| system | turn 2 wall s | output tok/s | engine / it | TTFT p50 s | prefix hit % |", "|---|---|---|---|---|---|"]
    for r in c["rows"]:
        ratio = f"{eng['out_tok_s'] / r['out_tok_s']:.2f}x" if eng and r is not eng else ""
        md.append(f"| {r['system']} | {r['wall_s']} | {r['out_tok_s']} | {ratio} | {r['ttft_p50_s']} | "
                  f"{'' if r['prefix_hit_pct'] is None else r['prefix_hit_pct']} |")
    if c["identical_to_hf_pct"]:
        md.append("\nconversations whose turn-2 greedy output equals HF's (recomputed): " + ", ".join(
            f"{k} {v}%" for k, v in c["identical_to_hf_pct"].items()))
    return "\n".join(md)


# ----------------------------------------------------------------- mixed workload
def run_hf_mixed(model, prompts, n_outs, batch, pad_id):
    """HF generate over requests of different output lengths: batches of `batch` in arrival order,
    each left-padded and run for its longest request's tokens; the wanted tokens count."""
    t0, outs = time.perf_counter(), []
    for i in range(0, len(prompts), batch):
        ns = n_outs[i:i + batch]
        _, out = run_hf(model, prompts[i:i + batch], max(ns), pad_id)
        outs += [o[:n] for o, n in zip(out, ns)]
    return time.perf_counter() - t0, outs


def measure_mixed(a, systems, model, llama, mixtral, g):
    """--mixed N requests at once: prompts uniform in [prompt-min, prompt-max], outputs uniform in
    --mixed-out; the engine serves them with continuous batching, HF generate (same model, Llama,
    Mixtral) in arrival-order batches of each of --hf-batches (its best batch counts)."""
    mc = model.config
    lo, hi = (int(x) for x in a.mixed_out.split(","))
    n = a.mixed
    prompts = [torch.randint(2, mc.vocab_size, (int(k),), generator=g).tolist()
               for k in torch.randint(a.prompt_min, a.prompt_max + 1, (n,), generator=g)]
    n_outs = [int(k) for k in torch.randint(lo, hi + 1, (n,), generator=g)]
    useful = sum(n_outs)
    cfg = EngineConfig(block_size=a.block_size, num_blocks=n * (-(-(a.prompt_max + hi) // a.block_size) + 1),
                       max_num_seqs=n, max_num_batched_tokens=a.max_batched_tokens)

    def engine():
        eng = LLMEngine(model, config=cfg)
        t0 = time.perf_counter()
        reqs = eng.generate(prompts, [SamplingParams(max_tokens=k, temperature=0, ignore_eos=True) for k in n_outs])
        return time.perf_counter() - t0, [r.output_ids for r in reqs]

    hf_models = {"hf": (model, mc.pad_token_id), "llama": (llama, 0), "mixtral": (mixtral, 0)}
    runs = {"engine": engine} if "engine" in systems else {}
    for s in systems:
        if s in hf_models:
            for b in [int(x) for x in a.hf_batches.split(",")]:
                runs[f"{s}@{b}"] = (lambda m, pad, b: lambda: run_hf_mixed(m, prompts, n_outs, b, pad))(*hf_models[s], b)
    load0 = os.getloadavg()
    LLMEngine(model, config=cfg).generate(prompts[:2], SamplingParams(max_tokens=2, temperature=0))  # warm-up
    best, outs, walls = {}, {}, {key: [] for key in runs}
    for rep, key in interleaved(runs, a.repeats):
        wall, out = runs[key]()
        print(f"mixed rep {rep} {key}: {useful / wall:.1f} tok/s", flush=True)
        walls[key].append(wall)
        if wall < best.get(key, float("inf")):
            best[key], outs[key] = wall, out
    load1 = os.getloadavg()
    rows = [dict(system=k, batch=int(k.split("@")[1]) if "@" in k else None, wall_s=round(w, 3),
                 out_tok_s=round(useful / w, 1)) for k, w in best.items()]
    eng = useful / best["engine"] if "engine" in best else None
    best_of = {}
    for s in ("hf", "llama", "mixtral"):
        cand = [r for r in rows if r["system"].startswith(s + "@")]
        if cand:
            best_of[s] = max(cand, key=lambda r: r["out_tok_s"])
    # paired ratios: the engine against each baseline at its best batch *within the same repeat*,
    # so a machine that drifts between repeats (the engine's time moved 1.4x between runs on a
    # shared 2-core machine) cancels out of each ratio
    paired = {}
    if "engine" in walls:
        for s in ("hf", "llama", "mixtral"):
            keys = [k for k in walls if k.startswith(s + "@")]
            if keys:
                paired[s] = [round(min(walls[k][r] for k in keys) / walls["engine"][r], 3) for r in range(a.repeats)]
    same = None
    if "engine" in outs and "hf" in best_of:
        ref = outs[best_of["hf"]["system"]]
        same = pct_identical(outs["engine"], ref)
    return dict(mixed=dict(requests=n, useful_tokens=useful, rows=rows,
                           engine_over_best={s: round(eng / r["out_tok_s"], 3) for s, r in best_of.items()}
                           if eng else {}, best_batch={s: r["batch"] for s, r in best_of.items()},
                           engine_over_best_paired=paired, walls={k: [round(w, 3) for w in v] for k, v in walls.items()},
                           greedy_identical_to_hf_pct=same, load_start=load0, load_end=load1))


def markdown_mixed(a, res) -> str:
    m = res["mixed"]
    md = [f"Mixed workload: {m['requests']} requests arrive together, prompts of {a.prompt_min}-{a.prompt_max} random "
          f"token ids, outputs of {a.mixed_out.replace(',', '-')} tokens (uniform per request; {m['useful_tokens']} in "
          f"all; greedy, EOS ignored); model: the `{a.preset}` preset, random weights "
          f"({res['params_total'] / 1e6:.1f}M parameters); transformers' Llama "
          f"({(res['llama_params_total'] or 0) / 1e6:.1f}M) and Mixtral ({(res['mixtral_params_total'] or 0) / 1e6:.1f}M) "
          f"at the same width, depth, heads, vocabulary and expert sizes. The engine serves all requests with "
          f"continuous batching; HF generate runs them in arrival-order batches of {a.hf_batches} (left-padded, each "
          f"batch for its longest request; only the tokens asked for count). Best of {a.repeats} interleaved runs; "
          f"torch threads {a.threads}. Load average at start {tuple(round(x, 2) for x in m['load_start'])}, at end "
          f"{tuple(round(x, 2) for x in m['load_end'])}: the machine is shared, compare ratios within the run.", "",
          "| system | HF batch | wall s | useful output tok/s |", "|---|---|---|---|"]
    md += [f"| {r['system'].split('@')[0]} | {r['batch'] or ''} | {r['wall_s']} | {r['out_tok_s']} |" for r in m["rows"]]
    if m["engine_over_best"]:
        md.append("\nengine / each baseline at its best batch: " + ", ".join(
            f"**{v:.2f}x** {s} (batch {m['best_batch'][s]})" for s, v in m["engine_over_best"].items()))
    if m.get("engine_over_best_paired"):
        md.append("\nper repeat (the engine against each baseline's best batch of the same repeat; median, then each "
                  "repeat): " + ", ".join(f"{s} **{statistics.median(v):.2f}x** ({' / '.join(f'{x:.2f}' for x in v)})"
                                         for s, v in m["engine_over_best_paired"].items()))
    if m["greedy_identical_to_hf_pct"] is not None:
        md.append(f"\nrequests with greedy output identical to HF generate: {m['greedy_identical_to_hf_pct']}%")
    return "\n".join(md)


# ------------------------------------------------------------------------ HTTP
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run_dir, cfg: EngineConfig, threads: int, port: int) -> subprocess.Popen:
    """`autoglm serve` in its own process (the deployment path), with the benchmark's engine config."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else dict(os.environ)
    cmd = [sys.executable, "-c", "from autoglm.cli import main; main()", "serve", str(run_dir), "--port", str(port),
           "--served-model-name", "bench", "--block-size", str(cfg.block_size), "--num-blocks", str(cfg.num_blocks),
           "--max-num-seqs", str(cfg.max_num_seqs), "--max-num-batched-tokens", str(cfg.max_num_batched_tokens),
           "--max-concurrent", "100000", "--max-prompts", "100000"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"autoglm serve exited: {proc.stderr.read()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("autoglm serve did not come up within 300 s")


async def _stream(host, port, prompt, n_out):
    """One streaming completion over a raw HTTP/1.1 connection: a lean client, so that the
    client's own CPU (it shares the machine) stays small next to the server's. Returns the
    send time, the time of every read that brought events, and the completion tokens (usage)."""
    body = json.dumps({"model": "bench", "prompt": prompt, "max_tokens": n_out, "temperature": 0,
                       "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}).encode()
    reader, writer = await asyncio.open_connection(host, port)
    t0 = time.perf_counter()
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\nConnection: close\r\n\r\n" % (host.encode(), len(body)) + body)
    head = await reader.readuntil(b"\r\n\r\n")
    if b" 200 " not in head.split(b"\r\n", 1)[0]:
        raise RuntimeError(f"server answered {head[:200]!r}")
    times, parts = [], []
    while data := await reader.read(1 << 16):
        times.append(time.perf_counter())
        parts.append(data)
    writer.close()
    text = b"".join(parts)
    usage = text[text.rindex(b'"usage": '):]
    n = json.loads(usage[9:usage.index(b"}") + 1])["completion_tokens"]
    return t0, times, n


def run_http(url, prompts, n_out):
    host, port = url.removeprefix("http://").split(":")

    async def main():
        t = time.perf_counter()
        res = await asyncio.gather(*(_stream(host, int(port), p, n_out) for p in prompts))
        return res, time.perf_counter() - t

    res, wall = asyncio.run(main())
    return dict(wall=wall, tokens=sum(n for *_, n in res), ttft=[ts[0] - t0 for t0, ts, _ in res],
                tpot=[(ts[-1] - ts[0]) / (n - 1) for _, ts, n in res if n > 1], kv_waste=None), None


def load_check(url, n, in_flight):
    import openai

    async def main():
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        sem, errors = asyncio.Semaphore(in_flight), []

        async def one(i):
            async with sem:
                try:
                    if i % 2:
                        stream = await client.completions.create(model="bench", prompt=f"def f{i}(x):",
                                                                 max_tokens=8 + i % 24, stream=True, temperature=0.8,
                                                                 seed=i)
                        async for _ in stream:
                            pass
                    else:
                        await client.completions.create(model="bench", prompt=f"Return {i}", max_tokens=8 + i % 24)
                except Exception as e:  # noqa: BLE001 - counted and reported
                    errors.append(repr(e))

        await asyncio.gather(*(one(i) for i in range(n)))
        return errors

    t = time.perf_counter()
    errors = asyncio.run(main())
    wall = time.perf_counter() - t
    time.sleep(0.5)
    with urllib.request.urlopen(url + "/metrics") as r:
        metrics = r.read().decode()
    held = next(float(x.split()[-1]) for x in metrics.splitlines() if x.startswith("autoglm_kv_blocks_in_use "))
    return dict(requests=n, in_flight=in_flight, errors=len(errors), first_errors=errors[:3],
                leaked_blocks=int(held), wall_s=round(wall, 1))


# ---------------------------------------------------------------------- report
def summary(name, c, r, engine_tok_s=None):
    tok_s = r["tokens"] / r["wall"]
    row = dict(system=name, concurrency=c, wall_s=round(r["wall"], 2), out_tok_s=round(tok_s, 1),
               ttft_p50_s=round(pct(r["ttft"], 50), 3), tpot_p50_ms=round(1e3 * pct(r["tpot"], 50), 2),
               kv_waste_pct=None if r["kv_waste"] is None else round(100 * r["kv_waste"], 1),
               prefix_hit_pct=round(100 * r["prefix_hit"], 1) if "prefix_hit" in r else None)
    row["vs_engine"] = round(tok_s / engine_tok_s, 2) if engine_tok_s else None
    return row


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small", help="model preset (random weights)")
    ap.add_argument("--concurrency", default="1,16,64", help="requests at once (and HF batch sizes)")
    ap.add_argument("--prompt-min", type=int, default=16)
    ap.add_argument("--prompt-max", type=int, default=32)
    ap.add_argument("--out-tokens", type=int, default=64, help="new tokens per request (EOS ignored)")
    ap.add_argument("--shared-prefix", type=int, default=0, help="tokens every prompt starts with (a system prompt; "
                    "0 = none): what prefix caching saves")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help=f"any of {','.join(SYSTEMS)}")
    ap.add_argument("--repeats", type=int, default=2, help="runs per system (interleaved); the best counts")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--max-batched-tokens", type=int, default=2048)
    ap.add_argument("--load-requests", type=int, default=200, help="load check through the server (0 = skip)")
    ap.add_argument("--load-in-flight", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="torch threads here and OMP_NUM_THREADS of the server "
                                                           "(0 = leave as is)")
    ap.add_argument("--scoring-prompts", type=int, default=0, help="scoring workload: prompts scored (0 = skip)")
    ap.add_argument("--scoring-len", type=int, default=128, help="scoring workload: tokens per prompt")
    ap.add_argument("--scoring-batch", type=int, default=16, help="scoring workload: prompts per HTTP request / "
                                                                  "HF forward")
    ap.add_argument("--mixed", type=int, default=0, help="mixed workload instead: this many requests at once, prompts "
                                                          "of --prompt-min..max tokens, outputs of --mixed-out tokens")
    ap.add_argument("--chat", type=int, default=0, help="conversations instead: this many at once, two turns, turn 2 "
                    "timed (0 = off)")
    ap.add_argument("--chat-followup", type=int, default=16, help="conversations: new tokens in turn 2's prompt")
    ap.add_argument("--mixed-out", default="16,128", help="mixed workload: output lengths (uniform, inclusive)")
    ap.add_argument("--hf-batches", default="8,16,32", help="mixed workload: batch sizes tried for HF generate "
                                                            "(requests in arrival order); the best counts")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="results folder (default: docs/results)")
    ap.add_argument("--name", default="serving", help="results file name (serving-scoring for the scoring run)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    systems = [s for s in a.systems.split(",") if s]
    if bad := set(systems) - set(SYSTEMS):
        ap.error(f"--systems: unknown {sorted(bad)}; choose from {SYSTEMS}")
    conc = [int(c) for c in a.concurrency.split(",")]
    torch.manual_seed(a.seed)
    model = OpenAutoGLMForCausalLM(OpenAutoGLMConfig.from_name(a.preset, initializer_range=0.1)).eval()
    mc = model.config
    max_len = max(a.shared_prefix + a.prompt_max + a.out_tokens, a.scoring_len if a.scoring_prompts else 0)
    C = max(conc + ([a.scoring_batch * a.load_in_flight] if a.scoring_prompts else []))
    cfg = EngineConfig(block_size=a.block_size, num_blocks=C * (-(-max_len // a.block_size) + 1), max_num_seqs=C,
                       max_num_batched_tokens=a.max_batched_tokens)
    g = torch.Generator().manual_seed(a.seed)
    if a.shared_prefix and a.mixed:
        ap.error("--shared-prefix applies to the standard workload, not to --mixed")
    if a.shared_prefix < 0 or a.shared_prefix + a.prompt_max + a.out_tokens > mc.max_position_embeddings:
        ap.error(f"--shared-prefix {a.shared_prefix} + --prompt-max {a.prompt_max} + --out-tokens {a.out_tokens} must "
                 f"fit the model's context of {mc.max_position_embeddings} tokens")
    prefix = torch.randint(2, mc.vocab_size, (a.shared_prefix,), generator=g).tolist()
    workloads = {c: [prefix + torch.randint(2, mc.vocab_size, (int(n),), generator=g).tolist()
                     for n in torch.randint(a.prompt_min, a.prompt_max + 1, (c,), generator=g)] for c in conc}
    if any(s.endswith("-prefix") for s in systems) and not (a.shared_prefix or a.chat):
        ap.error("the *-prefix systems reuse the prompts' shared prefix: give --shared-prefix")
    llama = llama_like(mc, mc.max_position_embeddings) if any(s.startswith("llama") for s in systems) else None
    mixtral = mixtral_like(mc, mc.max_position_embeddings) if any(s.startswith("mixtral") for s in systems) else None
    if a.chat:
        if bad := set(systems) - {"engine", "engine-nocache", "hf", "hf-prefix"}:
            ap.error(f"--chat compares engine, engine-nocache, hf and hf-prefix; drop {sorted(bad)}")
        res = measure_chat(a, systems, model, g)
        res.update(args=vars(a), params_total=params(model))
        save_results(a.out, a.name, res, markdown_chat(a, res))
        return
    if a.mixed:
        res = measure_mixed(a, systems, model, llama, mixtral, g)
        res.update(args=vars(a), params_total=params(model), llama_params_total=params(llama) if llama else None,
                   mixtral_params_total=params(mixtral) if mixtral else None)
        save_results(a.out, a.name, res, markdown_mixed(a, res))
        return
    print(f"preset {a.preset}: {params(model) / 1e6:.1f}M params; Llama baseline "
          f"{params(llama) / 1e6 if llama else 0:.1f}M; torch threads {torch.get_num_threads()}; "
          f"concurrency {conc}; {a.out_tokens} tokens each", flush=True)

    from autoglm.data import stdlib_docstring_corpus
    from autoglm.tokenizer import save_tokenizer, train_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tok = train_tokenizer(stdlib_docstring_corpus()[:500], vocab_size=mc.vocab_size)
        save_tokenizer(tok, tmp)
        model.save_pretrained(tmp)
        from autoglm.tokenizer import load_tokenizer
        tokenizer = load_tokenizer(tmp)
        server = url = None
        if "http" in systems or a.load_requests:  # (--max-prompts: the scoring batches)
            port = free_port()
            server = start_server(tmp, cfg, a.threads, port)
            url = f"http://127.0.0.1:{port}"
            run_http(url, workloads[conc[0]][:1], 4)  # warm-up
        try:
            res = measure(a, systems, conc, workloads, model, llama, mixtral, tokenizer, cfg, url)
            if a.scoring_prompts:
                res["scoring"] = measure_scoring(a, systems, model, tokenizer, cfg, url)
            if a.load_requests:
                res["load_check"] = load_check(url, a.load_requests, a.load_in_flight)
                print("load check", res["load_check"], flush=True)
        finally:
            if server is not None:
                server.terminate()
                server.wait(timeout=30)
    res.update(args=vars(a), params_total=params(model), llama_params_total=params(llama) if llama else None)
    save_results(a.out, a.name, res, markdown(a, res, conc))


def measure(a, systems, conc, workloads, model, llama, mixtral, tokenizer, cfg, url):
    run_engine(model, tokenizer, workloads[conc[0]][:1], 4, cfg)  # warm-up
    best: dict[tuple[str, int], dict] = {}
    outputs, rep_ratios = {}, {}
    for c in conc:
        prompts = workloads[c]
        tok_s_of = {}
        for rep, s in interleaved(systems, a.repeats):  # alternate the order: load drifts cancel
            if s == "engine":
                r, out = run_engine(model, tokenizer, prompts, a.out_tokens, cfg)
            elif s == "engine-nocache":
                r, out = run_engine(model, tokenizer, prompts, a.out_tokens, replace(cfg, prefix_caching=False))
            elif s == "http":
                r, out = run_http(url, prompts, a.out_tokens)
            else:
                base, shared = s.removesuffix("-prefix"), a.shared_prefix if s.endswith("-prefix") else 0
                m, pad = {"hf": (model, model.config.pad_token_id), "llama": (llama, 0), "mixtral": (mixtral, 0)}[base]
                r, out = run_hf(m, prompts, a.out_tokens, pad, shared)
            tok_s = tok_s_of[rep, s] = r["tokens"] / r["wall"]
            print(f"c={c} rep {rep} {s}: {tok_s:.1f} tok/s", flush=True)
            if (s, c) not in best or tok_s > best[(s, c)]["tokens"] / best[(s, c)]["wall"]:
                best[(s, c)] = r
            if out is not None:
                outputs[(s, c)] = out
        if "engine" in systems and "http" in systems:
            rep_ratios[c] = [tok_s_of[rep, "http"] / tok_s_of[rep, "engine"] for rep in range(a.repeats)]
    names = {"engine": "engine (LLMEngine.generate)", "engine-nocache": "engine, prefix caching off",
             "hf-prefix": "HF generate + prompt reuse, same model",
             "llama-prefix": "HF generate + prompt reuse, transformers Llama",
             "mixtral-prefix": "HF generate + prompt reuse, transformers Mixtral",
             "http": "HTTP (autoglm serve, streaming)",
             "hf": "HF generate, same model", "llama": "HF generate, transformers Llama",
             "mixtral": "HF generate, transformers Mixtral"}
    rows, ratios, agree, cache_agree = [], {}, {}, {}  # (cache_agree: each system against SAME_AS)
    for c in conc:
        eng = best.get(("engine", c))
        eng_tok_s = eng["tokens"] / eng["wall"] if eng else None
        for s in systems:
            rows.append({"id": s, **summary(names[s], c, best[(s, c)], eng_tok_s)})
        if c in rep_ratios:  # measured back to back in each repeat; the median repeat
            ratios[c] = round(statistics.median(rep_ratios[c]), 3)
        if ("engine", c) in outputs and ("hf", c) in outputs:
            agree[c] = pct_identical(outputs[("engine", c)], outputs[("hf", c)])
        for s, ref in SAME_AS.items():
            if (s, c) in outputs and (ref, c) in outputs:
                cache_agree.setdefault(s, {})[c] = pct_identical(outputs[(s, c)], outputs[(ref, c)])
    return dict(rows=rows, http_over_engine=ratios, http_over_engine_per_repeat={
        c: [round(x, 3) for x in v] for c, v in rep_ratios.items()}, greedy_identical_requests_pct=agree,
        identical_to_counterpart_pct=cache_agree)


def markdown(a, res, conc) -> str:
    shared = (f"the same {a.shared_prefix} random token ids (a shared system prompt) followed by "
              if a.shared_prefix else "")
    md = [f"Workload: at each concurrency c, c requests arrive together; prompts of {shared}{a.prompt_min}-"
          f"{a.prompt_max} random token ids, {a.out_tokens} new tokens each (greedy, EOS ignored); model: the `{a.preset}` preset, "
          f"random weights ({res['params_total'] / 1e6:.1f}M parameters); Llama baseline: transformers' "
          f"LlamaForCausalLM with the same width, depth, heads, vocabulary and total parameters"
          + (f" ({res['llama_params_total'] / 1e6:.1f}M)" if res["llama_params_total"] else "")
          + f". The HTTP clients are raw HTTP/1.1 streaming connections from the benchmark process (they share the "
          f"CPU with the server). Best of {a.repeats} interleaved runs per system; torch threads "
          f"{a.threads or 'default'} (the server process: OMP_NUM_THREADS={a.threads}). The machine's cores are "
          f"shared with other jobs: compare ratios within the run, not absolute numbers across runs.", "",
          "| system | concurrency | wall s | output tok/s | vs engine | TTFT p50 s | TPOT p50 ms | KV waste % | "
          "prefix hit % |", "|---|---|---|---|---|---|---|---|---|"]
    blank = lambda v: "" if v is None else v  # noqa: E731
    for r in res["rows"]:
        md.append(f"| {r['system']} | {r['concurrency']} | {r['wall_s']} | {r['out_tok_s']} | {r['vs_engine']} | "
                  f"{r['ttft_p50_s']} | {r['tpot_p50_ms']} | {blank(r['kv_waste_pct'])} | "
                  f"{blank(r.get('prefix_hit_pct'))} |")
    if res["http_over_engine"]:
        md.append("\nHTTP / engine throughput (the two measured back to back in each repeat; the median, then each repeat): "
                  + ", ".join(f"**{v:.2f}** at {c} streams ({', '.join(f'{x:.2f}' for x in res['http_over_engine_per_repeat'][c])})"
                              for c, v in res["http_over_engine"].items()))
    labels = {"hf": "HF generate", "llama": "Llama generate", "mixtral": "Mixtral generate",
              "hf-prefix": "HF generate with prompt reuse", "llama-prefix": "Llama with prompt reuse",
              "mixtral-prefix": "Mixtral with prompt reuse", "engine-nocache": "the engine without prefix caching"}
    vs = {(r["id"], r["concurrency"]): r["out_tok_s"] for r in res["rows"]}
    lines = [f"{vs[('engine', c)] / vs[(k, c)]:.2f}x {label} at {c}" for c in conc for k, label in labels.items()
             if ("engine", c) in vs and (k, c) in vs]
    if lines:
        md.append("\nengine throughput / baseline: " + ", ".join(lines))
    if res["greedy_identical_requests_pct"]:
        md.append("\nrequests with greedy output identical to HF generate: " + ", ".join(
            f"{v}% at {c}" for c, v in res["greedy_identical_requests_pct"].items()))
    for s, by_c in res.get("identical_to_counterpart_pct", {}).items():
        md.append(f"\nrequests with greedy output identical, {s} vs {SAME_AS[s]}: " + ", ".join(
            f"{v}% at {c}" for c, v in by_c.items()))
    if "scoring" in res:
        sc = res["scoring"]
        md += [f"\nScoring (prompt log-probabilities only, as an evaluation harness asks): {sc['prompts']} prompts of "
               f"{sc['prompt_len']} random token ids, every token but the first scored; HTTP sends token-id batches "
               f"of {sc['batch']} with echo + max_tokens 0, {a.load_in_flight} requests in flight; HF runs one "
               f"forward per right-padded batch of {sc['batch']}.", "",
               "| system | wall s | prompt tok/s | max abs diff vs HF |", "|---|---|---|---|"]
        md += [f"| {r['system']} | {r['wall_s']} | {r['prompt_tok_s']} | "
               f"{'' if r['max_abs_diff_vs_hf'] is None else r['max_abs_diff_vs_hf']} |" for r in sc["rows"]]
    if "load_check" in res:
        lc = res["load_check"]
        md.append(f"\nload check through the server: {lc['requests']} requests, {lc['in_flight']} in flight (official "
                  f"openai client, half streamed), {lc['errors']} errors, {lc['leaked_blocks']} KV blocks held "
                  f"afterwards, {lc['wall_s']} s")
    return "\n".join(md)


if __name__ == "__main__":
    main()
