"""OpenAI protocol adapters: request -> SamplingParams per choice, and the SSE events
(the directly formatted common event must equal the generic JSON, byte for byte)."""

import json

import pytest

from autoglm.inference.protocol import (APIError, ChatCompletionRequest, CompletionRequest, ResponseBuilder,
                                        sampling_params)
from autoglm.inference.request import FinishReason, RequestOutput, TokenLogprob


def test_sampling_params_per_choice():
    ps = sampling_params(CompletionRequest(model="m", prompt="x", n=3, seed=7, stop="\n", temperature=0.5))
    assert [p.seed for p in ps] == [7, 8, 9] and all(p.stop == ["\n"] and p.max_tokens == 16 for p in ps)
    (chat,) = sampling_params(ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}]))
    assert chat.max_tokens is None and chat.logprobs is None  # up to the context; the engine resolves it
    (lp,) = sampling_params(ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}],
                                                  logprobs=True, top_logprobs=3, max_completion_tokens=5))
    assert (lp.logprobs, lp.max_tokens) == (3, 5)
    for bad, param in [({"frequency_penalty": 2.5}, "frequency_penalty"), ({"max_tokens": 0}, "max_tokens"),
                       ({"response_format": {"type": "json_object"}}, "response_format"),
                       ({"temperature": -1}, "temperature")]:
        with pytest.raises(APIError) as e:
            sampling_params(CompletionRequest(model="m", prompt="x", **bad))
        assert e.value.status == 400 and e.value.param == param


@pytest.mark.parametrize("chat", [False, True])
def test_streamed_events(chat):
    req = (ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], n=2, stream=True,
                                 stream_options={"include_usage": True}) if chat else
           CompletionRequest(model="m", prompt="x", n=2, stream=True, stream_options={"include_usage": True}))
    b = ResponseBuilder(req, [[7, 8, 9]], tokenizer=None)
    text = 'a "quoted"\nline é 漢 \\ \u2028'
    lp = TokenLogprob(5, -0.25, [])

    class Tok:
        def batch_decode(self, ids):
            return ["t" for _ in ids]
    b.logprobs[1].tok = Tok()
    batch = [(0, RequestOutput("a", [1], text, False)), (1, RequestOutput("b", [5], "x", False, logprobs=[lp])),
             (0, RequestOutput("a", [2], "!", True, FinishReason.STOP, "!", 3, 2))]
    event = b.chunk(batch)
    assert event.startswith("data: ") and event.endswith("\n\n")
    body = json.loads(event[6:])
    assert body["object"] == ("chat.completion.chunk" if chat else "text_completion") and body["model"] == "m"
    first, second = body["choices"]
    key = (lambda c: c["delta"]["content"]) if chat else (lambda c: c["text"])
    assert first["index"] == 0 and key(first) == text + "!"  # two outputs of a choice merged into one entry
    assert (first["finish_reason"], first["stop_reason"]) == ("stop", "!")
    assert second["logprobs"] is not None and key(second) == "x"
    # the directly formatted entry equals json.dumps of the generic one
    plain = b.chunk([(1, RequestOutput("b", [6], text, False))])
    assert plain == b._sse([b._choice(1, text, None, None, False)])
    usage = json.loads(b.last_chunks().split("\n\n")[0][6:])
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 2


def test_chat_logprob_bytes_rebuild_characters_split_across_tokens(tiny_tokenizer):
    """An emoji is four UTF-8 bytes; a byte-level tokenizer that never merged them gives four
    tokens, each decoding to U+FFFD alone. Each token's `bytes` must be its own byte, so the
    joined bytes are the emoji (what OpenAI's `bytes` field is for), and whole tokens give
    their text's UTF-8."""
    from autoglm.inference.protocol import LogprobFormatter

    text = "hi \U0001F600"
    ids = tiny_tokenizer.encode(text)
    fmt = LogprobFormatter(tiny_tokenizer, chat=True)
    content = fmt.payload([TokenLogprob(i, -1.0, [(i, -1.0)]) for i in ids])["content"]
    assert any(c["token"] == "\ufffd" for c in content)  # the case the field exists for
    assert b"".join(bytes(c["bytes"]) for c in content) == text.encode("utf-8")
    assert all(c["top_logprobs"][0]["bytes"] == c["bytes"] for c in content)
    for c in content:
        if c["token"] != "\ufffd":
            assert bytes(c["bytes"]).decode("utf-8") == c["token"]
