"""Causal attention: sparse (local window + global tokens) or dense.

The sparse pattern: query at position i may attend to key at position j iff

    j <= i  and  (i - j < window  or  j < num_global)

i.e. the `window` most recent keys (itself included) plus the first `num_global`
positions of the sequence, which every later token can see (the "global tokens").

Three interchangeable kernels compute exactly the same function:

* `dense`   - scaled_dot_product_attention with an explicit boolean (T, T) mask; the
              reference, and the path for padded batches / arbitrary positions.
* `chunked` - the CPU path: queries in chunks of C; each chunk attends only to the global
              keys plus the W + C - 1 keys before it, gathered into one batched SDPA call.
              Cost O(T * (W + C + G)) instead of O(T^2).
* `flex`    - PyTorch FlexAttention with a block mask built from the same rule (compiled on
              GPU; eager on CPU, where it is only a correctness check).

Every kernel optionally adds a learned relative-position bias table (H, W + G) to the
scores (see `modules.position.RelativePositionBias`); in the chunked kernel the bias of
all interior chunks is one shared (H, C, G + L) tensor.

The module takes attention metadata (`AttentionMetadata`) from its caller, so an
inference engine can drive it with its own positions and KV storage.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from .position import LearnableRotary, RelativePositionBias, apply_rotary

__all__ = [
    "AttentionMetadata",
    "CausalSelfAttention",
    "sparse_mask",
    "bias_code",
    "attend",
    "attend_dense",
    "dense_allowed",
    "attend_chunked",
    "attend_flex",
]


def sparse_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None, num_global: int) -> torch.Tensor:
    """Boolean "may attend" for broadcastable query/key positions. window=None: full causal."""
    allowed = k_pos <= q_pos
    if window is not None:
        allowed = allowed & ((q_pos - k_pos < window) | (k_pos < num_global))
    return allowed


def bias_code(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int, num_global: int) -> torch.Tensor:
    """Column of the relative-bias table for each (query, key) pair (see RelativePositionBias):
    global key j -> window + j, otherwise the distance q - k clamped to [0, window - 1]."""
    return torch.where(k_pos < num_global, window + k_pos, (q_pos - k_pos).clamp(0, window - 1))


def _float_mask(allowed: torch.Tensor, table: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """allowed (..., Tq, Tk) bool, code (..., Tq, Tk) -> (..., H, Tq, Tk) additive mask."""
    bias = table[:, code].movedim(0, -3)  # (..., H, Tq, Tk)
    return bias.masked_fill(~allowed.unsqueeze(-3), float("-inf"))


@dataclass
class AttentionMetadata:
    """What one forward pass tells every attention layer.

    kernel:    an engine's own attention kernel (see `autoglm.inference.paged_attention`),
               called by every layer with that layer's index; the cache it passes
               decides what k/v hold.
    q_offset:  absolute position of the first query when positions are contiguous
               (training, prefill and decode of unpadded batches); keys are 0..Tk-1.
    q_pos/k_pos/k_valid: per-row positions (B, Tq), (B, Tk) and key validity (B, Tk)
               for padded batches or engine-managed KV; when set, the dense kernel with
               an explicit mask is used.
    """

    q_offset: int = 0
    q_pos: torch.Tensor | None = None
    k_pos: torch.Tensor | None = None
    k_valid: torch.Tensor | None = None
    # engine-provided attention (e.g. paged KV read through block tables):
    # kernel(q, k, v, window, num_global, table, layer_idx=i) -> (B, H, Tq, D); overrides every other path
    kernel: Callable | None = None

    @property
    def contiguous(self) -> bool:
        return self.q_pos is None


def _sdpa(q, k, v, mask=None):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


def dense_allowed(q_pos, k_pos, k_valid, window, num_global) -> torch.Tensor:
    """The (B, Tq, Tk) "may attend" of `attend_dense`: the sparse rule by position and key
    validity; a row with nothing visible (a padding query) sees everything instead of NaN."""
    allowed = sparse_mask(q_pos[:, :, None], k_pos[:, None, :], window, num_global)
    if k_valid is not None:
        allowed = allowed & k_valid[:, None, :]
    return allowed | ~allowed.any(-1, keepdim=True)


def attend_dense(q, k, v, window, num_global, q_pos, k_pos, k_valid=None, table=None, allowed=None):
    """Reference kernel. q (B,H,Tq,D), k/v (B,Hkv,Tk,D); q_pos (B|1,Tq), k_pos (B|1,Tk).
    `allowed`: `dense_allowed(...)` of these positions when the caller already has it (an
    engine step shares it between its layers)."""
    if allowed is None:
        allowed = dense_allowed(q_pos, k_pos, k_valid, window, num_global)
    if table is None:
        return _sdpa(q, k, v, allowed[:, None])
    code = bias_code(q_pos[:, :, None], k_pos[:, None, :], window, num_global)
    return _sdpa(q, k, v, _float_mask(allowed, table, code))


@lru_cache(maxsize=32)
def _chunk_layout(T: int, C: int, W: int, G: int, device: torch.device):
    """Gather indices, validity and bias codes for the batched chunked kernel (cached per shape).

    Chunk c holds queries [cC, cC + C); its keys are the G global ones followed by the
    L = W + C - 1 positions before/inside it. "Interior" chunks (window clear of the global
    tokens, chunk fully inside T) all share one mask and one bias pattern.
    """
    n_chunks = -(-T // C)
    L = W + C - 1
    starts = torch.arange(n_chunks) * C
    idx = starts[:, None] - (W - 1) + torch.arange(L)[None, :]  # (nC, L) absolute key positions
    q_abs = starts[:, None] + torch.arange(C)[None, :]  # (nC, C)
    in_range = ((idx >= 0) & (idx < T))[:, None, :]
    # global keys are served from their own slot; mask them out of the window slot so
    # nothing is counted twice
    win_ok = in_range & (idx >= G)[:, None, :] & sparse_mask(q_abs[:, :, None], idx[:, None, :], W, G)
    g_pos = torch.arange(G)
    glob_ok = (g_pos[None, None, :] <= q_abs[:, :, None]) & (g_pos[None, None, :] < T)
    valid = torch.cat([glob_ok, win_ok], dim=-1)  # (nC, C, G + L)
    valid = valid | ~valid.any(-1, keepdim=True)  # padded query rows beyond T
    k_abs = torch.cat([g_pos.expand(n_chunks, G), idx], dim=1)  # (nC, G + L)
    code = bias_code(q_abs[:, :, None], k_abs[:, None, :], W, G).clamp_max(W + max(G, 1) - 1)
    # interior chunks c: c * C - W + 1 >= G and (c + 1) * C <= T; plain integers, so a traced
    # (torch.compile) forward needs no data-dependent shape
    lo, hi = -(-(G + W - 1) // C), T // C
    lo, hi = (lo, hi) if lo < hi else (0, 0)
    return idx.clamp(0, T - 1).to(device), valid.to(device), code.to(device), lo, hi


def attend_chunked(q, k, v, window, num_global, q_offset, chunk_size, table=None):
    """Sparse kernel for contiguous positions; O(T * (W + C + G)) work and memory."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    if q_offset != 0 or Tq != Tk:
        return _attend_chunked_loop(q, k, v, window, num_global, q_offset, chunk_size, table)
    C = min(chunk_size, Tq)
    G = min(num_global, Tk)
    layout = _chunk_layout.__wrapped__ if torch.compiler.is_compiling() else _chunk_layout  # traced: no cache
    idx, valid, code, lo, hi = layout(Tq, C, window, G, q.device)
    n_chunks = idx.shape[0]
    pad = n_chunks * C - Tq
    qc = F.pad(q, (0, 0, 0, pad)).view(B, H, n_chunks, C, D).transpose(1, 2)  # (B, nC, H, C, D)

    L = window + C - 1

    def gather(t):  # (B, Hkv, Tk, D) -> (B, nC, Hkv, G + L, D)
        # overlapping windows as a strided view (no index gather: its backward is a slow scatter);
        # chunk c sees padded positions [cC, cC + L) = original [cC - W + 1, cC + C)
        t_pad = F.pad(t, (0, 0, window - 1, n_chunks * C - Tk))
        win = t_pad.unfold(2, L, C).transpose(-1, -2)  # (B, Hkv, nC, L, D)
        if G:
            glob = t[:, :, None, :G].expand(-1, -1, n_chunks, -1, -1)
            win = torch.cat([glob, win], dim=3)
        return win.transpose(1, 2)

    kc, vc = gather(k), gather(v)
    Hkv, Lk = kc.shape[2], kc.shape[3]

    def run(a, b, shared):  # chunks [a, b); shared: one mask serves every chunk in the range
        n = b - a
        if shared:
            m = valid[a][None, None] if table is None else _float_mask(valid[a], table, code[a])[None]
        else:
            m = valid[a:b, None] if table is None else _float_mask(valid[a:b], table, code[a:b])
            m = m[None].expand(B, -1, -1, -1, -1).reshape(B * n, -1, C, Lk)
        o = _sdpa(qc[:, a:b].reshape(B * n, H, C, D), kc[:, a:b].reshape(B * n, Hkv, Lk, D),
                  vc[:, a:b].reshape(B * n, Hkv, Lk, D), m)
        return o.view(B, n, H, C, D)

    parts = [run(a, b, shared) for a, b, shared in ((0, lo, False), (lo, hi, True), (hi, n_chunks, False))
             if b > a]
    out = torch.cat(parts, dim=1).transpose(1, 2).reshape(B, H, n_chunks * C, D)
    return out[:, :, :Tq]


