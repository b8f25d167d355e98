"""MoE layer vs a naive per-token loop; aux losses vs hand computations."""

import math

import pytest
import torch

from autoglm.losses import expert_load, load_balancing_loss, router_z_loss
from autoglm.modules.moe import MoEFeedForward


def naive_moe(moe, x):
    """Route and run each token through its top-k experts one at a time."""
    xf = x.reshape(-1, x.shape[-1])
    out = torch.zeros_like(xf)
    for n in range(xf.shape[0]):
        logits = xf[n].float() @ moe.router.weight.float().t()
        probs = logits.softmax(-1)
        w, idx = probs.topk(moe.top_k)
        w = w / w.sum()
        for weight, e in zip(w, idx):
            out[n] += weight * moe.experts[int(e)](xf[n : n + 1])[0]
    return out.view_as(x)


@pytest.mark.parametrize("dispatch", ["sorted", "dense", "gather"])
@pytest.mark.parametrize("E,k", [(4, 2), (8, 1), (3, 3)])
def test_moe_matches_naive_loop(dispatch, E, k):
    moe = MoEFeedForward(dim=16, hidden=24, num_experts=E, top_k=k, dispatch=dispatch)
    x = torch.randn(3, 7, 16)
    y, r = moe(x)
    torch.testing.assert_close(y, naive_moe(moe, x), atol=1e-5, rtol=1e-5)
    assert r.logits.dtype == torch.float32 and r.topk_idx.shape == (21, k)


def test_gather_dispatch_sees_weight_updates():
    """The stacked expert weights are a cache: an in-place update must be picked up."""
    moe = MoEFeedForward(dim=8, hidden=12, num_experts=4, top_k=2, dispatch="gather")
    x = torch.randn(5, 8)
    moe(x)
    with torch.no_grad():
        for e in moe.experts:
            e.down_proj.weight.mul_(2.0)
    y, _ = moe(x)
    torch.testing.assert_close(y, naive_moe(moe, x), atol=1e-5, rtol=1e-5)


def test_sorted_and_dense_dispatch_agree_including_grads():
    a = MoEFeedForward(8, 12, 4, 2, "sorted")
    b = MoEFeedForward(8, 12, 4, 2, "dense")
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 9, 8)
    ya, _ = a(x)
    yb, _ = b(x)
    torch.testing.assert_close(ya, yb, atol=1e-6, rtol=1e-5)
    ya.square().sum().backward()
    yb.square().sum().backward()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, atol=1e-5, rtol=1e-4)


def test_unused_expert_is_skipped():
    moe = MoEFeedForward(8, 12, 4, 1)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[2] = 10.0
    x = torch.rand(5, 8) + 0.1  # positive inputs: expert 2 wins for every token
    y, r = moe(x)
    assert (r.topk_idx == 2).all()
    torch.testing.assert_close(y, moe.experts[2](x))


def test_load_balancing_loss_hand_computed():
    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 3.0]])
    idx = torch.tensor([[0, 1], [1, 0], [3, 0]])
    probs = logits.softmax(-1)
    f = torch.tensor([3, 2, 0, 1]) / 6
    expected = 4 * float((f * probs.mean(0)).sum())
    assert math.isclose(float(load_balancing_loss(logits, idx, 4)), expected, rel_tol=1e-6)
    # perfectly uniform routing gives exactly 1
    uni = torch.zeros(4, 4)
    assert math.isclose(float(load_balancing_loss(uni, torch.tensor([[0], [1], [2], [3]]), 4)), 1.0, rel_tol=1e-6)


def test_z_loss_and_load_stats():
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    z = ((math.log(2)) ** 2 + (math.log(math.e + math.e**2)) ** 2) / 2
    assert math.isclose(float(router_z_loss(logits)), z, rel_tol=1e-6)
    load = expert_load(torch.tensor([[0, 1], [1, 1]]), 3)
    assert load.tolist() == [0.25, 0.75, 0.0]


def test_dense_dispatch_honours_adapters_in_the_experts():
    # wide matmuls read the experts' weights directly; a hooked (multi-LoRA) expert projection
    # must still apply, as it does in the sorted dispatch
    torch.manual_seed(0)
    a = MoEFeedForward(8, 12, 4, 2, "sorted")
    b = MoEFeedForward(8, 12, 4, 2, "dense")
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        plain = a(x)[0]
        torch.testing.assert_close(b(x)[0], plain)  # plain experts: the wide path
        for m in (a, b):
            m.experts[1].up_proj.register_forward_hook(lambda mod, inp, out: out + 1.0)
        ya, yb = a(x)[0], b(x)[0]
    torch.testing.assert_close(yb, ya)
    assert (ya - plain).abs().max() > 1e-3  # the hook changed the output (expert 1 was routed to)
