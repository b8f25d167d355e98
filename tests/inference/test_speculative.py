"""Self-speculative decoding: greedy output == HF generate (token for token) under continuous
batching, sampled output distributed as the full model's (chi-square against the exact joint
distribution of two tokens on a 8-token vocabulary), stops, logprobs, penalties, bad input."""

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from autoglm.inference import EngineConfig, InvalidRequestError, LLMEngine, SamplingParams

from inference_helpers import make_model, prompts


def drafting_model(preset="tiny", damp=0.2, **overrides):
    """A 4-layer model whose upper two layers write little to the residual stream, so the exit
    after layer 2 agrees with the full model often but not always (both accept and reject paths run)."""
    model = make_model(preset, num_hidden_layers=4, **overrides)
    with torch.no_grad():
        for layer in model.model.layers[2:]:
            for name, p in layer.named_parameters():
                if name.endswith("o_proj.weight") or "down_proj" in name:
                    p.mul_(damp)
    return model


def hf_greedy(model, ids, n):
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=1)
    return out[0, len(ids):].tolist()


def spec_engine(model, k=3, **kw):
    kw = dict(block_size=4, num_blocks=600, speculative_layer=2, speculative_tokens=k) | kw
    return LLMEngine(model, config=EngineConfig(**kw))


@pytest.mark.parametrize("preset", ["tiny", "standard-tiny"])
def test_greedy_matches_hf_generate_with_continuous_batching(preset):
    model = drafting_model(preset)
    ps = prompts(8, 3, 60, seed=3)
    n_out = [int(x) for x in torch.randint(5, 35, (8,), generator=torch.Generator().manual_seed(4))]
    # a small token budget: prefill chunks share steps with speculating and plain (k 0) decodes
    eng = spec_engine(model, max_num_batched_tokens=40)
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, speculative_tokens=[3, 5, 0][i % 3])
              for i, n in enumerate(n_out)]
    reqs = eng.generate(ps, params)
    for p, n, r in zip(ps, n_out, reqs):
        assert r.output_ids == hf_greedy(model, p, n)
    st = eng.stats
    assert 0.2 < st.acceptance_rate < 0.9  # drafts both kept and rejected
    assert st.tokens_per_spec_step > 1.3
    assert eng.pool.num_free == eng.pool.num_blocks


