"""MoE layer vs a naive per-token loop; aux losses vs hand computations."""

import logging
import math

import pytest
import torch

from autoglm.losses import expert_load, load_balancing_loss, router_z_loss
from autoglm.modules.moe import GROUPED_MM, MoEFeedForward, grouped_mm_supported


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


@pytest.mark.parametrize("dispatch", ["sorted", "dense", "gather", "grouped", "auto"])
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


@pytest.mark.parametrize("align", [1, 4])
@pytest.mark.parametrize("E,k", [(4, 2), (8, 2), (3, 3)])
def test_grouped_gemm_equals_sorted_loop_including_grads(E, k, align):
    """Grouped GEMMs (device-side offsets; rows padded per expert when align > 1) against the
    loop over experts: same output, same gradients for the router, every expert and the input."""
    torch.manual_seed(E + k + align)
    a = MoEFeedForward(16, 24, E, k, "sorted")
    b = MoEFeedForward(16, 24, E, k, "grouped")
    b.load_state_dict(a.state_dict())
    xa = torch.randn(2, 11, 16, requires_grad=True)
    xb = xa.detach().clone().requires_grad_(True)
    ya, ra = a(xa)
    yb_flat = b._grouped(xb.reshape(-1, 16), ra._replace(topk_weight=ra.topk_weight.detach()), align=align)
    # same routing decision, the router's gradient through the weights checked separately below
    torch.testing.assert_close(yb_flat.view_as(ya), ya, atol=1e-5, rtol=1e-5)
    yb, rb = b(xb)
    torch.testing.assert_close(yb, ya, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(ya)
    (ya * g).sum().backward()
    (yb * g).sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad, atol=1e-5, rtol=1e-4)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        if pa.grad is None:  # an expert no token was routed to
            assert pb.grad is None or not pb.grad.any(), name
        else:
            torch.testing.assert_close(pb.grad, pa.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_grouped_keeps_every_token_when_one_expert_takes_all():
    """Capacity-free: a maximally unbalanced routing drops nothing (empty groups are fine)."""
    moe = MoEFeedForward(8, 16, 4, 1, "grouped")
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[3] = 10.0
    x = torch.rand(37, 8) + 0.1  # positive inputs: expert 3 wins for every token
    y, r = moe(x)
    assert (r.topk_idx == 3).all()
    torch.testing.assert_close(y, moe.experts[3](x), atol=1e-5, rtol=1e-5)


def test_grouped_bf16_close_to_fp32_reference():
    torch.manual_seed(0)
    moe = MoEFeedForward(32, 64, 4, 2, "grouped")
    x = torch.randn(40, 32)
    ref = naive_moe(moe, x)
    y, _ = moe.to(torch.bfloat16)(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, atol=3e-2, rtol=3e-2)


def test_auto_picks_the_loop_for_few_tokens_on_cpu_and_grouped_for_many(monkeypatch):
    moe = MoEFeedForward(8, 16, 4, 2, "auto")
    assert moe.choose(torch.randn(4, 8)) == "sorted"  # 4 tokens x 2 copies <= 2 x 4 experts, eager CPU
    assert moe.choose(torch.randn(5, 8)) == "grouped"
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # as inside torch.compile
    assert moe.choose(torch.randn(4, 8)) == "gather"  # static shapes in a trace
    assert moe.choose(torch.randn(5, 8).bfloat16()) == "grouped"
    assert moe.choose(torch.randn(5, 8)) == "dense"  # grouped GEMM traces in bf16 only
    moe.experts[0].up_proj.register_forward_hook(lambda mod, inp, out: out)
    assert moe.choose(torch.randn(64, 8).bfloat16()) == "sorted"  # hooked experts must be called as modules


def test_unsupported_dtype_is_an_error_or_a_stated_fallback(caplog):
    """float64 has no grouped-GEMM kernel: 'grouped' says so and how to fix it. Where 'auto' would
    take grouped GEMMs (a GPU; here a device without a kernel stands in) it falls back to the
    sorted loop and says so in the log, once (never silently)."""
    assert grouped_mm_supported(torch.device("cpu"), torch.float64) is not None
    assert grouped_mm_supported(torch.device("cpu"), torch.float32, (16, 24)) is None
    assert "multiple of 8" in grouped_mm_supported(torch.device("cpu"), torch.bfloat16, (16, 20))
    assert "needs bfloat16" in grouped_mm_supported(torch.device("cuda"), torch.float32)  # no GPU needed to ask
    x = torch.randn(3, 9, 8, dtype=torch.float64)
    moe = MoEFeedForward(8, 16, 4, 2, "grouped").double()
    with pytest.raises(ValueError, match="float64.*moe_dispatch='auto'"):
        moe(x)
    moe.dispatch = "auto"
    with caplog.at_level(logging.WARNING, logger="autoglm.modules.moe"):
        y, _ = moe(x)
        moe(x)
        assert moe.choose(torch.empty(64, 8, device="meta")) == "sorted"  # a device without a kernel
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and all("sorted loop" in m for m in messages)  # once per (device, dtype)
    assert "float64" in messages[0] and "'meta'" in messages[1]
    torch.testing.assert_close(y, naive_moe(moe, x))


def test_grouped_mm_name_is_reported():
    assert GROUPED_MM in ("torch.nn.functional.grouped_mm", "torch._grouped_mm")


@pytest.mark.parametrize("dispatch", ["grouped", "gather", "auto"])
def test_no_grad_forward_after_a_fused_adamw_step_sees_the_new_weights(dispatch):
    """The fused AdamW kernel does not move parameters' version counters: a no-grad evaluation
    between training steps must not read stacked weights cached before the step."""
    torch.manual_seed(0)
    moe = MoEFeedForward(8, 16, 4, 2, dispatch)
    x = torch.randn(3, 8)
    with torch.no_grad():
        moe(x)
    opt = torch.optim.AdamW(moe.parameters(), lr=0.1, fused=True)
    moe(torch.randn(16, 8))[0].square().sum().backward()
    opt.step()
    with torch.no_grad():
        y, _ = moe(x)
        torch.testing.assert_close(y, naive_moe(moe, x), atol=1e-5, rtol=1e-5)
    with torch.inference_mode():  # a frozen or served model keeps its cache
        moe.requires_grad_(False)
        moe(torch.randn(16, 8))  # enough tokens that 'auto' takes grouped GEMM (the loop caches nothing)
        assert moe._weight_cache
