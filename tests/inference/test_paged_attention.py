"""Paged attention (K/V scattered into random blocks, read through layouts from the one
LayoutBuilder) equals dense attention over contiguous K/V; the kernel reads the layer it is
given; the fixed-shape (CUDA-graph) layout pads with the scratch slot only."""

import pytest
import torch

from autoglm.inference.layout import LayoutBuilder, Segment
from autoglm.inference.paged_attention import PagedAttention, PagedKVCache, Workspace
from autoglm.modules.attention import attend_dense

H, HKV, D, BS, NBLOCKS = 4, 2, 8, 4, 64
SCRATCH = NBLOCKS * BS


def scattered(lens, new, freed=()):
    """Random K/V for requests with `lens` cached tokens and `new` tokens this step, the cached
    ones written into random blocks of layer 1 (layer 0 holds noise). `freed`: logical blocks
    of request 0 dropped from its table (a sparse window moving on)."""
    torch.manual_seed(0)
    k_cache = torch.randn(2, HKV, SCRATCH + BS, D)  # layer 0: noise the kernel must not read
    v_cache = torch.randn(2, HKV, SCRATCH + BS, D)
    perm = torch.randperm(NBLOCKS).tolist()
    reqs = []
    for r, (L, n) in enumerate(zip(lens, new)):
        T = L + n
        k, v = torch.randn(1, HKV, T, D), torch.randn(1, HKV, T, D)
        table = [perm.pop() for _ in range(-(-T // BS))]
        slots = [table[p // BS] * BS + p % BS for p in range(T)]
        k_cache[1][:, slots[:L]] = k[0, :, :L]
        v_cache[1][:, slots[:L]] = v[0, :, :L]
        if r == 0:
            table = [None if j in freed else b for j, b in enumerate(table)]
        reqs.append((k, v, table, torch.randn(1, H, n, D)))
    return k_cache, v_cache, reqs


def run(k_cache, v_cache, reqs, lens, new, window, num_global, table=None, rows=None, keys=None, workspace=None):
    segs = [Segment(t, L, [0] * n, True) for (_, _, t, _), L, n in zip(reqs, lens, new)]
    lay = LayoutBuilder(BS, SCRATCH, "cpu", window, num_global).build(segs, rows=rows, keys=keys)
    R = len(lay.input_ids)
    pad = R - sum(new)
    new_k = torch.cat([k[:, :, L:] for (k, _, _, _), L in zip(reqs, lens)] + [torch.zeros(1, HKV, pad, D)], dim=2)
    new_v = torch.cat([v[:, :, L:] for (_, v, _, _), L in zip(reqs, lens)] + [torch.zeros(1, HKV, pad, D)], dim=2)
    q = torch.cat([q for *_, q in reqs] + [torch.randn(1, H, pad, D)], dim=2)
    PagedKVCache(k_cache, v_cache, lay).update(new_k, new_v, 1)
    kernel = PagedAttention(k_cache, v_cache, lay, workspace)
    return kernel(q, None, None, window, num_global, table, layer_idx=1), lay


def reference(reqs, lens, new, window, num_global, table=None, visible=None):
    outs = []
    for r, ((k, v, _, q), L, n) in enumerate(zip(reqs, lens, new)):
        kpos = torch.arange(L + n) if visible is None or r else visible
        outs.append(attend_dense(q, k[:, :, kpos], v[:, :, kpos], window, num_global, torch.arange(L, L + n)[None],
                                 kpos[None], None, table))
    return torch.cat(outs, dim=2)


@pytest.mark.parametrize("workspace", [False, True])
@pytest.mark.parametrize("window,num_global,with_bias", [(None, 0, False), (6, 2, False), (6, 2, True)])
def test_paged_attention_equals_contiguous(window, num_global, with_bias, workspace):
    lens, new = [13, 7, 21], [1, 1, 5]  # two decode rows and a prefill chunk of 5 in one packed step
    k_cache, v_cache, reqs = scattered(lens, new)
    table = torch.randn(H, (window or 1) + max(num_global, 1)) if with_bias and window else None
    out, _ = run(k_cache, v_cache, reqs, lens, new, window, num_global, table,
                 workspace=Workspace() if workspace else None)
    torch.testing.assert_close(out, reference(reqs, lens, new, window, num_global, table), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window,num_global", [(None, 0), (6, 2)])
def test_many_decode_rows_take_the_matmul_kernel_and_equal_contiguous(window, num_global, monkeypatch):
    """From MATMUL_DECODE_ROWS decode rows a CPU step attends with batched matmuls (grouped
    query heads, padded rows of other lengths, a freed block) instead of SDPA: the same output."""
    from autoglm.inference import paged_attention as pa

    calls = []
    real = pa.PagedAttention._decode_matmul
    monkeypatch.setattr(pa.PagedAttention, "_decode_matmul", staticmethod(lambda *a: calls.append(1) or real(*a)))
    n = pa.MATMUL_DECODE_ROWS + 2
    lens, new = [13, 2, 20, 7, 1, 9, 15, 4, 11, 6][:n] + [17], [1] * n + [3]  # n decode rows and a prefill chunk
    k_cache, v_cache, reqs = scattered(lens, new, freed=(1,) if window else ())
    out, _ = run(k_cache, v_cache, reqs, lens, new, window, num_global, workspace=Workspace())
    visible = torch.tensor([0, 1, 2, 3] + list(range(8, 14))) if window else None
    torch.testing.assert_close(out, reference(reqs, lens, new, window, num_global, visible=visible), atol=1e-5, rtol=1e-5)
    assert calls == [1]
    lens, new = lens[:n], new[:n]  # decode rows only: the output is the kernel's own, returned without a copy
    k_cache, v_cache, reqs = scattered(lens, new)
    out, _ = run(k_cache, v_cache, reqs, lens, new, window, num_global)
    torch.testing.assert_close(out, reference(reqs, lens, new, window, num_global), atol=1e-5, rtol=1e-5)
    assert calls == [1, 1]


def test_workspace_is_reused_across_steps_of_other_shapes():
    """One workspace serves a large step, then a smaller one, then a larger one again (a view of
    the grown buffer each time): every step equals the reference."""
    ws = Workspace()
    for lens, new in (([13, 7, 21], [1, 1, 1]), ([3], [1]), ([30, 2, 9, 17], [1, 1, 1, 1])):
        k_cache, v_cache, reqs = scattered(lens, new)
        out, _ = run(k_cache, v_cache, reqs, lens, new, 6, 2, workspace=ws)
        torch.testing.assert_close(out, reference(reqs, lens, new, 6, 2), atol=1e-5, rtol=1e-5)


def test_freed_blocks_are_skipped():
    # request 0 (14 tokens, window 6, 2 global) dropped logical block 1 (positions 4-7): out of every window
    lens, new = [13, 7], [1, 1]
    k_cache, v_cache, reqs = scattered(lens, new, freed=(1,))
    out, lay = run(k_cache, v_cache, reqs, lens, new, 6, 2)
    visible = torch.tensor([0, 1, 2, 3] + list(range(8, 14)))
    torch.testing.assert_close(out, reference(reqs, lens, new, 6, 2, visible=visible), atol=1e-5, rtol=1e-5)
    assert lay.decode_valid[0].sum() == 8  # exactly the 2 global and the 6 window positions
    assert lay.decode_kpos[0, :8].tolist() == [0, 1, 8, 9, 10, 11, 12, 13]


def test_decode_keys_are_exactly_the_visible_positions():
    """A decode row reads the positions its query may attend to, no more: the global tokens and
    the window (not the window's whole first block), without a window every position (not the
    last block's empty slots); the step pads its rows to the longest with invalid scratch keys."""
    table = list(range(10))  # 40 slots, block i at physical block i
    for window, num_global, end, want in [(6, 2, 14, [0, 1] + list(range(8, 14))),
                                          (6, 2, 5, [0, 1, 2, 3, 4]),  # inside the window: all of them
                                          (6, 0, 14, list(range(8, 14))),
                                          (6, 5, 9, list(range(9))),  # global and window overlap
                                          (None, 0, 14, list(range(14)))]:
        b = LayoutBuilder(BS, SCRATCH, "cpu", window, num_global)
        lay = b.build([Segment(table, end - 1, [0], True), Segment(table[:1], 0, [0], True)])
        n = len(want)
        assert lay.decode_kpos[0, :n].tolist() == want and lay.decode_valid[0].sum() == n
        assert lay.decode_slots[0, :n].tolist() == want  # block i is physical block i
        assert lay.decode_slots.shape[1] == n  # the longest row sets the width
        assert lay.decode_valid[1].tolist() == [True] + [False] * (n - 1)
        assert (lay.decode_slots[1, 1:] == SCRATCH).all()
        assert b.fits([Segment(table, end - 1, [0], True)], 1, n) and not b.fits([Segment(table, end - 1, [0], True)], 1, n - 1)


def test_a_decode_row_over_a_freed_block_is_an_error():
    b = LayoutBuilder(BS, SCRATCH, "cpu", 6, 2)
    with pytest.raises(RuntimeError, match="freed out of its window"):
        b.build([Segment([0, 1, None, 3], 13, [0], True)])  # position 13 sees 8-13: block 2 is needed


def test_fixed_shape_layout_pads_with_the_scratch_slot():
    lens, new = [13, 7, 2], [1, 1, 1]
    k_cache, v_cache, reqs = scattered(lens, new)
    eager, _ = run(k_cache.clone(), v_cache.clone(), reqs, lens, new, 6, 2)
    before = k_cache.clone()
    fixed, lay = run(k_cache, v_cache, reqs, lens, new, 6, 2, rows=4, keys=24)
    torch.testing.assert_close(fixed[:, :, :3], eager, atol=1e-5, rtol=1e-5)
    assert lay.decode_slots.shape == (4, 24) and lay.write_slots[3] == SCRATCH
    assert not lay.decode_valid[3].any() and (lay.decode_slots[3] == SCRATCH).all()
    real = torch.ones(SCRATCH + BS, dtype=torch.bool)
    real[lay.write_slots[:3]] = False  # the real rows' own slots are written; the padding row only the scratch
    real[SCRATCH:] = False
    assert torch.equal(k_cache[1][:, real], before[1][:, real])
    assert not LayoutBuilder(BS, SCRATCH, "cpu").fits([Segment(reqs[0][2], 13, [0], True)], 1, 8)  # 14 keys > 8


def test_selected_rows_equal_a_layout_built_for_them():
    # the speculative step builds its verify rows once and takes each draft pass's rows from them
    b = LayoutBuilder(BS, SCRATCH, "cpu", window=3, num_global=4)  # positions 14, 15 see 0-3 and 12-15
    segs = [Segment([3, 5, None, 2], 14, [7], True), Segment([3, 5, None, 2], 15, [8], True),
            Segment([1], 2, [9], True), Segment([1], 3, [4], True)]
    full = b.build(segs)
    for rows in ([0, 2], [1], [3, 1]):
        got, want = full.select(rows, [11] * len(rows)), b.build([segs[r] for r in rows])
        assert got.input_ids.tolist() == [11] * len(rows) and got.sample_rows == list(range(len(rows)))
        for f in ("positions", "write_slots", "decode_q"):
            assert torch.equal(getattr(got, f), getattr(want, f)), f
        for i in range(len(rows)):  # the same keys, up to padding (the full layout is padded wider)
            keys = lambda lay: sorted(zip(lay.decode_kpos[i][lay.decode_valid[i]].tolist(),  # noqa: E731
                                          lay.decode_slots[i][lay.decode_valid[i]].tolist()))
            assert keys(got) == keys(want)
            assert (got.decode_slots[i][~got.decode_valid[i]] == SCRATCH).all()
    with pytest.raises(ValueError, match="decode rows only"):
        b.build([Segment([1], 0, [5, 6, 7], True)]).select([0])
