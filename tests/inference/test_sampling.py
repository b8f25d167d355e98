"""Sampling filters against naive references."""

import torch

from autoglm.inference import SamplingParams, apply_repetition_penalty, sample_token, top_k_filter, top_p_filter
from autoglm.inference.sampling import greedy_ids


def test_top_k_keeps_k_largest():
    x = torch.randn(100)
    out = top_k_filter(x, 5)
    kept = torch.isfinite(out).nonzero().flatten().tolist()
    assert sorted(kept) == sorted(x.argsort(descending=True)[:5].tolist())


def test_top_p_naive_reference():
    x = torch.randn(50)
    p = 0.7
    probs = x.softmax(-1)
    order = probs.argsort(descending=True).tolist()
    keep, total = [], 0.0
    for i in order:  # smallest prefix reaching p
        keep.append(i)
        total += float(probs[i])
        if total >= p:
            break
    out = top_p_filter(x, p)
    assert sorted(torch.isfinite(out).nonzero().flatten().tolist()) == sorted(keep)


def test_repetition_penalty_ctrl_rule():
    x = torch.tensor([2.0, -2.0, 1.0])
    out = apply_repetition_penalty(x, [0, 1, 1], 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0]


def test_seeded_sample_distribution():
    logits = torch.tensor([0.0, 1.0, 2.0])
    g = torch.Generator().manual_seed(0)
    draws = [sample_token(logits, SamplingParams(temperature=1.0), [], g) for _ in range(3000)]
    freq = torch.bincount(torch.tensor(draws), minlength=3).float() / 3000
    torch.testing.assert_close(freq, logits.softmax(-1), atol=0.03, rtol=0)


# ---------------------------------------------------------------- the options clients send
def ref_adjust(logits, p: SamplingParams, prompt, output):
    """Naive reference, token by token: logit_bias, CTRL repetition penalty over prompt + output,
    then OpenAI's mu[j] - c[j] * frequency_penalty - (c[j] > 0) * presence_penalty over the output."""
    x = [float(v) for v in logits]
    for t, b in p.logit_bias.items():
        x[t] += b
    for t in set(prompt + output):
        if p.repetition_penalty != 1.0:
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t in set(output):
        c = output.count(t)
        x[t] -= c * p.frequency_penalty + (1.0 if c > 0 else 0.0) * p.presence_penalty
    return torch.tensor(x)


CASES = [SamplingParams(temperature=0, logit_bias={3: 4.0, 7: -100.0}),
         SamplingParams(temperature=0, presence_penalty=1.5),
         SamplingParams(temperature=0, frequency_penalty=0.7, presence_penalty=-0.3),
         SamplingParams(temperature=0, repetition_penalty=1.8, frequency_penalty=0.4, logit_bias={1: 2.0}),
         SamplingParams(temperature=0)]


def test_adjustments_match_the_naive_reference_row_by_row_in_one_batch():
    from autoglm.inference.sampling import apply_penalties

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(len(CASES), 40, generator=g) * 3
    prompt = [[1, 2, 3, 3], [5], [7, 8], [1, 9, 9, 2], [4]]
    output = [[3, 3, 10], [2, 2, 2, 11], [8, 8, 12, 5], [9, 13], []]
    got = apply_penalties(logits, CASES, [p + o for p, o in zip(prompt, output)], output)
    for i, p in enumerate(CASES):
        torch.testing.assert_close(got[i], ref_adjust(logits[i], p, prompt[i], output[i]), atol=1e-6, rtol=0)


def test_min_p_naive_reference():
    from autoglm.inference.sampling import min_p_filter

    x = torch.randn(60)
    probs = x.softmax(-1)
    keep = [i for i in range(60) if probs[i] >= 0.2 * probs.max()]
    assert sorted(torch.isfinite(min_p_filter(x, 0.2)).nonzero().flatten().tolist()) == keep
    assert torch.equal(min_p_filter(x, 0.0), x)


def test_batching_does_not_change_a_requests_token():
    """Every row of a mixed batch (greedy with penalties, seeded draws with min_p / top-k / top-p,
    plain greedy) picks what it picks alone."""
    from autoglm.inference.sampling import sample_tokens

    g = torch.Generator().manual_seed(1)
    rows = CASES + [SamplingParams(temperature=0.8, min_p=0.1, seed=5), SamplingParams(temperature=1.3, top_k=5,
                                                                                     top_p=0.9, seed=6)]
    logits = torch.randn(len(rows), 50, generator=g) * 2
    seen = [[1, 2, 3, 3]] * len(rows)
    outs = [[3, 3]] * len(rows)
    gens = lambda: [torch.Generator().manual_seed(p.seed) if p.seed is not None else None for p in rows]  # noqa: E731
    batched = sample_tokens(logits, rows, seen, gens(), outs)
    alone = [sample_tokens(logits[i:i + 1], [p], [seen[i]], [gen], [outs[i]])[0]
             for i, (p, gen) in enumerate(zip(rows, gens()))]
    assert batched == alone
    for i, p in enumerate(CASES):  # greedy rows: the argmax of the reference adjustment
        assert batched[i] == int(ref_adjust(logits[i], p, [1, 2, 3, 3], [3, 3]).argmax())


def test_seeded_min_p_draws_only_from_the_kept_set():
    logits = torch.tensor([0.0, 0.2, 3.0, 2.9, -5.0])
    g = torch.Generator().manual_seed(0)
    draws = {sample_token(logits, SamplingParams(temperature=1.0, min_p=0.5), [], g) for _ in range(200)}
    assert draws == {2, 3}  # p >= 0.5 * p_max keeps tokens 2 and 3 only


def test_greedy_ids_is_argmax_with_first_index_on_ties():
    torch.manual_seed(0)
    x = torch.randn(5, 300)
    x[1, 7] = x[1, 200] = x[1].max() + 1  # a tie: the first index wins, as with argmax
    x[3] = 0.0  # a row of ties
    got = greedy_ids(x)
    assert torch.equal(got, x.argmax(-1))
    assert got[1].item() == 7 and got[3].item() == 0


def test_values_that_float32_sampling_cannot_take_are_refused_or_greedy():
    """A temperature below 1e-5 samples as greedy, its limit (a float32 division by 1e-300 gives
    inf and NaN probabilities); non-finite floats, a repetition penalty that underflows and a
    seed the generator cannot take are refused when the request is made, not inside a step."""
    import math

    import pytest

    torch.manual_seed(0)
    logits = torch.randn(64) * 5
    for t in (1e-300, 1e-39, 1e-6):
        p = SamplingParams(temperature=t, seed=5)
        assert p.greedy and sample_token(logits, p, [], torch.Generator().manual_seed(5)) == int(logits.argmax())
    assert not SamplingParams(temperature=1e-4).greedy
    for bad, field in [(dict(temperature=math.inf), "temperature"), (dict(top_p=math.nan), "top_p"),
                       (dict(repetition_penalty=1e-50), "repetition_penalty"),
                       (dict(repetition_penalty=math.inf), "repetition_penalty"),
                       (dict(frequency_penalty=-math.inf), "frequency_penalty"),
                       (dict(seed=2**64), "seed"), (dict(seed=-2**63 - 1), "seed"), (dict(seed=True), "seed")]:
        with pytest.raises(ValueError, match=f"^{field}"):
            SamplingParams(**bad)
    for seed in (-2**63, 2**64 - 1):  # the ends torch.Generator takes
        torch.Generator().manual_seed(SamplingParams(seed=seed).seed)
