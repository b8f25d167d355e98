"""Windowed (chunked) prefill attention of the export: the kernel against the dense masked
reference, and the windowed prefill graph against a dense-mask export of the same model."""

import json

import numpy as np
import onnx
import pytest
import torch

from autoglm.export import OrtCausalLM, export_onnx
from autoglm.export.attention import WindowedPrefill
from autoglm.modules.attention import attend_dense


def _mask(B, T, left_pad=0, right_pad=0):
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, :left_pad] = 0
    if B > 2 and right_pad:
        mask[2, T - right_pad:] = 0
    return mask


@pytest.mark.parametrize("B,H,Hkv,T,W,G,C,relative", [
    (3, 4, 2, 70, 32, 4, 32, False),   # grouped-query heads, left + right padding, T not a multiple of C
    (3, 4, 4, 70, 32, 4, 7, True),     # relative-position bias table, odd chunk
    (2, 8, 8, 300, 128, 4, 32, False),  # the `small` window
    (2, 2, 1, 40, 8, 3, 16, True),     # chunk larger than the window
    (1, 2, 2, 5, 16, 4, 32, False),    # shorter than one chunk and than the window
])
def test_kernel_equals_dense_masked_attention(B, H, Hkv, T, W, G, C, relative):
    """Real-token rows equal `attend_dense` (the reference: explicit (T, T) mask on positions)."""
    g = torch.Generator().manual_seed(T * 10 + C)
    q = torch.randn(B, H, T, 16, generator=g)
    k, v = torch.randn(B, Hkv, T, 16, generator=g), torch.randn(B, Hkv, T, 16, generator=g)
    table = torch.randn(H, W + G, generator=g) if relative else None
    mask = _mask(B, T, left_pad=min(9, T - 1), right_pad=3)
    kernel = WindowedPrefill(mask, W, G, C)
    out = kernel(q, k, v, W, G, table)
    ref = attend_dense(q, k, v, W, G, kernel.q_pos, kernel.k_pos, mask.bool(), table)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    for b in range(B):
        real = mask[b].bool()
        assert (out[b][:, real] - ref[b][:, real]).abs().max() < 1e-5
    # the layout is O(T * (G + W + C - 1)), not O(T^2)
    assert kernel.mask.shape[-1] == G + W + C - 1 and kernel.mask.shape[-2] == C


def test_kernel_sees_global_tokens_of_each_row():
    """Far past the window, a query still sees the row's first G real tokens (per-row index under
    left padding): changing only those keys changes the output of the last query."""
    B, H, T, W, G = 2, 2, 100, 8, 2
    q, k, v = (torch.randn(B, H, T, 8) for _ in range(3))
    mask = _mask(B, T, left_pad=30)
    kernel = WindowedPrefill(mask, W, G, 4)
    base = kernel(q, k, v, W, G, None)[:, :, -1]
    v2 = v.clone()
    v2[0, :, 30] += 1.0  # row 0: its first real token (position 0) sits at index 30
    v2[1, :, 0] += 1.0
    moved = kernel(q, k, v2, W, G, None)[:, :, -1]
    assert (moved - base).abs().amax(dim=(1, 2)).min() > 1e-3
    v3 = v.clone()
    v3[:, :, 50] += 1.0  # outside the window and not global: no effect on the last query
    assert torch.allclose(kernel(q, k, v3, W, G, None)[:, :, -1], base)


def test_kernel_rejects_bad_chunk():
    with pytest.raises(ValueError, match="chunk"):
        WindowedPrefill(torch.ones(1, 4, dtype=torch.long), 4, 1, 0)


@pytest.fixture(scope="module")
def dense_mask_export(tmp_path_factory, export_model_dir, eager_model):
    out = tmp_path_factory.mktemp("onnx_dense") / "dense"
    export_onnx(export_model_dir, out, prefill_attention="dense", model=eager_model)
    return out


def test_windowed_prefill_graph_equals_dense_mask_graph(fp32_export, dense_mask_export, eager_model):
    """The default export (windowed prefill) against a dense-mask export of the same model, on a
    left-padded batch longer than window + chunk: same logits and cache, then the same decode."""
    info = json.loads((fp32_export / "export.json").read_text())
    assert info["prefill_attention"]["kind"] == "windowed"
    assert json.loads((dense_mask_export / "export.json").read_text())["prefill_attention"] == {"kind": "dense"}
    win, dense = OrtCausalLM(fp32_export, threads=1), OrtCausalLM(dense_mask_export, threads=1)
    g = np.random.default_rng(0)
    T = eager_model.config.window_size * 3 + 5
    ids = g.integers(2, 512, size=(3, T))
    mask = np.ones_like(ids)
    mask[0, :17] = 0
    mask[1, :1] = 0
    a, pa = win.forward(ids, mask)
    b, pb = dense.forward(ids, mask)
    real = mask.astype(bool)
    assert np.abs(a - b)[real].max() <= 1e-5
    assert max(np.abs(x - y).transpose(0, 2, 1, 3)[real].max() for x, y in zip(pa, pb)) <= 1e-5
    step = g.integers(2, 512, size=(3, 1))
    mask = np.concatenate([mask, np.ones_like(step)], axis=1)
    a, _ = win.forward(step, mask, pa)
    b, _ = dense.forward(step, mask, pb)
    assert np.abs(a - b).max() <= 1e-5
    # and the padded rows agree with the eager model run on each prompt alone
    with torch.no_grad():
        ref = eager_model(torch.from_numpy(ids[0, 17:][None])).logits[0].numpy()
    assert np.abs(win.forward(ids, mask[:, :-1])[0][0, 17:] - ref).max() <= 1e-4


def test_windowed_prefill_graph_has_no_dense_score_mask(fp32_export, dense_mask_export):
    """The dense-mask graph's attention (SDPA with a boolean (T, T) mask) brings IsNaN/Where over
    the scores; the windowed graph does not (its mask is (B, 1, nC, C, G + W + C - 1))."""
    def ops(d):
        return {n.op_type for n in onnx.load(str(d / "prefill.onnx"), load_external_data=False).graph.node}
    assert "IsNaN" in ops(dense_mask_export)
    assert "IsNaN" not in ops(fp32_export)


def test_prefill_refuses_padding_inside_a_row(fp32_export):
    lm = OrtCausalLM(fp32_export, threads=1)
    ids = np.full((2, 6), 5, dtype=np.int64)
    mask = np.array([[1, 1, 0, 1, 1, 1], [1] * 6])
    with pytest.raises(ValueError, match="contiguous"):
        lm.forward(ids, mask)
    lm.forward(ids, np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]))  # left / right padding are fine
