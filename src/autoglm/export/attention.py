"""Windowed (chunked) sparse attention for the exported prefill graph: O(T * (W + C + G)).

The eager chunked kernel (`modules.attention.attend_chunked`) assumes positions 0..T-1;
the prefill graph takes a padded batch, so positions come from the attention mask
(`k_pos = cumsum(mask) - 1`) and the first `G` real tokens of each row -- the global
tokens -- sit at a different index in every row. This kernel keeps the chunk layout of
the eager one and makes the padding part of it:

* queries in chunks of `C` (the sequence is padded to a multiple of C);
* chunk c reads the G global keys of its row (gathered per row at the index of the row's
  g-th real token and put in front of the keys) and the window keys at indices
  [cC - W + 1, cC + C): one `index_select` with indices computed from the (dynamic) length;
* one additive mask (B, 1, nC, C, G + L), L = W + C - 1, built once per graph from the
  positions (the same rule as `sparse_mask`, on positions, not indices) and shared by every
  layer and head; masked scores get a large finite negative, so no row can give NaN and
  no `IsNaN`/`Where` pass over the scores is needed; scores are floored at 80 below their
  row max, so exp() never produces denormals (ONNX Runtime's exp is several times slower
  on them; the masked weights, <= e^-80, are below float32 resolution);
* scores, softmax and the weighted sum are plain MatMul / Add / Softmax / MatMul on
  (B, H, nC, C, G + L) tensors instead of (B, H, T, T).

Exact (same function as `attend_dense`) for rows whose real tokens are contiguous: left
padding (what `OrtCausalLM` uses) or right padding. Padding *inside* a row would move a
key that is within W positions more than W indices back, outside the chunk's window;
`OrtCausalLM.forward` refuses such masks for the prefill graph.

    >>> import torch
    >>> B, H, T, D = 2, 2, 10, 4
    >>> q, k, v = (torch.randn(B, H, T, D) for _ in range(3))
    >>> mask = torch.tensor([[0, 0, 0] + [1] * 7, [1] * 10])   # row 0 left-padded
    >>> win = WindowedPrefill(mask, window=4, num_global=1, chunk=3)
    >>> from autoglm.modules.attention import attend_dense
    >>> ref = attend_dense(q, k, v, 4, 1, win.q_pos, win.k_pos, mask.bool())
    >>> bool(((win(q, k, v, 4, 1, None) - ref)[0, :, 3:].abs().max() < 1e-5) and
    ...      ((win(q, k, v, 4, 1, None) - ref)[1].abs().max() < 1e-5))
    True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..modules.attention import attend_dense

__all__ = ["WindowedPrefill", "DEFAULT_EXPORT_CHUNK", "NEG", "FLOOR"]

DEFAULT_EXPORT_CHUNK = 32  # queries per chunk: keys per query are G + W + C - 1 (163 for W=128, G=4)
NEG = -1e9  # additive mask value; a fully masked row (padding) stays finite
FLOOR = -80.0  # scores are clamped to row max + FLOOR before the softmax (see WindowedPrefill.__call__)


class WindowedPrefill:
    """Attention kernel (`AttentionMetadata.kernel`) for the prefill of a padded batch.

    attention_mask: (B, T) int, 1 = real token; window W, num_global G and chunk C as in
    the model config. Call as `kernel(q, k, v, window, num_global, table)` with q
    (B, H, T, D), k/v (B, Hkv, T, D) and table (H, W + G) or None -> (B, H, T, D).
    `window=None` (dense causal attention) falls back to the dense masked kernel.
    """

    def __init__(self, attention_mask: torch.Tensor, window: int | None, num_global: int, chunk: int) -> None:
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.valid = attention_mask.bool()  # (B, T)
        counts = attention_mask.long().cumsum(-1)  # (B, T): real tokens up to and including j
        self.k_pos = (counts - 1).clamp_min(0)  # (B, T)
        self.q_pos = self.k_pos
        self.window, self.num_global, self.chunk = window, num_global, chunk
        if window is None:
            return
        B, T = attention_mask.shape
        W, G, C = window, num_global, chunk
        n_chunks = (T + C - 1) // C
        L = W + C - 1
        self.n_chunks, self.L = n_chunks, L
        dev = attention_mask.device
        q_idx = torch.arange(n_chunks * C, device=dev)  # (nC * C,) padded query indices
        starts = torch.arange(n_chunks, device=dev)[:, None] * C
        win = (starts - (W - 1) + torch.arange(L, device=dev)[None, :]).reshape(-1)  # (nC * L,) key indices
        in_range = (win >= 0) & (win < T)
        self.win_idx = win.clamp(0, T - 1)
        # one gather serves both slots: keys are read from [global keys of the row] ++ [all T keys]
        self.key_idx = (torch.cat([torch.arange(G, device=dev).expand(n_chunks, G),
                                   G + self.win_idx.view(n_chunks, L)], dim=1).reshape(-1))  # (nC * (G + L),)
        qp = self.k_pos[:, q_idx.clamp(max=T - 1)].view(B, n_chunks, C, 1)  # (B, nC, C, 1)
        kp = self.k_pos[:, self.win_idx].view(B, n_chunks, 1, L)  # (B, nC, 1, L)
        kv = (self.valid[:, self.win_idx] & in_range).view(B, n_chunks, 1, L)
        # window slot: the sparse rule on positions, global keys excluded (they have their own slot)
        allowed = kv & (kp <= qp) & (qp - kp < W) & (kp >= G)  # (B, nC, C, L)
        code = (qp - kp).clamp(0, W - 1).expand(B, n_chunks, C, L)
        if G:
            g = torch.arange(G, device=dev)
            # index of each row's g-th real token: how many j have fewer than g + 1 real tokens up to j
            self.glob_idx = (counts[:, :, None] <= g).sum(1).clamp(max=T - 1)  # (B, G)
            g_ok = (g < counts[:, -1:])[:, None, None, :] & (g <= qp)  # (B, nC, C, G)
            allowed = torch.cat([g_ok, allowed], dim=-1)  # (B, nC, C, G + L)
            code = torch.cat([(W + g).expand(B, n_chunks, C, G), code], dim=-1)
        self.mask = torch.zeros(allowed.shape, dtype=torch.float32, device=dev).masked_fill(~allowed, NEG)[:, None]
        self.code = code  # (B, nC, C, G + L): column of the relative-bias table

    def _keys(self, t: torch.Tensor, heads: int) -> torch.Tensor:
        """(B, Hkv, T, D) -> (B, H, nC, G + L, D): each chunk's global + window keys."""
        B, Hkv, T, D = t.shape
        nC, L, G = self.n_chunks, self.L, self.num_global
        if G:
            glob = t.gather(2, self.glob_idx[:, None, :, None].expand(B, Hkv, G, D))  # (B, Hkv, G, D)
            t = torch.cat([glob, t], dim=2)  # (B, Hkv, G + T, D)
        win = t.index_select(2, self.key_idx).view(B, Hkv, nC, G + L, D)
        if heads != Hkv:  # grouped-query attention: each kv head serves heads // Hkv query heads
            win = win[:, :, None].expand(B, Hkv, heads // Hkv, *win.shape[2:]).reshape(B, heads, *win.shape[2:])
        return win

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None, num_global: int,
                 table: torch.Tensor | None, layer_idx: int = 0) -> torch.Tensor:
        if window is None:
            return attend_dense(q, k, v, None, 0, self.q_pos, self.k_pos, self.valid, table)
        if (window, num_global) != (self.window, self.num_global):
            raise ValueError(f"layer attention (window {window}, {num_global} global) differs from the layout "
                             f"(window {self.window}, {self.num_global} global)")
        B, H, T, D = q.shape
        nC, C = self.n_chunks, self.chunk
        qc = F.pad(q, (0, 0, 0, nC * C - T)).view(B, H, nC, C, D)
        kc, vc = self._keys(k, H), self._keys(v, H)  # (B, H, nC, G + L, D)
        s = torch.matmul(qc, kc.transpose(-1, -2)) * D ** -0.5 + self.mask  # (B, H, nC, C, G + L)
        if table is not None:
            s = s + table[:, self.code].movedim(0, 1)  # (B, H, nC, C, G + L)
        # shift by the row max and floor at -80 before the softmax: masked scores then give
        # exp(-80) ~ 1.8e-35 (a normal float, below float32 resolution of the row sum) instead
        # of denormals, which make ONNX Runtime's exp several times slower
        s = (s - s.amax(dim=-1, keepdim=True)).clamp_min(FLOOR)
        o = torch.matmul(torch.softmax(s, dim=-1), vc)  # (B, H, nC, C, D)
        return o.reshape(B, H, nC * C, D)[:, :, :T]

