"""Augmentations: rates checked statistically, eval mode is a no-op, p validated."""

import math

import pytest
import torch

from autoglm.graph.augment import drop_edges, drop_nodes, mask_features, perturb_edges


def _ring(n: int) -> torch.Tensor:
    i = torch.arange(n)
    return torch.stack([i, (i + 1) % n])


def _within(frac: float, p: float, n: int) -> bool:
    return abs(frac - p) < 5 * math.sqrt(p * (1 - p) / n)  # 5 sigma of a binomial proportion


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_drop_edges_rate_and_mask(p):
    ei = _ring(20000)
    out, keep = drop_edges(ei, p, generator=torch.Generator().manual_seed(1))
    assert _within(1 - keep.float().mean().item(), p, ei.shape[1])
    assert torch.equal(out, ei[:, keep])


def test_drop_nodes_removes_incident_edges():
    n = 20000
    ei = _ring(n)
    out, node_mask = drop_nodes(ei, n, 0.3, generator=torch.Generator().manual_seed(2))
    assert _within(1 - node_mask.float().mean().item(), 0.3, n)
    expected = [[s, t] for s, t in ei.t().tolist() if node_mask[s] and node_mask[t]]  # naive reference
    assert out.t().tolist() == expected


def test_perturb_edges_keeps_count_and_adds_random_non_loops():
    n, e = 500, 5000
    g = torch.Generator().manual_seed(3)
    ei = torch.randint(0, n, (2, e), generator=g)
    out, dropped, added = perturb_edges(ei, n, 0.2, generator=g)
    assert out.shape == ei.shape and dropped.numel() == 1000 and added.shape == (2, 1000)
    assert dropped.unique().numel() == 1000
    kept = torch.ones(e, dtype=torch.bool)
    kept[dropped] = False
    assert torch.equal(out, torch.cat([ei[:, kept], added], 1))
    assert bool((added[0] != added[1]).all())
    # added endpoints are uniform: each node's count ~ Binomial(1000*2, 1/n); chi-square sanity bound
    counts = torch.bincount(added.reshape(-1), minlength=n).float()
    chi2 = ((counts - counts.mean()) ** 2 / counts.mean()).sum().item()
    assert chi2 < n + 6 * math.sqrt(2 * n)


@pytest.mark.parametrize("mode,shape", [("column", (64,)), ("element", (300, 64)), ("node", (300,))])
def test_mask_features_modes(mode, shape):
    x = torch.rand(300, 64) + 1.0  # strictly positive: a zero means masked
    out, mask = mask_features(x, 0.25, mode=mode, generator=torch.Generator().manual_seed(4))
    assert mask.shape == shape
    full = {"column": lambda: mask.expand(300, 64), "element": lambda: mask,
            "node": lambda: mask.unsqueeze(1).expand(300, 64)}[mode]()
    assert torch.equal(out == 0, full)
    assert torch.equal(out[~full], x[~full])
    if mode == "element":
        assert _within(mask.float().mean().item(), 0.25, mask.numel())


def test_eval_mode_is_noop():
    ei, x = _ring(50), torch.rand(50, 8)
    assert drop_edges(ei, 0.5, training=False)[0] is ei
    assert drop_nodes(ei, 50, 0.5, training=False)[0] is ei
    out, dropped, added = perturb_edges(ei, 50, 0.5, training=False)
    assert out is ei and dropped.numel() == 0 and added.shape == (2, 0)
    xo, m = mask_features(x, 0.5, training=False)
    assert xo is x and not m.any()


def test_generator_reproducible():
    ei = _ring(1000)
    a = drop_edges(ei, 0.3, generator=torch.Generator().manual_seed(7))[1]
    b = drop_edges(ei, 0.3, generator=torch.Generator().manual_seed(7))[1]
    assert torch.equal(a, b)


@pytest.mark.parametrize("fn", [lambda p: drop_edges(_ring(4), p), lambda p: drop_nodes(_ring(4), 4, p),
                                lambda p: perturb_edges(_ring(4), 4, p), lambda p: mask_features(torch.ones(2, 2), p)])
@pytest.mark.parametrize("p", [-0.1, 1.5])
def test_bad_p_raises(fn, p):
    with pytest.raises(ValueError, match="probability"):
        fn(p)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match=r"\(2, E\)"):
        drop_edges(torch.zeros(3, 4, dtype=torch.long), 0.1)
    with pytest.raises(ValueError, match="mode"):
        mask_features(torch.ones(2, 2), 0.1, mode="row")
