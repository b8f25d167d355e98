"""Prefix caching: requests that share leading blocks share their K/V, and every output
stays what the model computes without the cache (HF generate for greedy; the uncached engine
for seeded sampling, prompt logprobs, speculation and adapters)."""

import random

import pytest
import torch

from autoglm.inference import BlockPool, EngineConfig, KVCacheManager, LLMEngine, SamplingParams

from inference_helpers import make_model, prompts

GREEDY = dict(temperature=0, ignore_eos=True)


def hf_greedy(model, ids, n):
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=1)
    return out[0, len(ids):].tolist()


def shared_prompts(n, prefix_len, seed=0, suffix=(1, 12)):
    """n prompts that start with the same `prefix_len` tokens, each with its own suffix."""
    prefix = prompts(1, prefix_len, prefix_len + 1, seed=seed)[0]
    return [prefix + s for s in prompts(n, *suffix, seed=seed + 1)]


def test_pool_keeps_freed_cached_blocks_until_evicted_least_recent_first():
    pool = BlockPool(3)
    a, b, c = pool.allocate(3)
    pool.cache(a, "A")
    pool.cache(b, "B")
    pool.cache(c, "A")  # a key names one block: the first copy stays the cached one
    assert pool.lookup("A") == a and pool.num_cached == 2
    pool.free([b])
    pool.free([a])
    pool.free([c])
    assert pool.num_free == 3 and pool.lookup("B") == b  # freed, still cached
    pool.touch(a)  # a request takes "A" back: off the free list
    assert pool.num_free == 2
    (x,) = pool.allocate(1)  # least recently freed first: b, which loses its key
    assert x == b and pool.lookup("B") is None and pool.num_evictions == 1
    assert pool.lookup("A") == a
    pool.check_invariants()
    with pytest.raises(ValueError, match="no cached contents"):
        pool.touch(c)
    assert pool.reset_cache(lambda k: k == "A") == 1 and pool.lookup("A") is None
    pool.free([a, b])
    pool.check_invariants()


def test_block_keys_name_the_whole_prefix_and_the_adapter():
    kv = KVCacheManager(BlockPool(8), block_size=4, prefix_caching=True)
    ids = list(range(10, 22))
    k = kv.block_keys(ids)
    assert len(k) == 3 and kv.block_keys(ids[:11]) == k[:2]  # full blocks only
    other = kv.block_keys([99] + ids[1:])
    assert other[0] != k[0] and other[1] != k[1] and other[2] != k[2]  # same block tokens, another prefix
    assert kv.block_keys(ids, extra="A")[0] != k[0]


def test_match_limit_and_hit_counters():
    kv = KVCacheManager(BlockPool(16), block_size=4, prefix_caching=True)
    ids = list(range(2, 14))  # 3 full blocks
    assert kv.match_prefix("a", ids, limit=len(ids) - 1) == 0
    kv.allocate_slots("a", len(ids))
    kv.cache_computed("a", ids, 8)  # two blocks computed so far
    assert kv.match_prefix("b", ids, limit=len(ids) - 1) == 8
    kv.cache_computed("a", ids, 12)
    assert kv.match_prefix("c", ids, limit=len(ids) - 1) == 8  # the last token is always computed
    assert kv.match_prefix("d", ids + [5], limit=12) == 12
    assert kv.tables["d"] == kv.tables["a"][:3]
    assert (kv.prefix_queried, kv.prefix_hits) == (12 + 12 + 12 + 13, 8 + 8 + 12)
    for r in "abcd":
        kv.free(r)
    assert kv.pool.num_free == 16
    kv.pool.check_invariants()
    with pytest.raises(ValueError, match="already holds KV blocks"):
        kv.allocate_slots("e", 4)
        kv.match_prefix("e", ids, 11)


@pytest.mark.parametrize("preset", ["tiny", "standard-tiny"])
def test_shared_prefix_greedy_matches_hf_and_skips_the_prefix(preset):
    """tiny's window is 32 tokens: the 70-token prefix outgrows it, so blocks freed out of the
    window and blocks still live are shared alike; standard-tiny keeps every block."""
    model = make_model(preset)
    ps = shared_prompts(5, 70, seed=5)
    eng = LLMEngine(model, config=EngineConfig(block_size=8, num_blocks=200, max_num_batched_tokens=32))
    assert eng.core.prefix_caching
    first = eng.generate([ps[0]], SamplingParams(max_tokens=20, **GREEDY))[0]
    rest = eng.generate(ps[1:], SamplingParams(max_tokens=20, **GREEDY))
    for p, r in zip(ps, [first, *rest]):
        assert r.output_ids == hf_greedy(model, p, 20)
    st = eng.core.stats
    assert st.prefix_hits >= 4 * 64  # each later request found the prefix's 8 full blocks
    assert eng.pool.num_free == eng.pool.num_blocks
    eng.pool.check_invariants()


