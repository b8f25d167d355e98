"""Sampling filters against naive references."""

import torch

from autoglm.inference import SamplingParams, apply_repetition_penalty, sample_token, top_k_filter, top_p_filter


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
