"""End-to-end server tests with the official `openai` client against 127.0.0.1."""

import json
import time

import httpx2 as httpx  # the HTTP client the openai package ships with
import openai
import pytest

from autoglm.inference import EngineConfig, LLMEngine, SamplingParams
from autoglm.inference.async_engine import AsyncEngine
from autoglm.inference.server import chat_prompt, create_app

from inference_helpers import BackgroundServer

KEY = "sk-test"


@pytest.fixture(scope="module")
def server(tiny_model, tiny_tokenizer):
    engine = LLMEngine(tiny_model, tiny_tokenizer, EngineConfig(block_size=8, num_blocks=128))
    app = create_app(AsyncEngine(engine), model_name="tiny", api_key=KEY, max_concurrent=8)
    with BackgroundServer(app) as url:
        yield url, engine


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0)


def reference(engine, prompt, **kw):
    """The same request run directly through a fresh engine on the same weights."""
    ref = LLMEngine(engine.model, engine.tokenizer, EngineConfig(block_size=8, num_blocks=128))
    (r,) = ref.generate([prompt], SamplingParams(**kw))
    return ref.text_of(r), r


def test_completion_matches_engine(client, server):
    out = client.completions.create(model="tiny", prompt="Return the value", max_tokens=12, temperature=0)
    text, r = reference(server[1], "Return the value", max_tokens=12, temperature=0)
    assert out.choices[0].text == text
    assert out.choices[0].finish_reason == r.finish_reason.value
    assert out.usage.completion_tokens == len(r.output_ids)
    assert out.usage.prompt_tokens == len(r.prompt_ids)


def test_streaming_chat_with_usage(client, server):
    msgs = [{"role": "user", "content": "Open the file"}]
    chunks = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    ref_text, r = reference(server[1], chat_prompt(type("M", (), m)() for m in [{"role": "user", "content": "Open the file"}]),
                            max_tokens=10, temperature=0)
    assert text == ref_text
    assert [c for c in chunks if c.choices][-1].choices[0].finish_reason == r.finish_reason.value
    assert chunks[-1].usage.completion_tokens == len(r.output_ids) and chunks[-1].choices == []
    full = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0)
    assert full.choices[0].message.content == text


def test_n_and_seed(client):
    kw = dict(model="tiny", prompt="The ", max_tokens=8, temperature=1.0, seed=3, n=3)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1


def test_errors_are_openai_style_and_server_survives(client, server):
    url = server[0]
    h = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="tiny", prompt="x", max_tokens=-1)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="tiny", prompt="x", max_tokens=10**9)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="tiny", prompt="hello " * 400, max_tokens=5)
    with pytest.raises(openai.BadRequestError, match="response_format"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                       response_format={"type": "json_object"})
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    r = httpx.post(url + "/v1/completions", content=b"{not json", headers=h)
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/completions", content=b'{"model": "tiny", "prompt": "\xff\xfe"}', headers=h)
    assert r.status_code == 400 and "UTF-8" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/completions", content=b'{"model": "tiny", "prompt": "\\ud800"}', headers=h)
    assert r.status_code == 400
    r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "x", "bogus": 1}, headers=h)
    assert r.status_code == 400 and "bogus" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "x", "n": 9, "max_tokens": 2},
                   headers=h)  # more sequences than the server ever runs at once: a 429 would never clear
    assert r.status_code == 400 and (r.json()["error"]["param"], r.json()["error"]["code"]) == ("n", "request_too_large")
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    assert client.completions.create(model="tiny", prompt="x", max_tokens=3, temperature=0).choices[0].text is not None
    assert [m.id for m in client.models.list()] == ["tiny"]


def _slow_steps(engine, monkeypatch):
    """>= 5 ms an engine step, so a client's hang-up is seen long before the request could finish,
    also on a loaded machine (a finished request would count as "finished", not "aborted")."""
    step = engine.core.step

    def slow_step():
        time.sleep(0.005)
        return step()
    monkeypatch.setattr(engine.core, "step", slow_step)


def _wait_idle(engine):
    for _ in range(100):
        if engine.pool.num_used == 0 and not engine.has_unfinished():
            break
        time.sleep(0.05)