def _attend_chunked_loop(q, k, v, window, num_global, q_offset, chunk_size, table=None):
    """Chunked kernel when queries start at q_offset > 0 (prefill after a cache, decode)."""
    Tk = k.shape[2]
    outs = []
    for a in range(0, q.shape[2], chunk_size):
        b = min(a + chunk_size, q.shape[2])
        qa, qb = q_offset + a, q_offset + b  # absolute query positions [qa, qb)
        lo = max(0, qa - window + 1)
        if lo > num_global:
            ks = torch.cat([k[:, :, :num_global], k[:, :, lo:qb]], dim=2)
            vs = torch.cat([v[:, :, :num_global], v[:, :, lo:qb]], dim=2)
            kp = torch.cat([torch.arange(num_global), torch.arange(lo, qb)]).to(q.device)
        else:
            ks, vs, kp = k[:, :, :qb], v[:, :, :qb], torch.arange(qb, device=q.device)
        qp = torch.arange(qa, qb, device=q.device)
        mask = None
        if b - a > 1 or table is not None:
            allowed = sparse_mask(qp[:, None], kp[None, :], window, num_global)
            mask = allowed if table is None else _float_mask(allowed, table, bias_code(qp[:, None], kp[None, :],
                                                                                      window, num_global))
        outs.append(_sdpa(q[:, :, a:b], ks, vs, mask))
    if q_offset + q.shape[2] > Tk:
        raise ValueError(f"keys ({Tk}) must cover every query position (up to {q_offset + q.shape[2]})")
    return torch.cat(outs, dim=2)


