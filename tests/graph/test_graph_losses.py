"""InfoNCE and scaled cosine error against naive per-node loops."""

import math

import pytest
import torch
import torch.nn.functional as F

from autoglm.graph.losses import info_nce, scaled_cosine_error


def _naive_info_nce(z1, z2, tau):
    a, b = F.normalize(z1, dim=-1), F.normalize(z2, dim=-1)
    n = a.shape[0]

    def one(u, v, i):
        pos = math.exp(float(u[i] @ v[i]) / tau)
        neg = sum(math.exp(float(u[i] @ v[k]) / tau) for k in range(n) if k != i)
        neg += sum(math.exp(float(u[i] @ u[k]) / tau) for k in range(n) if k != i)
        return -math.log(pos / (pos + neg))

    return sum(one(a, b, i) + one(b, a, i) for i in range(n)) / (2 * n)


def test_info_nce_matches_naive():
    z1, z2 = torch.randn(9, 4), torch.randn(9, 4)
    assert info_nce(z1, z2, 0.5).item() == pytest.approx(_naive_info_nce(z1, z2, 0.5), rel=1e-5)


def test_info_nce_prefers_aligned_views():
    z = torch.randn(32, 16)
    assert info_nce(z, z + 0.01 * torch.randn_like(z)) < info_nce(z, torch.randn_like(z))


def test_sce_matches_formula():
    p, t = torch.randn(6, 5), torch.randn(6, 5)
    ref = sum((1 - float(F.cosine_similarity(p[i:i + 1], t[i:i + 1]))) ** 3 for i in range(6)) / 6
    assert scaled_cosine_error(p, t, 3).item() == pytest.approx(ref, rel=1e-5)
    assert scaled_cosine_error(p[:0], t[:0]).item() == 0.0


def test_loss_errors():
    with pytest.raises(ValueError, match="tau"):
        info_nce(torch.randn(3, 2), torch.randn(3, 2), tau=0)
    with pytest.raises(ValueError, match="must both be"):
        info_nce(torch.randn(3, 2), torch.randn(4, 2))
    with pytest.raises(ValueError, match="alpha"):
        scaled_cosine_error(torch.randn(3, 2), torch.randn(3, 2), alpha=0.5)