@pytest.mark.parametrize("preset", ["tiny", "standard-tiny"])
def test_a_conversations_next_turn_reuses_the_generated_blocks(preset):
    """Turn 2's prompt repeats turn 1's prompt and answer: every full block whose K/V turn 1
    computed (its prompt and all but its last sampled token) comes from the cache."""
    model = make_model(preset)
    p1 = prompts(1, 30, 31, seed=17)[0]
    eng = LLMEngine(model, config=EngineConfig(block_size=8, num_blocks=100))
    # 30 + 42 tokens, 71 with K/V: the block of positions 64-71 lacks its last one and is not shared
    out1 = eng.generate([p1], SamplingParams(max_tokens=42, **GREEDY))[0].output_ids
    p2 = p1 + out1 + prompts(1, 5, 6, seed=18)[0]
    hits = eng.core.stats.prefix_hits
    out2 = eng.generate([p2], SamplingParams(max_tokens=15, **GREEDY))[0].output_ids
    assert out2 == hf_greedy(model, p2, 15)
    assert eng.core.stats.prefix_hits - hits == 64  # of turn 2's 77 tokens


def test_a_sparse_prefix_matches_without_its_evicted_middle_blocks():
    """Window 8 over a 60-token shared prompt in a 12-block pool: the first request's middle blocks
    leave its window early and are reallocated (evicted) while it runs. The second request needs
    only the global block and its window's blocks from the cache: it matches 60 tokens, holds no
    dead block, and gives HF's tokens."""
    model = make_model("tiny", window_size=8, num_global_tokens=2)
    p = prompts(1, 60, 61, seed=3)[0]
    eng = LLMEngine(model, config=EngineConfig(block_size=4, num_blocks=12, max_num_batched_tokens=16))
    eng.generate([p], SamplingParams(max_tokens=5, **GREEDY))
    assert eng.pool.num_evictions > 0
    rid = eng.add_request(p + [5, 6, 7], SamplingParams(max_tokens=8, **GREEDY))
    req = eng.requests[rid]
    eng.step()
    assert eng.core.stats.prefix_hits == 60
    table = eng.kv.tables[rid]
    assert table[0] is not None and all(b is None for b in table[1:12])  # global block + window only
    while eng.has_unfinished():
        eng.step()
    assert req.output_ids == hf_greedy(model, p + [5, 6, 7], 8)
    eng.pool.check_invariants()


def test_cached_engine_equals_uncached_under_eviction_and_preemption():
    """A pool too small for the load: cached blocks are evicted, requests preempted and re-matched;
    seeded sampled tokens are the same as with the cache off."""
    model = make_model("standard-tiny")
    rng = random.Random(0)
    ps = shared_prompts(6, 24, seed=7) + prompts(4, 10, 40, seed=8) + shared_prompts(4, 33, seed=9)
    rng.shuffle(ps)
    sp = [SamplingParams(max_tokens=25, temperature=1.0, top_k=40, seed=i, ignore_eos=True) for i in range(len(ps))]

    def run(cache):
        eng = LLMEngine(model, config=EngineConfig(block_size=4, num_blocks=60, max_num_batched_tokens=48,
                                                   max_num_seqs=6, prefix_caching=cache))
        out = [r.output_ids for r in eng.generate(ps, sp)]
        eng.pool.check_invariants()
        assert eng.pool.num_free == eng.pool.num_blocks
        return out, eng

    ref, _ = run(False)
    got, eng = run(True)
    assert got == ref
    assert eng.core.stats.prefix_hits > 0 and eng.core.stats.preemptions > 0 and eng.pool.num_evictions > 0


def test_prompt_logprobs_requests_score_every_position():
    model = make_model("tiny")
    ps = shared_prompts(2, 40, seed=11)
    sp = SamplingParams(max_tokens=3, prompt_logprobs=2, **GREEDY)

    def run(cache):
        eng = LLMEngine(model, config=EngineConfig(block_size=8, num_blocks=100, prefix_caching=cache))
        outs = [eng.generate([p], sp)[0] for p in ps]
        return [[(t.token_id, round(t.logprob, 4)) for t in r.prompt_logprobs] for r in outs], eng

    ref, _ = run(False)
    got, eng = run(True)
    assert got == ref and all(len(g) == len(p) - 1 for g, p in zip(got, ps))
    assert eng.core.stats.prefix_hits == 0  # it asked for every prompt position's logits


