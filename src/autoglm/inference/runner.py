"""Model runner: one forward pass over a scheduler step, K/V read and written through block tables.

The KV store is two tensors per model, (layers, num_blocks * block_size, Hkv, D): slot
s = block * block_size + offset. A step's tokens from every scheduled request are packed
into one (1, N) row (no padding: prefill chunks and decode tokens side by side), so the
projections and FFNs run once on N tokens. Attention is the engine's kernel
(`AttentionMetadata.kernel`):

* `PagedKVCache.update` writes each new token's K/V into its slot and remembers the layer;
* `PagedAttention` gathers each request's live slots (through its block table) and runs
  the dense-with-mask kernel, so the sparse rule (window + global) is applied by absolute
  position: all decode rows as one padded (Bd, H, 1, Tk) batch, each prefill chunk alone.

Early exit (decode steps): after each of `exit_layers`, the shared final norm + LM head
give a distribution per row; when every row's top probability reaches the threshold the
step ends there and samples from those logits. The skipped layers of the exited tokens
are *deferred*, not approximated (as in FREE's synchronised parallel decoding): the runner
keeps each exited token's hidden state and depth, and the next step of that request that
goes deeper runs them through the missing layers as extra rows of the same packed batch,
each joining at the layer after its depth. So every K/V entry a later token reads is the
full model's, and a token that does not exit gets exactly the full model's logits; exits
cost no K/V work of their own. threshold >= 1.0 never exits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..modules.attention import AttentionMetadata, attend_dense
from .kv_cache_manager import KVCacheManager
from .scheduler import SchedulerOutput

__all__ = ["DeferredToken", "ModelRunner", "PagedKVCache", "PagedAttention", "RunnerOutput", "StepLayout"]


@dataclass
class StepLayout:
    """Per-step index tensors shared by every layer."""

    input_ids: torch.Tensor  # (N,) packed tokens
    positions: torch.Tensor  # (N,) absolute positions
    write_slots: torch.Tensor  # (N,) KV slot of each new token
    decode_q: torch.Tensor | None = None  # (Bd,) packed index of each decode row
    decode_slots: torch.Tensor | None = None  # (Bd, Tk) slots of its keys (padded)
    decode_kpos: torch.Tensor | None = None  # (Bd, Tk)
    decode_valid: torch.Tensor | None = None  # (Bd, Tk)
    prefills: list[tuple[int, int, torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (a, b, slots, kpos)
    sample_rows: list[int] = field(default_factory=list)  # packed index whose logits are sampled


@dataclass
class DeferredToken:
    """A token that exited early: its hidden state after `depth` layers, awaiting the rest."""

    position: int
    hidden: torch.Tensor  # (d,)
    depth: int


@dataclass
class RunnerOutput:
    logits: torch.Tensor  # (R, V) one row per request that samples, in scheduled order
    exit_layer: int  # number of layers run in full (num_layers when no early exit)


def _slots_of(table: list[int | None], positions: range, block_size: int) -> list[int]:
    return [table[p // block_size] * block_size + p % block_size for p in positions]


def _live_keys(table: list[int | None], end: int, block_size: int) -> list[int]:
    """Positions < end whose block is still held: every key a query of this step may read
    (freed blocks hold nothing anyone here can see)."""
    return [p for j, blk in enumerate(table) if blk is not None
            for p in range(j * block_size, min((j + 1) * block_size, end))]


class PagedKVCache:
    """HF-Cache-like object handed to the backbone: `update` stores K/V into the paged store."""

    def __init__(self, runner: "ModelRunner", layout: StepLayout) -> None:
        self.runner, self.layout = runner, layout
        self.layer = 0

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int):
        """k, v (1, Hkv, N, D) for the packed new tokens; written to their slots."""
        self.layer = layer_idx
        slots = self.layout.write_slots
        self.runner.k_cache[layer_idx, slots] = k[0].transpose(0, 1).to(self.runner.k_cache.dtype)
        self.runner.v_cache[layer_idx, slots] = v[0].transpose(0, 1).to(self.runner.v_cache.dtype)
        return k, v


class PagedAttention:
    """Attention that reads K/V through block tables (see module docstring)."""

    def __init__(self, runner: "ModelRunner", layout: StepLayout, cache: PagedKVCache) -> None:
        self.runner, self.layout, self.cache = runner, layout, cache

    def __call__(self, q, k, v, window, num_global, table):
        """q (1, H, N, D) packed -> (1, H, N, D)."""
        L = self.layout
        kc, vc = self.runner.k_cache[self.cache.layer], self.runner.v_cache[self.cache.layer]
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


class ModelRunner:
    def __init__(self, model, kv: KVCacheManager, dtype: torch.dtype | None = None) -> None:
        cfg = model.config
        self.model, self.kv, self.config = model, kv, cfg
        self.block_size = kv.block_size
        param = next(model.parameters())
        self.device = param.device
        # one extra block past the pool: a scratch area no block table points to, where the
        # padding rows of a fixed-shape (CUDA-graph) decode batch write and read
        self.scratch_slot = kv.pool.num_blocks * kv.block_size
        slots = self.scratch_slot + kv.block_size
        shape = (cfg.num_hidden_layers, slots, cfg.num_key_value_heads, cfg.head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype or param.dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=dtype or param.dtype, device=self.device)
        self.graphs = None  # a CUDAGraphDecoder, set by the engine on CUDA (see cuda_graph.py)
        # request id -> its exited tokens still missing their upper layers, by position
        self.deferred: dict[str, list[DeferredToken]] = {}
        self.max_deferred = kv.block_size  # longest run of exits before a step must go to full depth

    # ----------------------------------------------------------------- layout
    def build_layout(self, so: SchedulerOutput) -> StepLayout:
        return self._layout(self._segments(so))

    def _segments(self, so: SchedulerOutput) -> list[tuple[list[int | None], int, list[int], bool]]:
        """One (block table, first position, new token ids, samples?) per scheduled request."""
        segs = []
        for s in so.scheduled:
            r, c = s.request, s.request.num_computed_tokens
            segs.append((self.kv.get(r.request_id).block_ids, c, r.all_token_ids[c:c + s.num_new_tokens], s.samples))
        return segs

    def _layout(self, segs: list[tuple[list[int | None], int, list[int], bool]]) -> StepLayout:
        """Packed layout of segments (block table, first position, token ids, samples?) in order;
        one token is a decode row, more a prefill chunk."""
        ids, pos, write = [], [], []
        dec_q, dec_slots, dec_kpos = [], [], []
        prefills, sample_rows = [], []
        bs = self.block_size
        t = lambda x: torch.tensor(x, dtype=torch.long, device=self.device)  # noqa: E731
        for table, c, toks, samples in segs:
            n = len(toks)
            a = len(ids)
            ids += toks
            pos += range(c, c + n)
            write += _slots_of(table, range(c, c + n), bs)
            kpos = _live_keys(table, c + n, bs)
            kslots = _slots_of(table, kpos, bs)
            if n == 1:
                dec_q.append(a)
                dec_slots.append(kslots)
                dec_kpos.append(kpos)
            else:
                prefills.append((a, a + n, t(kslots), t(kpos)))
            if samples:
                sample_rows.append(a + n - 1)
        lay = StepLayout(t(ids), t(pos), t(write), prefills=prefills, sample_rows=sample_rows)
        if dec_q:
            Tk = max(len(k) for k in dec_kpos)
            lay.decode_q = t(dec_q)
            lay.decode_slots = t([k + [0] * (Tk - len(k)) for k in dec_slots])
            lay.decode_kpos = t([k + [0] * (Tk - len(k)) for k in dec_kpos])
            lay.decode_valid = torch.tensor([[True] * len(k) + [False] * (Tk - len(k)) for k in dec_kpos],
                                            device=self.device)
        return lay

    # ---------------------------------------------------------------- forward
    @torch.inference_mode()
    def execute(self, so: SchedulerOutput, exit_threshold: float = 1.0,
                exit_layers: tuple[int, ...] = (), use_graphs: bool = True) -> RunnerOutput:
        """Run the step; returns the logits of every request that samples this step.
        use_graphs=False keeps the step eager (e.g. Python hooks such as LoRA deltas must run)."""
        if use_graphs and self.graphs is not None and exit_threshold >= 1.0 and not self.deferred:
            logits = self.graphs.try_run(so)
            if logits is not None:
                return RunnerOutput(logits, len(self.model.model.layers))
        segs = self._segments(so)
        lay = self._layout(segs)
        if exit_threshold >= 1.0 and not self.deferred:
            return self.forward(lay)
        return self._forward_early_exit(so, segs, lay, exit_threshold, exit_layers)

    def forward(self, lay: StepLayout, rows: torch.Tensor | None = None) -> RunnerOutput:
        """The packed forward over a layout, every layer; static shapes and no host sync (so a CUDA
        graph can capture it)."""
        bb = self.model.model
        x, meta, cache = self._start(lay)
        if rows is None:
            rows = torch.tensor(lay.sample_rows, dtype=torch.long, device=self.device)
        for layer in bb.layers:
            x, _ = layer(x, meta, cache)
        return RunnerOutput(self.model.lm_head(bb.norm(x[0, rows])), len(bb.layers))

    def _start(self, lay: StepLayout):
        """Embedded tokens (1, N, d) and the attention metadata / paged cache of a layout."""
        bb = self.model.model
        x = bb.embed_tokens(lay.input_ids[None])
        if bb.embed_positions is not None:  # positions are < the context length: the engine checks
            x = x + bb.embed_positions.lookup(lay.positions[None])
        return (x, *self._attention(lay))

    def _attention(self, lay: StepLayout):
        cache = PagedKVCache(self, lay)
        return AttentionMetadata(q_pos=lay.positions[None], kernel=PagedAttention(self, lay, cache)), cache

    def forget(self, request_id: str) -> None:
        """Drop a finished request's deferred tokens."""
        self.deferred.pop(request_id, None)

    def _forward_early_exit(self, so: SchedulerOutput, segs: list, lay: StepLayout, threshold: float,
                            exit_layers: tuple[int, ...]) -> RunnerOutput:
        """The packed forward with exits (see the module docstring) and deferred rows joining;
        `segs` are the step's own segments (`_segments`), `lay` their layout."""
        bb = self.model.model
        n_layers = len(bb.layers)
        can_exit = threshold < 1.0 and lay.decode_q is not None and not lay.prefills \
            and len(lay.sample_rows) == len(so.scheduled)
        segs, waiting = list(segs), []  # waiting: (request id, block table, DeferredToken) not yet joined
        for s, (table, c, _, _) in zip(so.scheduled, segs):
            r = s.request
            queue = self.deferred.pop(r.request_id, [])
            r.deferred_from = None
            # a prefill (first pass or recompute after preemption) runs every layer itself
            if s.num_new_tokens == 1 and queue and queue[-1].position == c - 1:
                waiting += [(r.request_id, table, d) for d in queue]
                # at most `max_deferred` tokens wait: their keys stay allocated (the scheduler frees
                # blocks only out of the oldest one's window), so this bounds the extra KV memory
                can_exit = can_exit and c - queue[0].position < self.max_deferred
        x, meta, cache = self._start(lay)
        rows = torch.tensor(lay.sample_rows, dtype=torch.long, device=self.device)
        joined: list[tuple[str, DeferredToken]] = []  # their rows follow the step's own rows, in order
        for i, layer in enumerate(bb.layers):
            new = [w for w in waiting if w[2].depth == i]
            if new:
                waiting = [w for w in waiting if w[2].depth != i]
                joined += [(rid, d) for rid, _, d in new]
                x = torch.cat([x, torch.stack([d.hidden for _, _, d in new])[None].to(x.dtype)], dim=1)
                segs += [(table, d.position, [0], False) for _, table, d in new]
                meta, cache = self._attention(self._layout(segs))
            x, _ = layer(x, meta, cache)
            if can_exit and i + 1 in exit_layers and i + 1 < n_layers:
                logits = self.model.lm_head(bb.norm(x[0, rows]))
                if bool((logits.float().softmax(-1).amax(-1) >= threshold).all()):
                    self._defer(so, x, lay, joined, waiting, i + 1)
                    return RunnerOutput(logits, i + 1)
        return RunnerOutput(self.model.lm_head(bb.norm(x[0, rows])), n_layers)

    def _defer(self, so: SchedulerOutput, x: torch.Tensor, lay: StepLayout,
               joined: list[tuple[str, "DeferredToken"]], waiting: list, depth: int) -> None:
        """After an exit at `depth`: every row of the step (its own tokens and the deferred ones
        that joined) waits, with its hidden state, for the layers above; tokens still waiting
        for a deeper layer keep theirs."""
        queues: dict[str, list[DeferredToken]] = {}
        for rid, _, d in waiting:
            queues.setdefault(rid, []).append(d)
        n = len(so.scheduled)
        for k, (rid, d) in enumerate(joined):
            queues.setdefault(rid, []).append(DeferredToken(d.position, x[0, n + k], depth))
        positions = lay.positions.tolist()
        for k, s in enumerate(so.scheduled):
            rid = s.request.request_id
            queues.setdefault(rid, []).append(DeferredToken(positions[k], x[0, k], depth))
        for s in so.scheduled:
            q = sorted(queues[s.request.request_id], key=lambda d: d.position)
            self.deferred[s.request.request_id] = q
            s.request.deferred_from = q[0].position
