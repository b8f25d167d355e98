"""Zero-shot, recall@K and the probe against direct computations."""

import pytest
import torch
import torch.nn.functional as F

from autoglm.multimodal.evaluate import caption_match, linear_probe, recall_at_k, zero_shot_accuracy


def test_recall_matches_a_loop_over_rankings():
    torch.manual_seed(1)
    img, txt = F.normalize(torch.randn(7, 4), dim=-1), F.normalize(torch.randn(12, 4), dim=-1)
    match = torch.rand(7, 12) < 0.2
    got = recall_at_k(img, txt, match, ks=(1, 3))
    sim = img @ txt.T
    ref_i = {k: 100 * sum(any(match[i, j] for j in sim[i].argsort(descending=True)[:k]) for i in range(7)) / 7
             for k in (1, 3)}
    ref_t = {k: 100 * sum(any(match[i, j] for i in sim[:, j].argsort(descending=True)[:k]) for j in range(12)) / 12
             for k in (1, 3)}
    for k in (1, 3):
        assert got[f"i2t_r{k}"] == pytest.approx(ref_i[k]) and got[f"t2i_r{k}"] == pytest.approx(ref_t[k])


def test_caption_match_counts_shared_texts_for_every_owner():
    texts, m = caption_match([["a seven", "7"], ["a one"], ["a seven"]])
    assert texts == ["a seven", "7", "a one", "a seven"]
    assert m.tolist() == [[True, True, False, True], [False, False, True, False], [True, False, False, True]]


def test_zero_shot_and_probe():
    classes = torch.eye(3)
    img = torch.tensor([[0.9, 0.1, 0.0], [0.0, 0.2, 0.8], [0.6, 0.7, 0.0]])
    assert zero_shot_accuracy(img, classes, torch.tensor([0, 2, 0])) == pytest.approx(200 / 3)
    g = torch.Generator().manual_seed(0)
    y = torch.arange(3).repeat(40)
    x = F.one_hot(y, 3).float() * 3 + torch.randn(120, 3, generator=g) * 0.3
    res = linear_probe(x[:60], y[:60], x[60:90], y[60:90], x[90:], y[90:])
    assert res["test_acc"] == 100.0 and res["C"] in (0.1, 1.0, 10.0, 100.0)
