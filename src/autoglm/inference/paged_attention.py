"""Attention over the paged KV store: the engine's kernel (`AttentionMetadata.kernel`).

The store is two tensors, (layers, num_slots, Hkv, D): slot s = block * block_size + offset.
Every attention layer calls the cache's `update(k, v, layer_idx)` and then the kernel with
its own `layer_idx`, so nothing is carried from one call to the next:

* `PagedKVCache.update` writes each new token's K/V into its slot of that layer;
* `PagedAttention` gathers each request's keys of that layer through the step's layout
  (`layout.StepLayout`) and runs the dense-with-mask kernel, so the sparse rule (window +
  global) is applied by absolute position: all decode rows as one padded (Bd, H, 1, Tk)
  batch, each prefill chunk alone.
"""

from __future__ import annotations

import torch

from ..modules.attention import attend_dense
from .layout import StepLayout

__all__ = ["PagedKVCache", "PagedAttention"]


class PagedKVCache:
    """HF-Cache-like object handed to the backbone: `update` stores K/V into the paged store."""

    def __init__(self, k_cache: torch.Tensor, v_cache: torch.Tensor, layout: StepLayout) -> None:
        self.k_cache, self.v_cache, self.layout = k_cache, v_cache, layout

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int):
        """k, v (1, Hkv, N, D) for the packed new tokens; written to their slots of `layer_idx`."""
        slots = self.layout.write_slots
        self.k_cache[layer_idx, slots] = k[0].transpose(0, 1).to(self.k_cache.dtype)
        self.v_cache[layer_idx, slots] = v[0].transpose(0, 1).to(self.v_cache.dtype)
        return k, v


class PagedAttention:
    """Attention that reads K/V of layer `layer_idx` through block tables (see module docstring)."""

    def __init__(self, k_cache: torch.Tensor, v_cache: torch.Tensor, layout: StepLayout) -> None:
        self.k_cache, self.v_cache, self.layout = k_cache, v_cache, layout

    def __call__(self, q, k, v, window, num_global, table, layer_idx: int):
        """q (1, H, N, D) packed -> (1, H, N, D); k/v (the new tokens') are already in the store."""
        L = self.layout
        kc, vc = self.k_cache[layer_idx], self.v_cache[layer_idx]
        out = torch.empty_like(q)
        if L.decode_q is not None:
            qd = q[0, :, L.decode_q].transpose(0, 1)[:, :, None]  # (Bd, H, 1, D)
            Bd, Tk = L.decode_slots.shape
            flat = L.decode_slots.view(-1)
            kd = kc.index_select(0, flat).view(Bd, Tk, *kc.shape[1:]).transpose(1, 2).to(q.dtype)  # (Bd, Hkv, Tk, D)
            vd = vc.index_select(0, flat).view(Bd, Tk, *vc.shape[1:]).transpose(1, 2).to(q.dtype)
            qpos = L.positions[L.decode_q][:, None]
            o = attend_dense(qd, kd, vd, window, num_global, qpos, L.decode_kpos, L.decode_valid, table)
            out[0, :, L.decode_q] = o[:, :, 0].transpose(0, 1)
        for a, b, slots, kpos in L.prefills:
            kp = kc.index_select(0, slots).transpose(0, 1)[None].to(q.dtype)  # (1, Hkv, Tk, D)
            vp = vc.index_select(0, slots).transpose(0, 1)[None].to(q.dtype)
            out[:, :, a:b] = attend_dense(q[:, :, a:b], kp, vp, window, num_global,
                                          L.positions[a:b][None], kpos[None], None, table)
        return out