def test_speculative_requests_share_prefixes_and_stay_exact():
    from test_speculative import drafting_model

    model = drafting_model()
    ps = shared_prompts(4, 48, seed=13)
    eng = LLMEngine(model, config=EngineConfig(block_size=4, num_blocks=300, speculative_layer=2,
                                               speculative_tokens=3))
    eng.generate([ps[0]], SamplingParams(max_tokens=4, **GREEDY))
    reqs = eng.generate(ps[1:], SamplingParams(max_tokens=24, **GREEDY))
    for p, r in zip(ps[1:], reqs):
        assert r.output_ids == hf_greedy(model, p, 24)
    assert eng.core.stats.prefix_hits >= 3 * 48 and eng.core.stats.spec_steps > 0
    # the accepted drafts' K/V (from the verify pass) is shared by a follow-up request
    follow = ps[1] + reqs[0].output_ids + [7, 8, 9]
    hits = eng.core.stats.prefix_hits
    (r,) = eng.generate([follow], SamplingParams(max_tokens=12, **GREEDY))
    assert r.output_ids == hf_greedy(model, follow, 12)
    assert eng.core.stats.prefix_hits - hits == (len(ps[1]) + 24 - 1) // 4 * 4


def test_adapters_do_not_share_the_base_models_blocks(tmp_path):
    from test_multi_lora import save_adapter

    model = make_model("standard-tiny")
    path = save_adapter(model, tmp_path / "a", 1, target_modules=["k_proj", "v_proj"])
    ps = shared_prompts(2, 32, seed=15)
    sp = SamplingParams(max_tokens=10, **GREEDY)
    ref = LLMEngine(model, config=EngineConfig(block_size=8, num_blocks=100, prefix_caching=False))
    ref.add_lora("A", path)
    want = [r.output_ids for r in ref.generate(ps, sp, lora="A")]

    eng = LLMEngine(model, config=EngineConfig(block_size=8, num_blocks=100))
    eng.add_lora("A", path)
    eng.generate([ps[0]], sp)  # the base model caches the prefix
    assert eng.core.stats.prefix_hits == 0
    got = [eng.generate([p], sp, lora="A")[0].output_ids for p in ps]
    assert got == want  # the adapter's K/V differ: no block of the base run was used ...
    assert eng.core.stats.prefix_hits == 32  # ... but the adapter's second request shared the first's
    eng.core.remove_lora("A")  # its cached blocks go with it (the name may return with other weights)
    assert all(k[1] != "A" for k in eng.pool._key.values())


def test_early_exit_turns_prefix_caching_off_and_refuses_both():
    model = make_model("tiny")
    eng = LLMEngine(model, config=EngineConfig(early_exit_threshold=0.5))
    assert not eng.core.prefix_caching
    with pytest.raises(ValueError, match="prefix caching and early exit"):
        EngineConfig(early_exit_threshold=0.5, prefix_caching=True)


def test_a_block_being_computed_makes_the_next_request_wait_not_recompute():
    kv = KVCacheManager(BlockPool(16), block_size=4, prefix_caching=True)
    ids = list(range(2, 14))
    assert kv.match_prefix("a", ids, 11) == 0  # "a" will compute blocks 0-1 (block 2 holds its last token)
    kv.allocate_slots("a", 12)
    assert kv.match_prefix("b", ids, 11) is None and "b" not in kv.tables  # waits, holds nothing
    assert kv.match_prefix("c", [99] + ids[1:], 11) == 0  # another prefix does not wait
    kv.cache_computed("a", ids, 4)
    assert kv.match_prefix("b", ids, 11) is None  # block 1 is still pending
    kv.cache_computed("a", ids, 8)
    assert kv.match_prefix("b", ids, 11) == 8
    kv.free("c")
    kv.free("a")
    assert kv.match_prefix("d", [99] + ids[1:], 11, wait=True) == 0  # "c" gave its pending blocks up
    for r in ("b", "d"):
        kv.free(r)
    assert not kv._pending and kv.pool.num_free == 16


@pytest.mark.parametrize("preset", ["tiny", "standard-tiny"])
def test_requests_arriving_together_compute_a_shared_prefix_once(preset):
    """Eight requests with one 64-token system prompt arrive at once: one computes the prefix,
    the others wait for its blocks; greedy outputs are HF's."""
    model = make_model(preset)
    ps = shared_prompts(8, 64, seed=21)
    eng = LLMEngine(model, config=EngineConfig(block_size=8, num_blocks=200, max_num_batched_tokens=512))
    reqs = eng.generate(ps, SamplingParams(max_tokens=12, **GREEDY))
    for p, r in zip(ps, reqs):
        assert r.output_ids == hf_greedy(model, p, 12)
    assert eng.core.stats.prefix_hits == 7 * 64
    assert eng.pool.num_free == eng.pool.num_blocks and not eng.kv._pending
