"""InfoNCE, scaled cosine error and CCA-SSG against naive per-element loops."""

import math

import pytest
import torch
import torch.nn.functional as F

from autoglm.graph.losses import cca_ssg, info_nce, scaled_cosine_error


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


def _naive_cca_ssg(z1, z2, lambd):
    """CCA-SSG's loss written out with Python loops over dimensions (float64)."""
    n, d = z1.shape

    def standardise(z):
        cols = []
        for j in range(d):
            col = [float(v) for v in z[:, j]]
            mu = sum(col) / n
            sd = math.sqrt(sum((v - mu) ** 2 for v in col) / (n - 1))  # torch.std's unbiased estimate
            cols.append([(v - mu) / sd for v in col])
        return cols  # d lists of n values

    a, b = standardise(z1), standardise(z2)
    corr = lambda u, v: sum(x * y for x, y in zip(u, v)) / n  # noqa: E731
    invariance = -sum(corr(a[j], b[j]) for j in range(d))
    decor = sum(((1.0 if i == j else 0.0) - corr(z[i], z[j])) ** 2 for z in (a, b) for i in range(d) for j in range(d))
    return invariance + lambd * decor


def test_cca_ssg_matches_naive():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(12, 5, generator=g), torch.randn(12, 5, generator=g)
    for lambd in (0.0, 1e-3, 0.5):
        assert cca_ssg(z1, z2, lambd).item() == pytest.approx(_naive_cca_ssg(z1, z2, lambd), rel=1e-5, abs=1e-6)


def test_cca_ssg_rewards_agreement_and_decorrelation():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(256, 4, generator=g)
    assert cca_ssg(z, z + 0.05 * torch.randn(256, 4, generator=g)) < cca_ssg(z, torch.randn(256, 4, generator=g))
    collapsed = z[:, :1].repeat(1, 4)  # every dimension the same: invariant but fully correlated
    assert cca_ssg(collapsed, collapsed, 1.0) > cca_ssg(z, z, 1.0)


def test_cca_ssg_bad_input():
    with pytest.raises(ValueError, match="must both be"):
        cca_ssg(torch.randn(4, 3), torch.randn(4, 2))
    with pytest.raises(ValueError, match="at least 2"):
        cca_ssg(torch.randn(1, 3), torch.randn(1, 3))
    with pytest.raises(ValueError, match="lambd"):
        cca_ssg(torch.randn(4, 3), torch.randn(4, 3), lambd=-1.0)
