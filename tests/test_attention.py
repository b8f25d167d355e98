"""Sparse attention kernels vs dense attention with an explicit (T, T) mask."""

import math

import pytest
import torch

from autoglm.modules.attention import AttentionMetadata, attend, attend_chunked, attend_flex, sparse_mask


def reference(q, k, v, window, num_global, q_offset=0, table=None):
    """Plain softmax(QK^T/sqrt(d) + bias + mask) V, written out by hand."""
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    k = k.repeat_interleave(H // Hkv, dim=1)
    v = v.repeat_interleave(H // Hkv, dim=1)
    qi = torch.arange(q_offset, q_offset + Tq)[:, None]
    kj = torch.arange(Tk)[None, :]
    allowed = kj <= qi
    if window is not None:
        allowed &= (qi - kj < window) | (kj < num_global)
    s = (q @ k.transpose(-1, -2)) / math.sqrt(D)
    if table is not None:  # global key j -> column W + j, else the distance (loops, no vectorised code)
        bias = torch.empty(H, Tq, Tk)
        for a in range(Tq):
            for b in range(Tk):
                qa = q_offset + a
                col = window + b if b < num_global else min(max(qa - b, 0), window - 1)
                bias[:, a, b] = table[:, col]
        s = s + bias
    s = s.masked_fill(~allowed, float("-inf"))
    return s.softmax(-1) @ v


def test_mask_rule():
    m = sparse_mask(torch.arange(10)[:, None], torch.arange(10)[None, :], window=3, num_global=2)
    assert m[9].tolist() == [True, True] + [False] * 5 + [True] * 3
    assert m[1].tolist() == [True, True] + [False] * 8
    assert not m.triu(1).any()


CASES = [  # T, window, global, chunk, heads, kv_heads
    (37, 8, 2, 8, 4, 4),
    (64, 16, 0, 16, 2, 1),
    (100, 7, 3, 5, 4, 2),
    (5, 16, 4, 16, 2, 2),
    (130, 32, 40, 32, 2, 2),  # more global tokens than the window
]


@pytest.mark.parametrize("T,W,G,C,H,Hkv", CASES)
def test_chunked_and_flex_match_dense(T, W, G, C, H, Hkv):
    q = torch.randn(2, H, T, 16)
    k = torch.randn(2, Hkv, T, 16)
    v = torch.randn(2, Hkv, T, 16)
    ref = reference(q, k, v, W, G)
    meta = AttentionMetadata()
    torch.testing.assert_close(attend_chunked(q, k, v, W, G, 0, C), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attend_flex(q, k, v, W, G, 0), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attend(q, k, v, meta, W, G, "dense", C), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("offset,Tq", [(20, 1), (33, 7), (3, 12), (50, 30)])
def test_offset_queries_match_dense(offset, Tq):
    """Prefill after a cache and decode: queries start at `offset`, keys are 0..offset+Tq-1."""
    W, G = 8, 2
    q = torch.randn(1, 2, Tq, 8)
    k = torch.randn(1, 2, offset + Tq, 8)
    v = torch.randn(1, 2, offset + Tq, 8)
    ref = reference(q, k, v, W, G, q_offset=offset)
    torch.testing.assert_close(attend_chunked(q, k, v, W, G, offset, 4), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attend_flex(q, k, v, W, G, offset), ref, atol=1e-5, rtol=1e-5)


def test_dense_causal_path_with_offset():
    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 12, 8), torch.randn(1, 2, 12, 8)
    out = attend(q, k, v, AttentionMetadata(q_offset=7), None, 0, "auto", 4)
    torch.testing.assert_close(out, reference(q, k, v, None, 0, q_offset=7), atol=1e-5, rtol=1e-5)


def test_chunked_gradients_match_dense():
    T, W, G = 45, 8, 2
    q, k, v = (torch.randn(1, 2, T, 8, requires_grad=True) for _ in range(3))
    (attend_chunked(q, k, v, W, G, 0, 8) ** 2).sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    (reference(q, k, v, W, G) ** 2).sum().backward()
    for g, t in zip(grads, (q, k, v)):
        torch.testing.assert_close(g, t.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("T,W,G,C,offset", [(37, 8, 2, 8, 0), (70, 16, 3, 5, 0), (9, 4, 2, 4, 25), (1, 8, 2, 8, 40)])
def test_relative_bias_table_in_every_kernel(T, W, G, C, offset):
    H = 2
    table = torch.randn(H, W + G)
    q = torch.randn(1, H, T, 8)
    k = torch.randn(1, H, offset + T, 8)
    v = torch.randn(1, H, offset + T, 8)
    ref = reference(q, k, v, W, G, q_offset=offset, table=table)
    meta = AttentionMetadata(q_offset=offset)
    for impl in ("chunked", "flex", "dense"):
        torch.testing.assert_close(attend(q, k, v, meta, W, G, impl, C, table), ref, atol=1e-5, rtol=1e-5)
    # per-row positions (the padded-batch path) give the same result
    qp = torch.arange(offset, offset + T)[None]
    kp = torch.arange(offset + T)[None]
    padded = AttentionMetadata(q_offset=offset, q_pos=qp, k_pos=kp, k_valid=torch.ones_like(kp, dtype=torch.bool))
    torch.testing.assert_close(attend(q, k, v, padded, W, G, "auto", C, table), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["auto", "chunked"])
@pytest.mark.parametrize("offset,Tq", [(200, 1), (57, 1), (150, 3)])
def test_decode_reads_only_window_and_global_keys(impl, offset, Tq):
    """A decode step (queries after a cache) must touch only the global keys and the window:
    every other cached key/value is NaN here, and the output still equals the reference."""
    W, G, H, D = 16, 3, 4, 8
    Tk = offset + Tq
    q, k, v = torch.randn(1, H, Tq, D), torch.randn(1, 2, Tk, D), torch.randn(1, 2, Tk, D)
    ref = reference(q, k, v, W, G, q_offset=offset)
    pos = torch.arange(Tk)
    seen = (pos < G) | (pos > offset - W)  # keys some query in [offset, offset + Tq) may attend to
    k_bad, v_bad = k.clone(), v.clone()
    k_bad[:, :, ~seen] = float("nan")
    v_bad[:, :, ~seen] = float("nan")
    out = attend(q, k_bad, v_bad, AttentionMetadata(q_offset=offset), W, G, impl, W)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