def test_disconnect_cancels_and_frees_blocks(server, monkeypatch):
    url, engine = server
    _slow_steps(engine, monkeypatch)
    body = {"model": "tiny", "prompt": "The ", "max_tokens": 200, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i >= 3:
                break  # drop the connection mid-stream
    _wait_idle(engine)
    assert engine.pool.num_used == 0 and not engine.has_unfinished()
    m = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert 'autoglm_requests_total{outcome="aborted"}' in m
    for name in ("autoglm_time_to_first_token_seconds_bucket", "autoglm_time_per_output_token_seconds_bucket",
                 "autoglm_kv_blocks_in_use", "autoglm_num_requests_waiting",
                 "autoglm_request_queue_time_seconds_bucket", "autoglm_e2e_request_latency_seconds_bucket", "autoglm_generation_tokens_total"):
        assert name in m


def test_non_streaming_client_that_hangs_up_cancels(server, monkeypatch):
    url, engine = server
    _slow_steps(engine, monkeypatch)  # 250 tokens take well over the client's 0.3 s on any machine
    body = {"model": "tiny", "prompt": "The ", "max_tokens": 250, "ignore_eos": True}
    aborted = engine.stats.generated_tokens
    with pytest.raises(httpx.TimeoutException):  # the client gives up long before 250 tokens are made
        httpx.post(url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=0.3)
    _wait_idle(engine)
    assert engine.pool.num_used == 0 and not engine.has_unfinished()
    assert engine.stats.generated_tokens - aborted < 250  # stopped early, not run to max_tokens


def test_cli_serve_refuses_a_non_model_dir(tmp_path):
    from typer.testing import CliRunner

    from autoglm.cli import app

    res = CliRunner().invoke(app, ["serve", str(tmp_path)])
    assert res.exit_code == 2 and "saved model directory" in " ".join(res.output.split())


def test_metrics_count_observations(client, server):
    import re

    def count(name):
        m = httpx.get(server[0] + "/metrics").text
        return float(re.search(rf"^{name} (\S+)$", m, re.M).group(1))

    before = [count(n) for n in ("autoglm_time_to_first_token_seconds_count", "autoglm_request_queue_time_seconds_count",
                                 "autoglm_generation_tokens_total")]
    client.completions.create(model="tiny", prompt="x", max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    after = [count(n) for n in ("autoglm_time_to_first_token_seconds_count", "autoglm_request_queue_time_seconds_count",
                                "autoglm_generation_tokens_total")]
    assert [a - b for a, b in zip(after, before)] == [1, 1, 5]


def model_logprobs(engine, prompt_ids, output_ids):
    """Reference: one full forward over prompt + output, log-softmax at each output position."""
    import torch

    ids = torch.tensor([prompt_ids + output_ids])
    with torch.no_grad():
        lp = engine.model(ids).logits[0].float().log_softmax(-1)
    return lp[len(prompt_ids) - 1:len(prompt_ids) - 1 + len(output_ids)]


def test_completion_logprobs_match_a_full_forward(client, server):
    engine = server[1]
    out = client.completions.create(model="tiny", prompt="Return the value", max_tokens=8, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    _, r = reference(engine, "Return the value", max_tokens=8, temperature=0)
    ref = model_logprobs(engine, r.prompt_ids, r.output_ids)
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(r.output_ids)
    for i, t in enumerate(r.output_ids):
        assert abs(lp.token_logprobs[i] - float(ref[i, t])) < 1e-4
        assert lp.tokens[i] == engine.tokenizer.decode([t])
        # top-3 alternatives keyed by text (ids that decode alike keep the likelier): values from the reference top-3
        top3 = ref[i].topk(3).values.tolist()
        assert all(any(abs(v - w) < 1e-4 for w in top3) for v in lp.top_logprobs[i].values())
        assert max(lp.top_logprobs[i].values()) == pytest.approx(top3[0], abs=1e-4)
        assert lp.token_logprobs[i] == pytest.approx(top3[0], abs=1e-4)  # greedy picks the top token
    # offsets of each token's own text (a character split across tokens decodes as U+FFFD per piece)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]


def test_chat_logprobs_streamed_and_not(client, server):
    msgs = [{"role": "user", "content": "Open the file"}]
    full = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, temperature=0, logprobs=True,
                                          top_logprobs=2)
    content = full.choices[0].logprobs.content
    assert len(content) == full.usage.completion_tokens
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob for c in content)
    assert all(c.logprob == pytest.approx(c.top_logprobs[0].logprob, abs=1e-5) for c in content)  # greedy
    chunks = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, temperature=0,
                                                 logprobs=True, top_logprobs=2, stream=True))
    streamed = [c for ch in chunks if ch.choices and ch.choices[0].logprobs for c in ch.choices[0].logprobs.content]
    assert [c.token for c in streamed] == [c.token for c in content]
    # the second request's prompt comes from the prefix cache (its last token runs as a decode row,
    # not in a prefill chunk): the same values up to float32 rounding
    assert [c.logprob for c in streamed] == pytest.approx([c.logprob for c in content], abs=1e-5)
    plain = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=3, temperature=0)
    assert plain.choices[0].logprobs is None


