"""The output processor against a naive reference: every token re-decodes the whole output
(the engine's old way). Streamed pieces must concatenate to the full decode, never show a
half-finished character, and stop strings (spanning tokens, next to multi-byte characters)
must end the text where a full decode first contains them, on the same token."""

import random

import pytest

from autoglm.inference.output_processor import IncrementalDetokenizer, OutputProcessor, StopStringHit
from autoglm.inference.request import EngineCoreOutput, FinishReason, SamplingParams

TEXTS = ["Return the value of x", "naïve café: déjà vu ✓ 漢字かな 🙂🙃 done", "a\u00e9\u4e2d\U0001f600b " * 3]


def token_streams(tok, n=12, seed=0):
    """Encoded texts with multi-byte characters (split across byte tokens by a 512-entry
    vocabulary) and random id sequences (invalid UTF-8 included)."""
    rng = random.Random(seed)
    streams = [tok(t).input_ids for t in TEXTS]
    streams += [[rng.randrange(2, len(tok)) for _ in range(rng.randrange(5, 40))] for _ in range(n)]
    return streams


def test_incremental_detokenizer_equals_full_decode(tiny_tokenizer):
    tok = tiny_tokenizer
    for ids in token_streams(tok):
        full = tok.decode(ids, skip_special_tokens=True)
        d, text = IncrementalDetokenizer(tok), ""
        for k, t in enumerate(ids):
            piece = d.push([t], final=k == len(ids) - 1)
            text += piece
            assert full.startswith(text)  # nothing emitted that a later token could change
            if k < len(ids) - 1:
                assert text == tok.decode(ids[:k + 1], skip_special_tokens=True).rstrip("\ufffd")
        assert text == full


def naive_stop(tok, ids, stops):
    """The old engine's rule: after each token, decode everything; the first token whose text
    contains a stop string ends the request there (earliest occurrence)."""
    for k in range(1, len(ids) + 1):
        text = tok.decode(ids[:k], skip_special_tokens=True)
        hits = [(text.find(s), s) for s in stops if s in text]
        if hits:
            i, s = min(hits)
            return text[:i], s, k
    return tok.decode(ids, skip_special_tokens=True), None, len(ids)


def stream(proc, rid, ids, last_reason=FinishReason.LENGTH):
    outs = []
    for k, t in enumerate(ids):
        reason = last_reason if k == len(ids) - 1 else None
        res = proc.process([EngineCoreOutput(rid, [t], finish_reason=reason)])
        outs.append(res)
    return [o for r in outs for o in r.outputs], [h for r in outs for h in r.stops]


def test_stop_strings_spanning_tokens_match_a_full_redecode(tiny_tokenizer):
    tok, rng, checked = tiny_tokenizer, random.Random(1), 0
    for n, ids in enumerate(token_streams(tok, n=30, seed=2)):
        full = tok.decode(ids, skip_special_tokens=True)
        clean = [i for i in range(len(full) - 3) if "\ufffd" not in full[i:i + 4]]
        if not clean:
            continue
        a = rng.choice(clean)
        stop = full[a:a + rng.randrange(2, 5)]
        near_miss = stop[:-1] + "\x00"  # held back while it could still match, then released
        proc = OutputProcessor(tok)
        proc.add_request(f"r{n}", SamplingParams(stop=[near_miss, stop]), num_prompt_tokens=3)
        outs, hits = stream(proc, f"r{n}", ids)
        text, s, k = naive_stop(tok, ids, [near_miss, stop])
        assert "".join(o.new_text for o in outs) == text
        assert [o.finished for o in outs] == [False] * (k - 1) + [True]  # ends on the same token
        assert outs[-1].finish_reason == FinishReason.STOP and outs[-1].stop_reason == s
        assert outs[-1].num_output_tokens == k and outs[-1].num_prompt_tokens == 3
        # the core still has to free the request, unless it had finished anyway (length)
        assert hits == ([StopStringHit(f"r{n}", s, k)] if k < len(ids) else [])
        assert not any(stop in o.new_text for o in outs)
        checked += 1
    assert checked >= 20


def test_eos_ends_the_text_as_is_and_unknown_requests_are_dropped(tiny_tokenizer):
    tok = tiny_tokenizer
    ids = tok("done here").input_ids
    proc = OutputProcessor(tok)
    text = tok.decode(ids)
    proc.add_request("a", SamplingParams(stop=[text[-2:]]), 1)
    # finished by a stop token / EOS in the core: no stop-string search on its last text (as before)
    outs, hits = stream(proc, "a", ids, last_reason=FinishReason.STOP)
    assert "".join(o.new_text for o in outs) == text and not hits
    assert outs[-1].stop_reason is None and outs[-1].finish_reason == FinishReason.STOP
    assert proc.process([EngineCoreOutput("a", [5])]).outputs == []  # finished: later outputs are dropped
    proc.add_request("b", SamplingParams(), 1)
    proc.abort("b")
    assert "b" not in proc and proc.process([EngineCoreOutput("b", [5])]).outputs == []


def test_no_tokenizer_gives_ids_only():
    proc = OutputProcessor(None)
    proc.add_request("a", SamplingParams(stop=["x"]), 2)
    (o,) = proc.process([EngineCoreOutput("a", [7], finish_reason=FinishReason.LENGTH)]).outputs
    assert o.new_text == "" and o.new_token_ids == [7] and o.finished and o.num_output_tokens == 1


@pytest.mark.parametrize("n_tokens", [1, 200])
def test_each_token_decodes_a_short_window(tiny_tokenizer, n_tokens):
    """The work per token does not grow with the output: the decoded window stays short."""
    calls = []

    class Counting:
        def decode(self, ids, skip_special_tokens=True):
            calls.append(len(ids))
            return tiny_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    d = IncrementalDetokenizer(Counting())
    ids = (tiny_tokenizer("Return the value ").input_ids * 60)[:n_tokens]
    for t in ids:
        d.push([t])
    assert max(calls) <= 8
