"""`Scheduler.update_from_output`: the one place request state moves on after a step."""

from autoglm.inference import BlockPool, FinishReason, KVCacheManager, SamplingParams, Scheduler
from autoglm.inference.request import Request, TokenLogprob
from autoglm.inference.runner import ModelRunnerOutput

EOS = 0


def scheduler(budget=8, max_len=64):
    pool = BlockPool(32)
    return Scheduler(KVCacheManager(pool, 4), max_num_seqs=8, max_num_batched_tokens=budget, max_model_len=max_len,
                     eos_token_id=EOS), pool


def step(s, tokens, logprobs=None):
    """Schedule, then report `tokens` (one per sampling request, in scheduled order) as the runner's."""
    so = s.schedule()
    n = sum(x.samples for x in so.scheduled)
    assert len(tokens) == n, f"{n} requests sample this step"
    return so, s.update_from_output(so, ModelRunnerOutput(tokens, logprobs or [None] * n, exit_layer=3))


def test_chunked_prefill_reports_only_requests_that_sample():
    s, _ = scheduler(budget=8)
    a = Request([5] * 6, SamplingParams(max_tokens=3), "a")
    b = Request([5] * 10, SamplingParams(max_tokens=3), "b")
    s.add(a), s.add(b)
    so, outs = step(s, [11])  # a prefills all 6 and samples; b gets the 2 left of the budget
    assert [(x.request.request_id, x.num_new_tokens) for x in so.scheduled] == [("a", 6), ("b", 2)]
    assert [o.request_id for o in outs] == ["a"] and outs[0].new_token_ids == [11]
    assert (a.num_computed_tokens, b.num_computed_tokens) == (6, 2) and a.output_ids == [11] and not b.output_ids
    assert outs[0].queue_time is not None and a.exit_layers == [3]
    so, outs = step(s, [12])  # a decodes 1, b continues its prefill with 7 of the remaining 8
    assert [o.request_id for o in outs] == ["a"] and outs[0].queue_time is None  # queue time: first output only
    so, outs = step(s, [13, 21])  # a's third token (max_tokens) and b's first
    assert [(o.request_id, o.finish_reason) for o in outs] == [("a", FinishReason.LENGTH), ("b", None)]
    assert a.finished and a.output_ids == [11, 12, 13] and s.take_finished() == ["a"] and s.take_finished() == []


def test_token_level_stops_finish_and_free_blocks():
    s, pool = scheduler(budget=16)
    eos = Request([5] * 5, SamplingParams(max_tokens=10), "eos")
    ignore = Request([5] * 5, SamplingParams(max_tokens=10, ignore_eos=True), "ignore")
    stop_tok = Request([5] * 5, SamplingParams(max_tokens=10, stop_token_ids=[9]), "stop")
    for r in (eos, ignore, stop_tok):
        s.add(r)
    lp = TokenLogprob(EOS, -0.5, [(EOS, -0.5)])
    _, outs = step(s, [EOS, EOS, 9], [lp, None, None])
    by = {o.request_id: o for o in outs}
    # EOS has no stop_reason (OpenAI's and vLLM's shape); a stop token asked for is named
    assert (by["eos"].finish_reason, by["eos"].stop_reason, by["eos"].logprobs) == (FinishReason.STOP, None, [lp])
    assert by["ignore"].finish_reason is None and by["ignore"].logprobs is None
    assert (by["stop"].finish_reason, by["stop"].stop_reason) == (FinishReason.STOP, 9)
    assert eos.finished and stop_tok.finished and not ignore.finished
    assert s.running == [ignore] and pool.num_used == 2  # only `ignore` holds blocks (5 + 1 tokens, 4 per block)


def test_context_limit_finishes_with_length():
    s, pool = scheduler(max_len=8)
    r = Request([5] * 6, SamplingParams(max_tokens=100), "r")
    s.add(r)
    step(s, [7])
    _, (o,) = step(s, [7])
    assert o.finish_reason == FinishReason.LENGTH and r.num_tokens == 8 and pool.num_used == 0
