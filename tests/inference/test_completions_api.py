"""The completions API as evaluation harnesses use it: the four prompt shapes, echo with prompt
logprobs (checked against the model's own teacher-forced log-probabilities), max_tokens 0,
n / best_of, logit_bias and penalties over HTTP, and the bad inputs that must be a 400."""

import httpx2 as httpx
import pytest
import torch

from autoglm.inference import EngineConfig, LLMEngine, SamplingParams
from autoglm.inference.async_engine import AsyncEngine
from autoglm.inference.server import create_app

from inference_helpers import BackgroundServer, prompts

MAX_PROMPTS = 4


@pytest.fixture(scope="module")
def server(tiny_model, tiny_tokenizer):
    # a small step budget: prompts over 24 tokens are prefilled (and scored) in several chunks
    engine = LLMEngine(tiny_model, tiny_tokenizer, EngineConfig(block_size=8, num_blocks=256,
                                                                max_num_batched_tokens=24))
    app = create_app(AsyncEngine(engine), model_name="tiny", max_concurrent=32, max_prompts=MAX_PROMPTS)
    with BackgroundServer(app) as url:
        yield url, engine


def post(url, **body):
    return httpx.post(url + "/v1/completions", json={"model": "tiny", **body}, timeout=60)


def teacher_forced(model, ids):
    """Reference: log-softmax of one full forward; row i scores token i + 1."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def test_echo_scores_prompts_like_a_full_forward(server):
    url, engine = server
    batch = prompts(3, 10, 70, seed=1)  # up to 70 tokens: several 24-token chunks
    r = post(url, prompt=batch, max_tokens=0, echo=True, logprobs=2, temperature=0)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert body["usage"] == {"prompt_tokens": sum(map(len, batch)), "completion_tokens": 0,
                             "total_tokens": sum(map(len, batch))}
    for ids, c in zip(batch, body["choices"]):
        lp, ref = c["logprobs"], teacher_forced(engine.model, ids)
        assert c["finish_reason"] == "length" and c["text"] == engine.tokenizer.decode(ids)
        assert len(lp["tokens"]) == len(ids) and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        want = [float(ref[i, ids[i + 1]]) for i in range(len(ids) - 1)]
        assert lp["token_logprobs"][1:] == pytest.approx(want, abs=1e-4)
        for i, top in enumerate(lp["top_logprobs"][1:]):
            assert max(top.values()) == pytest.approx(float(ref[i].max()), abs=1e-4)
        assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(ids))]


def test_echo_with_a_generated_token_as_lm_eval_asks(server):
    """lm-eval's local-completions: echo, logprobs 1, max_tokens 1; it reads [ctxlen:-1]."""
    url, engine = server
    ids = prompts(1, 30, 31, seed=2)[0]
    c = post(url, prompt=[ids], max_tokens=1, echo=True, logprobs=1, temperature=0).json()["choices"][0]
    lp, ref = c["logprobs"], teacher_forced(engine.model, ids)
    assert len(lp["token_logprobs"]) == len(ids) + 1
    nxt = int(ref[-1].argmax())  # the greedy token after the prompt
    assert lp["token_logprobs"][-1] == pytest.approx(float(ref[-1, nxt]), abs=1e-4)
    assert c["text"] == engine.tokenizer.decode(ids) + engine.tokenizer.decode([nxt])
    # is_greedy as lm-eval computes it: each token's logprob equals its top-1 alternative's
    greedy = [lp["token_logprobs"][i] == max(lp["top_logprobs"][i].values()) for i in range(1, len(ids))]
    assert greedy == [ids[i + 1] == int(ref[i].argmax()) for i in range(len(ids) - 1)]


def test_four_prompt_shapes_and_choice_order(server):
    url, engine = server
    tok = engine.tokenizer
    texts = ["Return the value", "Open the file"]
    ids = [tok(t).input_ids for t in texts]
    kw = dict(max_tokens=5, temperature=0, n=2)
    single = [post(url, prompt=t, **kw).json()["choices"][0]["text"] for t in texts]
    for prompt in (texts, ids):
        out = post(url, prompt=prompt, **kw).json()
        assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
        assert [c["text"] for c in out["choices"]] == [single[0], single[0], single[1], single[1]]
    assert post(url, prompt=ids[1], **kw).json()["choices"][1]["text"] == single[1]
    echoed = post(url, prompt=texts[0], max_tokens=2, temperature=0, echo=True).json()["choices"][0]
    assert echoed["text"].startswith(texts[0]) and echoed["logprobs"] is None


