"""Engine greedy output == HF generate (same weights), single and 16 concurrent requests."""

import pytest
import torch

from autoglm.inference import EngineConfig, LLMEngine, SamplingParams

from inference_helpers import make_model, prompts


def hf_greedy(model, ids, n):
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                         pad_token_id=1)
    return out[0, len(ids):].tolist()


def test_single_request_matches_hf(tiny_model):
    ids = prompts(1, 40, 41)[0]
    eng = LLMEngine(tiny_model, config=EngineConfig(block_size=8, num_blocks=64))
    (req,) = eng.generate([ids], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
    assert req.output_ids == hf_greedy(tiny_model, ids, 50)
    assert len(set(req.output_ids)) > 5  # not a degenerate repetition


@pytest.mark.parametrize("preset", ["tiny", "standard-tiny"])
def test_16_concurrent_match_hf_with_chunked_prefill(preset):
    model = make_model(preset)
    ps = prompts(16, 3, 90, seed=1)
    n_out = [int(x) for x in torch.randint(5, 60, (16,), generator=torch.Generator().manual_seed(2))]
    # small token budget: prompts are split into prefill chunks that share steps with decodes
    eng = LLMEngine(model, config=EngineConfig(block_size=4, num_blocks=600, max_num_batched_tokens=48))
    reqs = eng.generate(ps, [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in n_out])
    for p, n, r in zip(ps, n_out, reqs):
        assert r.output_ids == hf_greedy(model, p, n)
    assert eng.pool.num_free == eng.pool.num_blocks


def test_sparse_memory_bounded_by_window():
    model = make_model("tiny", window_size=8, num_global_tokens=2)
    eng = LLMEngine(model, config=EngineConfig(block_size=4, num_blocks=64))
    ids = prompts(1, 5, 6)[0]
    rid = eng.add_request(ids, SamplingParams(max_tokens=150, temperature=0, ignore_eos=True))
    req = eng.requests[rid]
    peak = 0
    while eng.has_unfinished():
        eng.step()
        peak = max(peak, eng.pool.num_used)
    # globals (1 block) + window of 8 (2-3 blocks) + the block being written
    assert peak <= 5
    assert req.output_ids == hf_greedy(model, ids, 150)


def test_preemption_recomputes_same_tokens(tiny_model):
    ps = prompts(6, 20, 40, seed=3)
    # a pool too small for all six at once: requests get preempted and recomputed
    dense = make_model("standard-tiny")
    eng = LLMEngine(dense, config=EngineConfig(block_size=4, num_blocks=48, max_num_batched_tokens=64))
    reqs = eng.generate(ps, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    assert eng.stats.preemptions > 0
    for p, r in zip(ps, reqs):
        assert r.output_ids == hf_greedy(dense, p, 30)
    assert eng.pool.num_free == eng.pool.num_blocks


def test_seeded_sampling_reproducible_and_batch_independent(tiny_model):
    ps = prompts(4, 5, 20, seed=4)
    sp = SamplingParams(max_tokens=20, temperature=1.0, top_k=50, top_p=0.9, seed=7)
    alone = LLMEngine(tiny_model, config=EngineConfig(block_size=8, num_blocks=64)).generate([ps[0]], sp)[0]
    batch = LLMEngine(tiny_model, config=EngineConfig(block_size=8, num_blocks=64)).generate(ps, sp)[0]
    other = LLMEngine(tiny_model, config=EngineConfig(block_size=8, num_blocks=64)).generate(
        [ps[0]], SamplingParams(max_tokens=20, temperature=1.0, top_k=50, top_p=0.9, seed=8))[0]
    assert alone.output_ids == batch.output_ids
    assert alone.output_ids != other.output_ids


def test_stop_string_spanning_tokens_and_eos(tiny_model, tiny_tokenizer):
    eng = LLMEngine(tiny_model, tiny_tokenizer, EngineConfig(block_size=8, num_blocks=64))
    (free,) = eng.generate(["Return the value"], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    text = eng.text_of(free)
    # pick a stop string that straddles a token boundary in the free-running output
    toks = [tiny_tokenizer.decode(free.output_ids[:i]) for i in range(1, 31)]
    cut = next(i for i in range(2, 30) if len(toks[i]) - len(toks[i - 1]) >= 1 and len(toks[i - 1]) >= 2)
    stop = toks[cut][len(toks[cut - 1]) - 1:len(toks[cut - 1]) + 1]
    # a second stop string whose first characters do occur (held back, then released)
    near_miss = text[1:3] + "\x00"
    rid = eng.add_request("Return the value", SamplingParams(max_tokens=30, temperature=0, stop=[near_miss, stop]))
    r, streamed = eng.requests[rid], ""
    while eng.has_unfinished():
        streamed += "".join(o.new_text for o in eng.step())
    assert r.finish_reason.value == "stop" and r.stop_reason == stop
    assert eng.text_of(r) == streamed == text[:text.find(stop)]


def test_bad_requests_rejected(tiny_model):
    eng = LLMEngine(tiny_model, config=EngineConfig(block_size=8, num_blocks=8))
    with pytest.raises(ValueError, match="context"):
        eng.add_request([5] * 300)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="token ids"):
        eng.add_request([5, 9999])
    with pytest.raises(ValueError, match="raise num_blocks"):
        LLMEngine(make_model("standard-tiny"), config=EngineConfig(block_size=8, num_blocks=8)).add_request(
            [5] * 10, SamplingParams(max_tokens=200))


@pytest.mark.parametrize("preset", ["tiny", "standard-tiny"])
def test_kv_waste_accounting(preset):
    """Block size 1 frees/allocates exactly the visible slots (waste 0); larger blocks waste a little."""
    model = make_model(preset, window_size=8, num_global_tokens=2)
    ps = prompts(4, 5, 30, seed=9)
    wastes = []
    for bs in (1, 8):
        eng = LLMEngine(model, config=EngineConfig(block_size=bs, num_blocks=400))
        eng.generate(ps, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
        wastes.append(eng.stats.kv_waste)
    assert wastes[0] == 0.0 and 0.0 < wastes[1] < 0.6


def test_logprobs_of_streamed_outputs_match_a_full_forward(tiny_model):
    ids = prompts(1, 12, 13, seed=5)[0]
    eng = LLMEngine(tiny_model, config=EngineConfig(block_size=4, num_blocks=64))
    rid = eng.add_request(ids, SamplingParams(max_tokens=10, temperature=0.8, seed=3, ignore_eos=True, logprobs=4))
    entries, out = [], []
    while eng.has_unfinished():
        for o in eng.step():
            assert o.request_id == rid and len(o.logprobs) == len(o.new_token_ids) == 1
            entries += o.logprobs
            out += o.new_token_ids
    with torch.no_grad():
        ref = tiny_model(torch.tensor([ids + out])).logits[0, len(ids) - 1:-1].float().log_softmax(-1)
    for i, (e, t) in enumerate(zip(entries, out)):
        assert e.token_id == t and abs(e.logprob - float(ref[i, t])) < 1e-4
        top = ref[i].topk(4)
        assert [j for j, _ in e.top] == top.indices.tolist()
        torch.testing.assert_close(torch.tensor([v for _, v in e.top]), top.values, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=21)