def test_a_draft_vocabulary_keeps_greedy_output_exact():
    """Drafting from the 192 lowest ids of 512: drafts the full model would not pick outside them
    are rejected, so acceptance falls, and the tokens stay HF's (greedy with and without a
    repetition penalty, which goes through the full-vocabulary path)."""
    model = drafting_model()
    assert model.config.vocab_size == 512
    ps = prompts(6, 3, 40, seed=5)
    plain = spec_engine(model).generate(ps, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    eng = spec_engine(model, speculative_draft_vocab=192)
    reqs = eng.generate(ps, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    for p, r in zip(ps, reqs):
        assert r.output_ids == hf_greedy(model, p, 24)
    assert 0 < eng.stats.acceptance_rate < 1
    outside = sum(t >= 192 for r in reqs for t in r.output_ids)
    assert outside > 0  # the full model's tokens outside the draft vocabulary are still emitted
    sp = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, repetition_penalty=1.3)
    want = LLMEngine(model, config=EngineConfig(block_size=4, num_blocks=600)).generate(ps, sp)
    got = spec_engine(model, speculative_draft_vocab=192).generate(ps, sp)
    assert [r.output_ids for r in got] == [r.output_ids for r in want]
    assert [r.output_ids for r in plain] == [r.output_ids for r in reqs]


def test_a_step_whose_drafts_are_all_kept_emits_k_plus_one_tokens():
    """Upper layers that write nothing make the exit after layer 2 the full model: every draft is
    kept and each step adds the bonus token: at k = 3, 4 tokens a step."""
    model = drafting_model(damp=0.0)
    ps = prompts(3, 6, 20, seed=8)
    eng = spec_engine(model, k=3)
    reqs = eng.generate(ps, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    for p, r in zip(ps, reqs):
        assert r.output_ids == hf_greedy(model, p, 30)
    st = eng.stats
    assert st.acceptance_rate == 1.0
    # per request: 1 token from the prefill, 7 speculative steps of 4, then a plain step (k clipped to 0)
    assert st.spec_steps == 3 * 7 and st.spec_emitted == 3 * 28


@pytest.mark.parametrize("preset,blocks", [("tiny", 600), ("standard-tiny", 30)])
def test_greedy_exact_with_sliding_window_and_preemption(preset, blocks):
    """tiny: an 8-token window, so blocks are freed behind speculating requests; standard-tiny
    (dense) with a pool too small for all six at once: requests are preempted mid-speculation."""
    model = drafting_model(preset, **({"window_size": 8, "num_global_tokens": 2} if preset == "tiny" else {}))
    ps = prompts(5, 5, 30, seed=5)
    eng = spec_engine(model, k=4, num_blocks=blocks)
    reqs = eng.generate(ps, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    assert (eng.stats.preemptions > 0) == (preset == "standard-tiny")
    for p, r in zip(ps, reqs):
        assert r.output_ids == hf_greedy(model, p, 40)
    assert eng.pool.num_free == eng.pool.num_blocks


def test_stops_max_tokens_penalties_and_logprobs_equal_plain_decoding():
    model = drafting_model()
    ps = prompts(8, 4, 30, seed=6)
    plain = LLMEngine(model, config=EngineConfig(block_size=4, num_blocks=600))
    eng = spec_engine(model, k=4, speculative_min_prob=0.1)  # drafting also stops early at unsure drafts
    ref = plain.generate(ps, SamplingParams(max_tokens=25, temperature=0, ignore_eos=True))
    stop = ref[0].output_ids[9]  # a token some outputs hit part-way through an accepted run
    cases = [SamplingParams(max_tokens=23, temperature=0, stop_token_ids=[stop], logprobs=2),
             SamplingParams(max_tokens=17, temperature=0, ignore_eos=True, repetition_penalty=1.5,
                            frequency_penalty=0.5, logit_bias={5: 2.0})]
    for sp in cases:
        want, got = plain.generate(ps, sp), eng.generate(ps, sp)
        for w, g in zip(want, got):
            assert g.output_ids == w.output_ids and g.finish_reason == w.finish_reason
    want, got = plain.generate(ps[:3], cases[0]), []
    for p in ps[:3]:  # logprobs as streamed
        rid = eng.add_request(p, cases[0])
        lps = []
        while eng.has_unfinished():
            lps += [lp for o in eng.step() if o.request_id == rid for lp in o.logprobs]
        got.append(lps)
    for w, lps in zip(want, got):
        assert len(lps) == len(w.output_ids)
        assert [lp.token_id for lp in lps] == w.output_ids
        assert max(abs(lp.logprob - x) for lp, x in zip(lps, plain_logprobs(model, w))) < 1e-4
    assert eng.stats.spec_accepted > 0


def plain_logprobs(model, req):
    ids = torch.tensor([req.prompt_ids + req.output_ids])
    with torch.no_grad():
        lp = model(ids).logits[0].float().log_softmax(-1)
    P = len(req.prompt_ids)
    return [float(lp[P - 1 + i, t]) for i, t in enumerate(req.output_ids)]


@pytest.mark.parametrize("draft_vocab", [0, 5])
def test_sampled_tokens_follow_the_full_models_distribution(draft_vocab):
    """Tokens 2 and 3 of 2000 seeded requests from a fixed prompt (token 1 comes from the prefill,
    tokens 2-3 from one speculative step with k = 2): their joint frequencies match the full
    model's exact joint distribution (temperature 1, top-k 6 over 8 tokens, marginal over token
    1), and not the one of drafting without the rejection rule, which the test can tell apart.
    With a draft vocabulary of 5 of the 8 tokens, the drafts never propose 5-7 and the rejection
    rule's residual still gives them their full-model probability."""
    model = drafting_model(vocab_size=8, damp=0.6)
    prompt = [3, 5, 2, 7, 4]
    sp = dict(max_tokens=3, temperature=1.0, top_k=6, ignore_eos=True, speculative_tokens=2)
    n = 2000
    eng = spec_engine(model, max_num_seqs=512, max_num_batched_tokens=2048, num_blocks=3000,
                      speculative_draft_vocab=draft_vocab)
    reqs = eng.generate([prompt] * n, [SamplingParams(seed=i, **sp) for i in range(n)])
    assert eng.stats.spec_steps == n and 0 < eng.stats.acceptance_rate < 1
    counts = torch.zeros(8, 8)
    for r in reqs:
        counts[r.output_ids[1], r.output_ids[2]] += 1

    def top6(x):
        return x.masked_fill(x < x.topk(6, dim=-1).values[..., -1:], float("-inf")).softmax(-1)

    seqs = torch.tensor([prompt + [a, b] for a in range(8) for b in range(8)])  # (64, P + 2)
    with torch.no_grad():
        out = model(seqs, output_hidden_states=True)
        draft_logits = model.exit_logits(out.hidden_states[2]).float()
        if draft_vocab:
            draft_logits[..., draft_vocab:] = float("-inf")
        full, draft = top6(out.logits.float()), top6(draft_logits)
    P = len(prompt)

    def joint(p3, q2):  # P(t2 = b, t3 = c) = sum_a P(a) q2(b | a) p3(c | a, b)
        p1 = full[0, P - 1]  # token 1 is always the full model's (prefill)
        q2 = q2.view(8, 8, -1, 8)[:, 0, P]  # (a, b): next-token distribution after a
        p3 = p3.view(8, 8, -1, 8)[:, :, P + 1]  # (a, b, c)
        return (p1[:, None, None] * q2[:, :, None] * p3).sum(0)

    want = joint(full, full)
    naive = joint(draft, draft)  # drafts taken as they are
    assert 0.5 * (want - naive).abs().sum() > 0.1
    keep = want.flatten() * n >= 5
    f_obs = counts.flatten()[keep].numpy()
    for dist, ok in ((want, True), (naive, False)):
        f_exp = dist.flatten()[keep] * n
        with np.errstate(divide="ignore"):  # the draft-only joint is 0 where drafts cannot go: p = 0 there
            p = chisquare(f_obs, (f_exp * f_obs.sum() / f_exp.sum()).numpy()).pvalue
        assert (p > 1e-3) if ok else (p < 1e-6)


def test_seeded_speculation_is_reproducible():
    model = drafting_model()
    ps = prompts(3, 5, 20, seed=7)
    sp = SamplingParams(max_tokens=20, temperature=0.8, seed=11, speculative_tokens=3)
    a = spec_engine(model).generate(ps, sp)
    b = spec_engine(model).generate(ps[::-1], sp)
    assert [r.output_ids for r in a] == [r.output_ids for r in b[::-1]]


def test_bad_speculation_requests_are_refused():
    model = drafting_model()
    plain = LLMEngine(model, config=EngineConfig(block_size=4, num_blocks=64))
    with pytest.raises(InvalidRequestError, match="draft exit") as e:
        plain.add_request([3, 4], SamplingParams(max_tokens=4, speculative_tokens=3))
    assert e.value.param == "speculative_tokens"
    eng = spec_engine(model)
    ctx = model.config.max_position_embeddings
    with pytest.raises(InvalidRequestError, match="context"):
        eng.add_request([3, 4], SamplingParams(max_tokens=4, speculative_tokens=ctx))
    with pytest.raises(ValueError, match="needs a draft exit"):  # a model without an exit asked to speculate
        LLMEngine(model, config=EngineConfig(speculative_tokens=4))
    with pytest.raises(ValueError, match="cannot be combined"):
        EngineConfig(speculative_layer=2, early_exit_threshold=0.5)
    with pytest.raises(ValueError, match=r"speculative_layer \(4\) must be in \[1, 3\]"):
        LLMEngine(model, config=EngineConfig(speculative_layer=4))
    with pytest.raises(ValueError, match="speculative_tokens must be"):
        SamplingParams(speculative_tokens=-1)
    with pytest.raises(ValueError, match=r"speculative_draft_vocab \(600\) must be in \[0, 512\]"):
        spec_engine(model, speculative_draft_vocab=600)
    with pytest.raises(ValueError, match="speculative_draft_vocab must be >= 0"):
        EngineConfig(speculative_draft_vocab=-1)
    with pytest.raises(ValueError, match="no draft exit: set speculative_layer"):
        LLMEngine(model, config=EngineConfig(speculative_draft_vocab=64))
    # near the end of the context or of max_tokens the drafts are clipped, never past them
    (r,) = eng.generate([list(range(2, ctx - 6))], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    assert len(r.output_ids) == 5 and r.output_ids == hf_greedy(model, list(range(2, ctx - 6)), 5)


def test_server_takes_speculative_tokens_per_request(tiny_tokenizer):
    import httpx2 as httpx

    from autoglm.inference.async_engine import AsyncEngine
    from autoglm.inference.server import create_app

    from inference_helpers import BackgroundServer

    model = drafting_model()
    engine = LLMEngine(model, tiny_tokenizer, EngineConfig(block_size=4, num_blocks=256, speculative_layer=2))
    body = dict(model="m", prompt="Return the value", max_tokens=20, temperature=0, ignore_eos=True)
    with BackgroundServer(create_app(AsyncEngine(engine), model_name="m")) as url:
        plain = httpx.post(url + "/v1/completions", json=body, timeout=60).json()
        spec = httpx.post(url + "/v1/completions", json=body | {"speculative_tokens": 4}, timeout=60).json()
        bad = httpx.post(url + "/v1/completions", json=body | {"speculative_tokens": 10_000}, timeout=60)
    assert spec["choices"][0]["text"] == plain["choices"][0]["text"]
    assert spec["usage"] == plain["usage"]
    assert engine.stats.spec_steps > 0
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "speculative_tokens"


def test_serve_recipe_drafts_from_the_runs_trained_exit(tmp_path, tiny_tokenizer_dir):
    import json
    import shutil

    from autoglm.recipes.serve import ServeConfig, build_server
    from autoglm.settings import load_config

    plain = tmp_path / "plain"
    make_model("tiny", num_hidden_layers=4).save_pretrained(plain)
    for f in tiny_tokenizer_dir.iterdir():
        shutil.copy2(f, plain / f.name)
    trained = tmp_path / "trained"
    shutil.copytree(plain, trained)
    (trained / "run.json").write_text(json.dumps({"early_exit": {"layers": [3, 2]}}))

    def speculator(run, **over):
        cfg = load_config(ServeConfig, overrides={"run": str(run), "engine.num_blocks": "64", **over})
        return build_server(cfg)[0].state.server.engine._core.runner.speculator

    assert speculator(trained).draft_layer == 2  # the run's first trained exit
    assert speculator(trained, **{"engine.speculative_layer": "3"}).draft_layer == 3
    assert speculator(plain) is None  # no trained exit: requests asking to speculate get a 400
    with pytest.raises(ValueError, match="no trained early exit"):  # ... and a default k is refused at start
        speculator(plain, **{"engine.speculative_tokens": "3"})
    # a trained exit served with approximate early exit: no drafts, and the refusals say why
    assert speculator(trained, **{"engine.early_exit_threshold": "0.1"}) is None
    with pytest.raises(ValueError, match="early exit use the same exit and do not combine"):
        speculator(trained, **{"engine.early_exit_threshold": "0.1", "engine.speculative_tokens": "3"})
    cfg = load_config(ServeConfig, overrides={"run": str(trained), "engine.num_blocks": "64",
                                             "engine.early_exit_threshold": "0.1"})
    core = build_server(cfg)[0].state.server.engine._core
    with pytest.raises(InvalidRequestError, match="runs approximate early exit") as e:
        core.add_request([3, 4], SamplingParams(max_tokens=4, speculative_tokens=2))
    assert e.value.param == "speculative_tokens"