def test_best_of_returns_the_likeliest_candidate(server):
    url, engine = server
    ids = prompts(1, 8, 9, seed=3)[0]
    out = post(url, prompt=ids, max_tokens=6, temperature=1.0, seed=11, best_of=3, n=1, ignore_eos=True).json()
    assert len(out["choices"]) == 1 and out["choices"][0]["logprobs"] is None  # not asked for
    assert out["usage"]["completion_tokens"] == 18  # every candidate ran
    ref = LLMEngine(engine.model, engine.tokenizer, EngineConfig(block_size=8, num_blocks=256))
    reqs = ref.generate([ids] * 3, [SamplingParams(max_tokens=6, temperature=1.0, seed=11 + i, ignore_eos=True,
                                                   logprobs=0) for i in range(3)])
    lps = []
    for r in reqs:  # cumulative logprob of each candidate, from a full forward
        lp = teacher_forced(engine.model, r.prompt_ids + r.output_ids)
        lps.append(sum(float(lp[len(ids) - 1 + j, t]) for j, t in enumerate(r.output_ids)))
    best = reqs[max(range(3), key=lps.__getitem__)]
    assert out["choices"][0]["text"] == ref.text_of(best)
    two = post(url, prompt=ids, max_tokens=6, temperature=1.0, seed=11, best_of=3, n=2, ignore_eos=True,
               logprobs=0).json()["choices"]
    sums = [sum(c["logprobs"]["token_logprobs"]) for c in two]
    assert [c["index"] for c in two] == [0, 1] and sums[0] >= sums[1]
    assert sums[0] == pytest.approx(max(lps), abs=1e-3) and sums[1] == pytest.approx(sorted(lps)[1], abs=1e-3)


def test_logit_bias_and_penalties_over_http(server):
    url, engine = server
    ids = prompts(1, 6, 7, seed=4)[0]
    out = post(url, prompt=ids, max_tokens=5, temperature=0, logit_bias={"77": 100}, ignore_eos=True).json()
    assert out["choices"][0]["text"] == engine.tokenizer.decode([77] * 5)
    # frequency + presence penalties, greedy: a naive loop of full forwards with the OpenAI formula
    fp, pp, n = 1.5, 0.5, 8
    seq = list(ids)
    for _ in range(n):
        logits = teacher_forced(engine.model, seq)[-1].clone()  # log-softmax shifts all logits alike
        counts = torch.bincount(torch.tensor(seq[len(ids):], dtype=torch.long), minlength=logits.numel()).float()
        seq.append(int((logits - fp * counts - pp * (counts > 0).float()).argmax()))
    got = post(url, prompt=ids, max_tokens=n, temperature=0, frequency_penalty=fp, presence_penalty=pp,
               ignore_eos=True, logprobs=0).json()["choices"][0]["logprobs"]["tokens"]
    assert got == [engine.tokenizer.decode([t]) for t in seq[len(ids):]]


@pytest.mark.parametrize("body, param, words", [
    ({"prompt": "x", "echo": True, "stream": True}, "echo", "stream"),
    ({"prompt": "x", "n": 3, "best_of": 2}, "best_of", "(2) must be >= n (3)"),
    ({"prompt": "x", "n": 1, "best_of": 2, "stream": True}, "best_of", "streamed"),
    ({"prompt": "x", "logit_bias": {"512": 5}}, "logit_bias", "[0, 512)"),
    ({"prompt": "x", "logit_bias": {"a": 5}}, "logit_bias", "token ids"),
    ({"prompt": "x", "logit_bias": {"3": 500}}, "logit_bias", "[-100, 100]"),
    ({"prompt": []}, "prompt", "empty"),
    ({"prompt": [[1, 2], []]}, "prompt", "prompt 1 of the batch is empty"),
    ({"prompt": [[5]] * (MAX_PROMPTS + 1)}, "prompt", f"at most {MAX_PROMPTS}"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens", "echo"),
    ({"prompt": "x", "presence_penalty": 3}, "presence_penalty", "[-2, 2]"),
    ({"prompt": "x", "min_p": 1.5}, "min_p", "[0, 1]"),
])
def test_bad_input_is_a_400_naming_the_field(server, body, param, words):
    url, _ = server
    r = post(url, max_tokens=body.pop("max_tokens", 2), **body)
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == param and words in err["message"], err
    ok = post(url, prompt="x", max_tokens=2, temperature=0)  # still serving
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] in ("length", "stop")


def test_chat_refuses_completion_only_fields(server):
    url, _ = server
    r = httpx.post(url + "/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                                                       "echo": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "echo"
