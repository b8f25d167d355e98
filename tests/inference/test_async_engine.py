"""`AsyncEngine`: the core on its own thread, outputs processed on the event loop; the server
talks to it through its public API only."""

import ast
import asyncio
import re
from pathlib import Path

import pytest

import autoglm.inference.server as server_module
from autoglm.inference import EngineConfig, InvalidRequestError, LLMEngine, SamplingParams
from autoglm.inference.async_engine import AsyncEngine

PUBLIC = {"submit", "tokenizer", "max_model_len", "lora_adapters", "stats", "add_lora", "remove_lora", "start",
          "shutdown"}


def run_async(engine, coro_fn):
    async def main():
        ae = AsyncEngine(engine)
        ae.start()
        try:
            return await coro_fn(ae)
        finally:
            ae.shutdown()
    return asyncio.run(main())


async def collect(stream):
    texts, finals = {}, {}
    async for batch in stream:
        for i, o in batch:
            texts[i] = texts.get(i, "") + o.new_text
            if o.finished:
                finals[i] = o
    return texts, finals


def test_stop_string_through_the_core_thread_matches_the_sync_engine(tiny_model, tiny_tokenizer):
    cfg = EngineConfig(block_size=8, num_blocks=64)
    ref = LLMEngine(tiny_model, tiny_tokenizer, cfg)
    (free,) = ref.generate(["Return the value"], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    text = ref.text_of(free)
    stop = text[5:8]  # some characters in the middle of the free-running output
    (want,) = ref.generate(["Return the value"], SamplingParams(max_tokens=30, temperature=0, stop=[stop]))
    engine = LLMEngine(tiny_model, tiny_tokenizer, cfg)
    ids = tiny_tokenizer("Return the value").input_ids

    async def go(ae):
        stream = await ae.submit(ids, [SamplingParams(max_tokens=30, temperature=0, stop=[stop])] * 2)
        out = await collect(stream)
        for _ in range(100):  # the finish command reaches the core before its next step
            if ae.stats()["kv_blocks_used"] == 0:
                break
            await asyncio.sleep(0.02)
        return out, ae.stats()

    (texts, finals), stats = run_async(engine, go)
    assert texts == {0: text[:text.find(stop)], 1: text[:text.find(stop)]} == {0: ref.text_of(want), 1: ref.text_of(want)}
    assert {(o.finish_reason.value, o.stop_reason, o.num_output_tokens) for o in finals.values()} == \
        {("stop", stop, len(want.output_ids))}
    assert stats["kv_blocks_used"] == 0 and not engine.has_unfinished()


def test_bad_request_raises_with_the_field_and_leaves_nothing_behind(tiny_model, tiny_tokenizer):
    engine = LLMEngine(tiny_model, tiny_tokenizer, EngineConfig(block_size=8, num_blocks=64))

    async def go(ae):
        with pytest.raises(InvalidRequestError) as e:
            await ae.submit([5] * 10, [SamplingParams(max_tokens=10), SamplingParams(max_tokens=10**6)])
        assert (e.value.param, e.value.code) == ("max_tokens", "context_length_exceeded")
        with pytest.raises(InvalidRequestError, match="no LoRA adapter") as e:
            await ae.submit([5], SamplingParams(), lora="nope")
        assert e.value.param == "model"
        assert not ae._streams and not engine.has_unfinished()  # the first choice was undone too
        texts, _ = await collect(await ae.submit([5, 6], SamplingParams(max_tokens=3, temperature=0)))
        return texts

    assert list(run_async(engine, go)) == [0]  # and it keeps serving


def test_a_failing_step_fails_the_requests_in_flight_and_the_core_serves_on(tiny_model, tiny_tokenizer, monkeypatch):
    engine = LLMEngine(tiny_model, tiny_tokenizer, EngineConfig(block_size=8, num_blocks=64))
    real, calls = engine.core.step, []

    def flaky():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real()
    monkeypatch.setattr(engine.core, "step", flaky)

    async def go(ae):
        with pytest.raises(RuntimeError, match="boom"):
            await collect(await ae.submit([5, 6], SamplingParams(max_tokens=5, temperature=0)))
        texts, finals = await collect(await ae.submit([5, 6], SamplingParams(max_tokens=5, temperature=0)))
        return finals[0].num_output_tokens, ae.stats()

    n, stats = run_async(engine, go)
    assert n == 5 and stats["kv_blocks_used"] == 0


POISON = 7  # a prompt holding this id makes the model runner raise on any step that runs it


def poisoned(engine, monkeypatch):
    real = engine.core.runner.execute

    def execute(so):
        if any(POISON in s.request.prompt_ids for s in so.scheduled):
            raise RuntimeError("kernel failed")
        return real(so)
    monkeypatch.setattr(engine.core.runner, "execute", execute)


def test_a_runner_failure_fails_only_the_requests_of_that_step(tiny_model, tiny_tokenizer, monkeypatch):
    """One request runs per step (max_num_seqs 1): the poisoned one fails with the runner's own
    error, the one queued behind it and one submitted later still give the sync engine's tokens."""
    cfg = EngineConfig(block_size=8, num_blocks=64, max_num_seqs=1)
    greedy = SamplingParams(max_tokens=6, temperature=0)
    ref = [r.output_ids for r in LLMEngine(tiny_model, tiny_tokenizer, cfg).generate([[5, 6], [9, 4, 2]], greedy)]
    engine = LLMEngine(tiny_model, tiny_tokenizer, cfg)
    poisoned(engine, monkeypatch)

    async def ids(stream):
        return [t async for batch in stream for _, o in batch for t in o.new_token_ids]

    async def go(ae):
        bad = await ae.submit([POISON, 3], greedy)
        queued = await ae.submit([5, 6], greedy)
        with pytest.raises(RuntimeError, match="kernel failed"):
            await collect(bad)
        return [await ids(queued), await ids(await ae.submit([9, 4, 2], greedy))], ae.stats()

    got, stats = run_async(engine, go)
    assert got == ref and stats["kv_blocks_used"] == 0 and stats["running"] == stats["waiting"] == 0


def test_a_runner_failure_cancels_the_other_choices_of_its_submission(tiny_model, tiny_tokenizer, monkeypatch):
    """A two-prompt submission whose first prompt fails in the runner: the stream raises and its
    second prompt, still queued (max_num_seqs 1), is cancelled without running a step."""
    engine = LLMEngine(tiny_model, tiny_tokenizer, EngineConfig(block_size=8, num_blocks=64, max_num_seqs=1))
    poisoned(engine, monkeypatch)

    async def go(ae):
        both = await ae.submit([[POISON, 3], [5, 6]], SamplingParams(max_tokens=6, temperature=0))
        with pytest.raises(RuntimeError, match="kernel failed"):
            await collect(both)
        return ae.stats()  # the core aborted the whole submission before its stream heard of the failure

    stats = run_async(engine, go)
    assert stats["kv_blocks_used"] == 0 and stats["running"] == stats["waiting"] == 0
    assert engine.core.stats.generated_tokens == 0  # the second prompt never ran


def test_server_uses_only_the_async_engines_public_api():
    tree = ast.parse(Path(server_module.__file__).read_text())
    code = ast.unparse(tree.body[1:])  # without the module docstring
    used = set(re.findall(r"\bengine\.(\w+)", code))
    assert used and used <= PUBLIC, used - PUBLIC
    assert not re.search(r"engine\._|\._core|\.engine\.engine", code)
    inside = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level}
    assert inside == {"async_engine", "protocol", "request"}  # no way round the AsyncEngine to the core
    for name in PUBLIC:  # and that API exists
        assert hasattr(AsyncEngine, name)
