"""Attention over the paged KV store: the engine's kernel (`AttentionMetadata.kernel`).

The store is two tensors, (layers, Hkv, num_slots, D), head-major: slot s = block * block_size
+ offset, and a row's keys gathered from it are (Hkv, Tk, D) matrices that SDPA reads in
place (no transpose copy). Every attention layer calls the cache's `update(k, v, layer_idx)`
and then the kernel with its own `layer_idx`:

* `PagedKVCache.update` writes each new token's K/V into its slot of that layer;
* `PagedAttention` gathers each request's keys of that layer through the step's layout
  (`layout.StepLayout`) and runs the dense-with-mask kernel, so the sparse rule (window +
  global) is applied by absolute position: all decode rows as one padded (Bd, H, 1, Tk)
  batch, each prefill chunk alone. The masks depend only on the step's positions, so they
  are built once per step, in the additive form SDPA takes, and shared by the layers. On a
  CPU, a step with many decode rows attends with two batched matmuls over the head-major
  keys instead (`MATMUL_DECODE_ROWS`), where SDPA's one-query kernel is the slower.

On a CPU the decode gather goes into a `Workspace` the runner keeps across steps: a fresh
multi-megabyte tensor per layer and step costs its page faults every time (the allocator
returns large blocks to the system), which on a 2-core machine was as much as the gather.
"""

from __future__ import annotations

import math

import torch

from ..modules.attention import _sdpa, attend_dense, dense_allowed
from .layout import StepLayout

__all__ = ["PagedKVCache", "PagedAttention", "Workspace"]

# decode rows from which a CPU step attends with two batched matmuls instead of SDPA: measured
# with the keys out of cache (as between layers), SDPA is faster below about 8 rows and the
# matmuls from there (1.6-1.9x at 32 rows, 2.1-2.2x at 64, over 90-132 keys; 8 heads of 32, 1 thread)
MATMUL_DECODE_ROWS = 8


class Workspace:
    """Reusable flat buffers by name, grown to the largest size asked for (never shrunk)."""

    def __init__(self) -> None:
        self._bufs: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A contiguous tensor of `shape` with `like`'s dtype and device; its contents are stale."""
        n = math.prod(shape)
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < n or buf.dtype != like.dtype or buf.device != like.device:
            buf = self._bufs[name] = torch.empty(n, dtype=like.dtype, device=like.device)
        return buf[:n].view(shape)


class PagedKVCache:
    """HF-Cache-like object handed to the backbone: `update` stores K/V into the paged store."""

    def __init__(self, k_cache: torch.Tensor, v_cache: torch.Tensor, layout: StepLayout) -> None:
        self.k_cache, self.v_cache, self.layout = k_cache, v_cache, layout

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int):
        """k, v (1, Hkv, N, D) for the packed new tokens; written to their slots of `layer_idx`."""
        slots = self.layout.write_slots
        self.k_cache[layer_idx].index_copy_(1, slots, k[0].to(self.k_cache.dtype))
        self.v_cache[layer_idx].index_copy_(1, slots, v[0].to(self.v_cache.dtype))
        return k, v