@lru_cache(maxsize=64)
def _block_mask(Tq: int, Tk: int, q_offset: int, W: int, G: int, device: torch.device):
    """FlexAttention block mask for the sparse rule, built once per shape (all layers share it)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        qp = q_idx + q_offset
        return (kv_idx <= qp) & ((qp - kv_idx < W) | (kv_idx < G))

    return create_block_mask(mask_mod, None, None, Tq, Tk, device=device)


@lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def attend_flex(q, k, v, window, num_global, q_offset, table=None):
    """FlexAttention with a block mask built from the sparse rule (and the bias as score_mod).
    Compiled on GPU; eager on CPU, where it materialises the scores (a correctness check)."""
    from torch.nn.attention.flex_attention import flex_attention

    W = window if window is not None else q.shape[2] + q_offset + 1
    score_mod = None
    if table is not None:
        def score_mod(score, b, h, q_idx, kv_idx):
            qp = q_idx + q_offset
            col = torch.where(kv_idx < num_global, W + kv_idx, (qp - kv_idx).clamp(0, W - 1))
            return score + table[h, col.clamp(max=table.shape[1] - 1)]

    if torch.compiler.is_compiling():  # inside a compiled model: the mask is built in the graph
        block_mask = _block_mask.__wrapped__(q.shape[2], k.shape[2], q_offset, W, num_global, q.device)
        fn = flex_attention
    else:
        block_mask = _block_mask(q.shape[2], k.shape[2], q_offset, W, num_global, q.device)
        fn = _compiled_flex() if q.device.type == "cuda" else flex_attention
    return fn(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])


def attend(q, k, v, meta: AttentionMetadata, window: int | None, num_global: int,
           impl: str, chunk_size: int, table: torch.Tensor | None = None, layer_idx: int = 0) -> torch.Tensor:
    """Dispatch to a kernel. window=None means dense causal attention; `table` (H, W + G)
    is an optional learned relative-position bias (sparse attention only); `layer_idx` is
    the calling layer's index, passed to an engine kernel (`meta.kernel`)."""
    if meta.kernel is not None:
        return meta.kernel(q, k, v, window, num_global, table, layer_idx=layer_idx)
    if not meta.contiguous:
        return attend_dense(q, k, v, window, num_global, meta.q_pos, meta.k_pos, meta.k_valid, table)
    Tq, Tk = q.shape[2], k.shape[2]
    if impl == "auto":  # flex for whole sequences on GPU; a decode step or a cached prefill (a new
        # block mask and a recompile per offset) takes the chunked loop: a slice of keys + SDPA.
        # On CPU a whole sequence of at most two windows runs as one masked SDPA: the chunks'
        # gathers and their backward cost more than the masked-out keys there (8 x 256 tokens,
        # window 128, 2 threads: forward + backward 13.7 ms against 25.8; at 512 level with
        # backward and slower alone, at 1024 2x slower)
        impl = "chunked"
        if window is not None and meta.q_offset == 0 and Tq == Tk:  # a whole sequence
            impl = "flex" if q.is_cuda else "dense" if Tk <= 2 * window else "chunked"
    if window is None:  # dense causal
        if meta.q_offset == 0 and Tq == Tk:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
        if Tq == 1 and Tk == meta.q_offset + 1:  # one query after exactly its keys (a static cache has more)
            return _sdpa(q, k, v)
        impl = "dense"
    if impl == "flex":
        return attend_flex(q, k, v, window, num_global, meta.q_offset, table)
    if impl == "chunked":
        return attend_chunked(q, k, v, window, num_global, meta.q_offset, chunk_size, table)
    qp = torch.arange(meta.q_offset, meta.q_offset + Tq, device=q.device)[None]
    kp = torch.arange(Tk, device=q.device)[None]
    return attend_dense(q, k, v, window, num_global, qp, kp, None, table)


class CausalSelfAttention(nn.Module):
    """Multi-head (grouped-query) attention with HF-style projection names."""

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.head_dim = config.head_dim
        d = config.hidden_size
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=False)
        self.window = config.window_size if config.attention == "sparse" else None
        self.num_global = config.num_global_tokens if config.attention == "sparse" else 0
        self.impl = config.attn_impl
        self.chunk_size = config.attn_chunk_size or config.window_size
        self.rel_bias = self.rotary = None
        if config.position == "rope":
            self.rotary = LearnableRotary(self.head_dim, config.rope_theta)
        if config.position == "relative":
            self.rel_bias = RelativePositionBias(self.n_heads, config.window_size, config.num_global_tokens)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata, cache=None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        if self.rotary is not None:
            pos = meta.q_pos if not meta.contiguous else torch.arange(meta.q_offset, meta.q_offset + T,
                                                                      device=x.device)[None]
            cos, sin = self.rotary(pos)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:  # HF Cache API: returns all keys/values so far
            k, v = cache.update(k, v, self.layer_idx)
        table = self.rel_bias.table() if self.rel_bias is not None else None
        y = attend(q, k, v, meta, self.window, self.num_global, self.impl, self.chunk_size, table, self.layer_idx)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))