def test_bad_logprobs_requests(client):
    msgs = [{"role": "user", "content": "x"}]
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(model="tiny", messages=msgs, max_tokens=2, top_logprobs=2)
    with pytest.raises(openai.BadRequestError, match=r"\[0, 20\]"):
        client.chat.completions.create(model="tiny", messages=msgs, max_tokens=2, logprobs=True, top_logprobs=50)
    with pytest.raises(openai.BadRequestError, match=r"\[0, 20\]"):
        client.completions.create(model="tiny", prompt="x", max_tokens=2, logprobs=-1)


def test_stop_string_spanning_tokens_over_http(client, server):
    engine = server[1]
    free, r = reference(engine, "Return the value", max_tokens=30, temperature=0, ignore_eos=True)
    tok = engine.tokenizer
    pieces = [tok.decode(r.output_ids[:i]) for i in range(1, 31)]
    cut = next(i for i in range(2, 30) if len(pieces[i]) > len(pieces[i - 1]) >= 2)
    stop = pieces[cut][len(pieces[cut - 1]) - 1:len(pieces[cut - 1]) + 1]  # straddles a token boundary
    want, ref = reference(engine, "Return the value", max_tokens=30, temperature=0, stop=[stop])
    out = client.completions.create(model="tiny", prompt="Return the value", max_tokens=30, temperature=0,
                                    stop=[stop], n=2)
    assert [c.text for c in out.choices] == [want, want] == [free[:free.find(stop)]] * 2
    assert [(c.finish_reason, c.stop_reason) for c in out.choices] == [("stop", stop)] * 2
    assert out.usage.completion_tokens == 2 * len(ref.output_ids)
    chunks = list(client.completions.create(model="tiny", prompt="Return the value", max_tokens=30, temperature=0,
                                            stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want and chunks[-1].choices[0].stop_reason == stop
    _wait_idle(engine)
    assert engine.pool.num_used == 0


def test_overload_is_shed_with_429_and_the_server_lives_on(server, monkeypatch):
    import threading

    url, engine = server
    h = {"Authorization": f"Bearer {KEY}"}
    gate, step, calls = threading.Event(), engine.core.step, []

    def gated_step():  # the engine thread waits after its first step until the 429 was seen
        if calls:
            gate.wait(30)
        calls.append(1)
        return step()
    monkeypatch.setattr(engine.core, "step", gated_step)
    body = {"model": "tiny", "prompt": "x", "n": 6, "max_tokens": 20, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", headers=h, json=body, timeout=30) as long:
        lines = long.iter_lines()
        next(lines)  # 6 of the 8 sequences are in flight
        r = httpx.post(url + "/v1/completions", headers=h, json={"model": "tiny", "prompt": "x", "n": 3})
        gate.set()
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        assert "6 of at most 8" in r.json()["error"]["message"]
        finals = [c for ln in lines if ln.startswith("data: {") for c in json.loads(ln[6:])["choices"]
                  if c["finish_reason"]]
    assert sorted((c["index"], c["finish_reason"]) for c in finals) == [(i, "length") for i in range(6)]
    _wait_idle(engine)
    r = httpx.post(url + "/v1/completions", headers=h, json={"model": "tiny", "prompt": "x", "n": 3, "max_tokens": 2})
    assert r.status_code == 200 and len(r.json()["choices"]) == 3


def test_sampling_values_that_would_break_a_step_are_refused_or_safe(client, server):
    """Values that pass a type check but break float32 sampling or the seeded generator inside
    the engine step (which would fail every request in it) get a 400 naming the field, or, for a
    temperature below 1e-5, greedy decoding (its limit)."""
    url, h = server[0], {"Authorization": f"Bearer {KEY}"}
    base = {"model": "tiny", "prompt": "The ", "max_tokens": 4}
    for extra, param in [({"seed": 2**64}, "seed"), ({"seed": -2**63 - 1}, "seed"),
                         ({"repetition_penalty": 1e-50}, "repetition_penalty"),
                         ({"repetition_penalty": 1e6}, "repetition_penalty"),
                         ({"prompt": [True, False]}, "prompt"), ({"prompt": ["1", 2]}, "prompt"),
                         ({"stream_options": {"include_usage": True}}, "stream_options")]:
        r = httpx.post(url + "/v1/completions", headers=h, json={**base, **extra})
        assert r.status_code == 400, (extra, r.text)
        assert r.json()["error"]["param"] == param or param in r.json()["error"]["message"], (extra, r.text)
    r = httpx.post(url + "/v1/completions", headers={**h, "Content-Type": "application/json"},
                   content=b'{"model": "tiny", "prompt": "The ", "temperature": 1e400}')
    assert r.status_code == 400 and "temperature" in r.text
    greedy = client.completions.create(**base, temperature=0).choices[0].text
    for t in (1e-300, 1e-39, 1e-6):
        out = client.completions.create(**base, temperature=t, seed=2**63 - 1, n=2)  # seed + 1 still fits
        assert [c.text for c in out.choices] == [greedy, greedy]
    assert httpx.get(url + "/health").json() == {"status": "ok"}


def test_usage_counts_each_prompt_once_whatever_n(client, server):
    out = client.completions.create(model="tiny", prompt="Return the value", max_tokens=3, n=3, best_of=4, seed=1)
    single = client.completions.create(model="tiny", prompt="Return the value", max_tokens=3, seed=1)
    assert out.usage.prompt_tokens == single.usage.prompt_tokens == len(server[1].tokenizer("Return the value").input_ids)
    assert out.usage.completion_tokens == sum(c for c in [3] * 4)  # every candidate generated counts


def test_request_errors_name_the_field(server):
    url, h = server[0], {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(url + "/v1/chat/completions", headers=h,
                   json={"model": "tiny", "messages": [{"role": "user", "content": "hi " * 300}], "max_tokens": 2})
    err = r.json()["error"]
    assert r.status_code == 400 and (err["param"], err["code"]) == ("messages", "context_length_exceeded")
    r = httpx.post(url + "/v1/completions", headers=h, json={"model": "tiny", "prompt": "x", "max_tokens": 10**6})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = httpx.post(url + "/v1/completions", headers=h, json={"model": "tiny", "prompt": "x", "max_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = httpx.post(url + "/v1/completions", headers=h, json={"model": "tiny", "prompt": [9999]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    deep = b'{"model": "tiny", "prompt": ' + b"[" * 100000 + b"]" * 100000 + b"}"
    r = httpx.post(url + "/v1/completions", headers={**h, "Content-Type": "application/json"}, content=deep)
    assert r.status_code == 400
    parts = [{"type": "text", "text": "Open "}, {"type": "text", "text": "the file"}]
    r = httpx.post(url + "/v1/chat/completions", headers=h,
                   json={"model": "tiny", "messages": [{"role": "user", "content": parts}], "max_tokens": 3,
                         "temperature": 0})
    plain = httpx.post(url + "/v1/chat/completions", headers=h,
                       json={"model": "tiny", "messages": [{"role": "user", "content": "Open the file"}],
                             "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["message"] == plain.json()["choices"][0]["message"]


def test_metrics_report_prefix_cache_hits(client, server):
    """A prompt sent twice: the second request's full blocks come from the prefix cache, and the
    Prometheus counters grow by what the engine counted."""
    import re

    url, engine = server

    def count(name):
        m = httpx.get(url + "/metrics").text
        return float(re.search(rf"^{name} (\S+)$", m, re.M).group(1))

    prompt = list(range(3, 40))  # 37 tokens: 4 full blocks of 8
    q0, h0 = count("autoglm_prefix_cache_queries_total"), count("autoglm_prefix_cache_hits_total")
    outs = [client.completions.create(model="tiny", prompt=prompt, max_tokens=4, temperature=0).choices[0].text
            for _ in range(2)]
    assert outs[0] == outs[1]
    assert count("autoglm_prefix_cache_queries_total") - q0 == 2 * 37
    assert count("autoglm_prefix_cache_hits_total") - h0 == 32
    assert count("autoglm_kv_blocks_cached") >= 4


def test_chat_template_puts_an_answer_where_it_was_generated(tiny_tokenizer):
    """A conversation's next turn starts with the token ids of the turn before: its prompt, then
    the answer's ids as generated (returned verbatim, leading space included), so prefix caching
    reuses the answer's K/V blocks too."""
    M = lambda role, content: type("M", (), {"role": role, "content": content})()  # noqa: E731
    turn1 = [M("system", "You answer questions about event loops."), M("user", "How do I create a task?")]
    p1 = tiny_tokenizer(chat_prompt(turn1)).input_ids
    answer = tiny_tokenizer(" Call create_task with the coroutine.").input_ids  # as a model would generate it
    text = tiny_tokenizer.decode(answer)
    p2 = tiny_tokenizer(chat_prompt(turn1 + [M("assistant", text), M("user", "And cancel it?")])).input_ids
    assert p2[:len(p1) + len(answer)] == p1 + answer
    assert chat_prompt([M("user", "hi")]) == "user: hi\nassistant:"
    named = type("M", (), {"role": "user", "content": "hi", "name": "alice"})()
    assert chat_prompt([named]) == "user (alice): hi\nassistant:"