class PagedAttention:
    """Attention that reads K/V of layer `layer_idx` through block tables (see module docstring).
    One instance serves one step: it keeps the masks of its decode rows and prefill chunks."""

    def __init__(self, k_cache: torch.Tensor, v_cache: torch.Tensor, layout: StepLayout,
                 workspace: Workspace | None = None) -> None:
        self.k_cache, self.v_cache, self.layout, self.workspace = k_cache, v_cache, layout, workspace
        self._masks: dict[tuple, tuple[torch.Tensor, ...]] = {}

    def _mask(self, part, window, num_global, dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(query positions (B, Tq), key positions (B, Tk), allowed (B, Tq, Tk), its additive form
        (B, 1, Tq, Tk) in `dtype`: what SDPA turns a boolean mask into on every call) of the step's
        decode rows (`part` None, B = Bd, Tq = 1) or of prefill chunk `part` (B = 1); built once
        per step and shared by the layers."""
        key = (part, window, num_global, dtype)
        if key not in self._masks:
            L = self.layout
            if part is None:
                qpos, kpos, valid = L.positions[L.decode_q][:, None], L.decode_kpos, L.decode_valid
            else:
                a, b, _, kp = L.prefills[part]
                qpos, kpos, valid = L.positions[a:b][None], kp[None], None
            allowed = dense_allowed(qpos, kpos, valid, window, num_global)
            additive = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))
            self._masks[key] = qpos, kpos, allowed, additive[:, None]
        return self._masks[key]

    def _attend(self, part, q, k, v, window, num_global, table):
        qpos, kpos, allowed, additive = self._mask(part, window, num_global, q.dtype)
        if table is None:
            return _sdpa(q, k, v, additive)
        return attend_dense(q, k, v, window, num_global, qpos, kpos, table=table, allowed=allowed)

    def _gather(self, store: torch.Tensor, slots: torch.Tensor, name: str, dtype: torch.dtype) -> torch.Tensor:
        """store (Hkv, S, D) rows `slots` -> (Hkv, n, D), into the workspace when there is one."""
        if self.workspace is None or store.dtype != dtype:
            return store.index_select(1, slots).to(dtype)
        out = self.workspace.get(name, (store.shape[0], slots.numel(), store.shape[2]), store)
        return torch.index_select(store, 1, slots, out=out)

    @staticmethod
    def _decode_matmul(q, k, v, additive):
        """Decode rows' attention as two batched matmuls over the gathered keys in their head-major
        layout: q (H, Bd, D), k/v (Hkv, Bd, Tk, D), additive (Bd, 1, 1, Tk) -> (H, Bd, D). On a CPU,
        from MATMUL_DECODE_ROWS rows, this is faster than SDPA's kernel for one query per row,
        which works through (row, head) pairs of a single query each."""
        Hkv, Bd, Tk, D = k.shape
        H = q.shape[0]
        qg = q.view(Hkv, H // Hkv, Bd, D).transpose(1, 2)  # (Hkv, Bd, g, D): a KV head's g query heads
        s = torch.matmul(qg * D ** -0.5, k.transpose(-1, -2))  # (Hkv, Bd, g, Tk)
        s += additive.view(1, Bd, 1, Tk)
        o = torch.matmul(torch.softmax(s, -1), v)  # (Hkv, Bd, g, D)
        return o.transpose(1, 2).reshape(H, Bd, D)

    def __call__(self, q, k, v, window, num_global, table, layer_idx: int):
        """q (1, H, N, D) packed -> (1, H, N, D); k/v (the new tokens') are already in the store."""
        L = self.layout
        kc, vc = self.k_cache[layer_idx], self.v_cache[layer_idx]  # (Hkv, S, D)
        if L.decode_q is not None:
            Bd, Tk = L.decode_slots.shape
            only_decode = not L.prefills and Bd == q.shape[2]  # then decode row i is packed row i
            flat = L.decode_slots.view(-1)
            kd = self._gather(kc, flat, "k", q.dtype).view(-1, Bd, Tk, kc.shape[-1])  # (Hkv, Bd, Tk, D)
            vd = self._gather(vc, flat, "v", q.dtype).view(-1, Bd, Tk, vc.shape[-1])
            qd = q[0] if only_decode else q[0, :, L.decode_q]  # (H, Bd, D)
            if Bd >= MATMUL_DECODE_ROWS and table is None and q.device.type == "cpu" and q.dtype == torch.float32:
                *_, additive = self._mask(None, window, num_global, q.dtype)
                od = self._decode_matmul(qd, kd, vd, additive)
            else:
                o = self._attend(None, qd.transpose(0, 1)[:, :, None], kd.transpose(0, 1), vd.transpose(0, 1),
                                 window, num_global, table)  # (Bd, H, 1, D)
                od = o[:, :, 0].transpose(0, 1)
            if only_decode:
                return od[None]
            out = torch.empty_like(q)
            out[0, :, L.decode_q] = od
        else:
            out = torch.empty_like(q)
        for i, (a, b, slots, _) in enumerate(L.prefills):
            kp = kc.index_select(1, slots)[None].to(q.dtype)  # (1, Hkv, Tk, D)
            vp = vc.index_select(1, slots)[None].to(q.dtype)
            out[:, :, a:b] = self._attend(i, q[:, :, a:b], kp, vp, window, num_global, table)
        return out
