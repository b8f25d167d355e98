"""Block pool / KV manager / scheduler invariants under random load."""

import random

import pytest
from inference_helpers import make_model

from autoglm.inference import BlockPool, EngineConfig, KVCacheManager, LLMEngine, NoFreeBlocksError, SamplingParams


def test_pool_refcounts_and_errors():
    pool = BlockPool(4)
    a = pool.allocate(2)
    pool.share(a[0])
    pool.free(a)
    assert pool.num_free == 3  # a[0] still held once
    pool.free([a[0]])
    assert pool.num_free == 4
    with pytest.raises(ValueError, match="double free"):
        pool.free([a[0]])
    with pytest.raises(NoFreeBlocksError):
        pool.allocate(5)
    assert pool.num_free == 4  # all-or-nothing
    pool.check_invariants()


def test_manager_frees_only_dead_blocks():
    pool = BlockPool(32)
    kv = KVCacheManager(pool, block_size=4, window=8, num_global=2)
    kv.allocate_slots("r", 40)  # 10 blocks, positions 0..39
    kv.free_out_of_window("r", 40)  # next query 40 sees [33, 40] plus positions 0, 1
    table = kv.get("r").block_ids
    live = [j for j, b in enumerate(table) if b is not None]
    # block 0 (globals), blocks 8, 9 (positions 32..39); naive reference: a block is needed
    # if any of its positions is visible to some query >= 40
    need = [j for j in range(10) if any(p < 2 or p >= 40 - 8 + 1 for p in range(4 * j, 4 * j + 4))]
    assert live == need == [0, 8, 9]
    assert pool.num_used == 3
    kv.free("r")
    assert pool.num_free == 32


@pytest.mark.slow  # ~15 s: 1000 requests through a small pool
def test_1000_random_requests_return_every_block():
    """Random arrivals, aborts and preemptions; half the prompts start with one of three shared
    prefixes (prefix caching shares, waits for and evicts their blocks)."""
    model = make_model("tiny", window_size=8, num_global_tokens=2, max_position_embeddings=128)
    rng = random.Random(0)
    eng = LLMEngine(model, config=EngineConfig(block_size=4, num_blocks=40, max_num_seqs=24,
                                               max_num_batched_tokens=64))
    shared = [[rng.randrange(2, 512) for _ in range(12)] for _ in range(3)]
    pending = [((rng.choice(shared) if rng.random() < 0.5 else []) + [rng.randrange(2, 512) for _ in range(rng.randint(1, 30))],
                SamplingParams(max_tokens=rng.randint(1, 30), temperature=rng.choice([0, 1.0]), seed=i))
               for i in range(1000)]
    aborted = finished = 0
    while pending or eng.has_unfinished():
        for _ in range(rng.randint(0, 12)):
            if pending:
                eng.add_request(*pending.pop())
        for out in eng.step():
            finished += out.finished
        live = list(eng.requests)
        if live and rng.random() < 0.15:  # cancel someone (waiting, running or preempted)
            aborted += eng.abort(rng.choice(live))
        eng.pool.check_invariants()
        holders = {}  # block -> tables that hold it: every used block is held, as often as its count says
        for t in eng.kv.tables.values():
            for b in t:
                if b is not None:
                    holders[b] = holders.get(b, 0) + 1
        assert len(holders) == eng.pool.num_used and all(eng.pool._ref[b] == n for b, n in holders.items())
    assert aborted > 50 and finished + aborted == 1000
    assert eng.stats.preemptions > 0 and eng.stats.prefix_hits > 0 and eng.pool.num_evictions > 0
    assert not eng.kv._pending
    assert eng.pool.num_free == eng.pool.num_blocks and not eng.kv.tables
    eng.pool.check_invariants()
