"""Prompt logprobs computed by the engine in the prefill it runs anyway: chunked prefill,
preemption and the other requests of a batch must not change them (references: one full
forward of the model)."""

import torch

from autoglm.inference import EngineConfig, LLMEngine, SamplingParams

from inference_helpers import make_model, prompts


def reference(model, ids):
    with torch.no_grad():
        lp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    return [float(lp[i, ids[i + 1]]) for i in range(len(ids) - 1)]


def test_prompt_logprobs_chunked_batched_and_preempted(tiny_model):
    ps = prompts(6, 20, 60, seed=5)
    score = SamplingParams(max_tokens=0, prompt_logprobs=3)
    gen = SamplingParams(max_tokens=30, temperature=0, prompt_logprobs=0, ignore_eos=True)
    mixed = [gen, score, SamplingParams(max_tokens=30, temperature=0.9, seed=1, ignore_eos=True), gen, score, gen]
    # dense attention (every key kept), a 16-token step budget (every prompt in chunks) and a pool
    # too small for all six at once: requests get preempted and recomputed
    dense = make_model("standard-tiny")
    eng = LLMEngine(dense, None, EngineConfig(block_size=4, num_blocks=48, max_num_batched_tokens=16))
    reqs = eng.generate(ps, mixed)
    assert eng.stats.preemptions > 0 and any(r.num_preemptions and r.params is gen for r in reqs)
    for ids, p, r in zip(ps, mixed, reqs):
        if p.prompt_logprobs is None:
            assert r.prompt_logprobs == []
            continue
        got = [e.logprob for e in r.prompt_logprobs]
        assert len(got) == len(ids) - 1 and [e.token_id for e in r.prompt_logprobs] == ids[1:]
        assert max(abs(a - b) for a, b in zip(got, reference(dense, ids))) < 1e-4
        assert all(len(e.top) == p.prompt_logprobs for e in r.prompt_logprobs)
        assert len(r.output_ids) == p.max_tokens
    # alone, in one step: the same numbers
    alone = LLMEngine(dense, None, EngineConfig(block_size=4, num_blocks=64))
    (r1,) = alone.generate([ps[1]], score)
    assert max(abs(a.logprob - b.logprob) for a, b in zip(r1.prompt_logprobs, reqs[1].prompt_logprobs)) < 1e-5


def test_sparse_window_prompt_logprobs(tiny_model):
    """The sparse model (window + global tokens) frees blocks out of the window during a
    chunked prefill; prompts longer than the window still score like a full forward."""
    ps = prompts(2, 90, 120, seed=6)
    eng = LLMEngine(tiny_model, None, EngineConfig(block_size=8, num_blocks=64, max_num_batched_tokens=16))
    for ids, r in zip(ps, eng.generate(ps, SamplingParams(max_tokens=0, prompt_logprobs=0))):
        got = [e.logprob for e in r.prompt_logprobs]
        assert max(abs(a - b) for a, b in zip(got, reference(tiny_model, ids))) < 1e-4


def test_scoring_request_reports_once_and_frees_its_blocks(tiny_model):
    eng = LLMEngine(tiny_model, None, EngineConfig(block_size=8, num_blocks=64, max_num_batched_tokens=16))
    rid = eng.add_request(prompts(1, 40, 41)[0], SamplingParams(max_tokens=0, prompt_logprobs=0))
    outs = []
    while eng.has_unfinished():
        outs += eng.step()
    assert [(o.request_id, o.new_token_ids, o.finished, o.finish_reason.value) for o in outs] == \
        [(rid, [], True, "length")]
    assert len(outs[0].prompt_logprobs) == 39 and eng.pool.num_used == 0 and eng.stats.generated_tokens == 0
