"""Decode steps replayed from CUDA graphs: one captured graph per batch-size bucket.

At batch 1 a decode step of a 16-layer MoE model is a thousand tiny kernels: in eager
mode the GPU waits on Python launching them (HF `generate()` runs there). The runner's
packed forward has static shapes and no host sync when every row is a decode token and
early exit is off, so it can be captured once per bucket B (1, 2, 4, ...) and replayed:

* static inputs: token ids, positions, KV write slots (B,), and each row's key slots,
  key positions and validity (B, K). K is fixed: with local-window + global attention a
  sequence never holds more than (global + window) / block_size + 2 live blocks, so K is
  small however long it generates; dense models use the whole context;
* padding rows (a step with fewer requests than the bucket) write to and read from the
  runner's scratch block, which no block table points to;
* MoE layers use the `gather` dispatch (or `dense` for large buckets): static shapes, no
  `.tolist()`;
* optionally (`compile=True`) the forward is compiled with torch.compile first, which fuses
  the elementwise kernels; the compiled kernels are then captured the same way;
* a step that does not fit (prefill chunks, more rows or keys than captured, early exit)
  runs eagerly.

`capture=False` runs the same fixed-shape forward eagerly: on CPU it tests the padding
and layout logic against the plain path; on CUDA it is a fallback.
"""

from __future__ import annotations

import torch

from ..modules.moe import moe_dispatch
from .runner import StepLayout, _live_keys, _slots_of
from .scheduler import SchedulerOutput

__all__ = ["CUDAGraphDecoder", "max_decode_keys"]


def max_decode_keys(config, block_size: int, max_len: int) -> int:
    """Most key slots one decoding sequence can hold live (block aligned)."""
    if config.attention == "sparse":
        blocks = -(-config.num_global_tokens // block_size) + -(-config.window_size // block_size) + 2
    else:
        blocks = -(-max_len // block_size)
    return blocks * block_size


def _static_dispatch(tokens: int):
    """Static-shape MoE dispatch for `tokens` rows: gather while it reads fewer weights than
    running every expert, dense otherwise."""
    return lambda m: "gather" if tokens * m.top_k <= 2 * m.num_experts else "dense"


class _Bucket:
    def __init__(self, B: int, K: int, scratch: int, device) -> None:
        z = lambda *shape: torch.zeros(shape, dtype=torch.long, device=device)  # noqa: E731
        self.B, self.K = B, K
        self.layout = StepLayout(input_ids=z(B), positions=z(B), write_slots=z(B) + scratch,
                                 decode_q=torch.arange(B, device=device), decode_slots=z(B, K) + scratch,
                                 decode_kpos=z(B, K), decode_valid=torch.zeros((B, K), dtype=torch.bool, device=device),
                                 sample_rows=list(range(B)))
        self.rows = torch.arange(B, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None


class CUDAGraphDecoder:
    def __init__(self, runner, batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32), max_keys: int | None = None,
                 capture: bool = True, compile: bool = False) -> None:
        if capture and runner.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device, not {runner.device}; "
                             f"use capture=False (or no graphs) on CPU")
        if not batch_sizes:
            raise ValueError("give at least one batch size to capture")
        self.runner = runner
        self.capture = capture
        self.max_keys = max_keys or max_decode_keys(runner.config, runner.block_size,
                                                    runner.config.max_position_embeddings)
        self.batch_sizes = tuple(sorted(set(batch_sizes)))
        self.buckets: dict[int, _Bucket] = {}
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.steps = 0  # decode steps run through the fixed-shape path (replayed or eager)
        self.replays = 0
        # torch.compile fuses the small elementwise kernels (norms, rotary, masks, SwiGLU) before capture
        self.forward = torch.compile(runner.forward, dynamic=False) if compile else runner.forward

    # ------------------------------------------------------------------ public
    def try_run(self, so: SchedulerOutput) -> torch.Tensor | None:
        """Logits (R, V) of a decode-only step, or None when the step does not fit a graph."""
        sched = so.scheduled
        if not sched or len(sched) > self.batch_sizes[-1]:
            return None
        if any(s.num_new_tokens != 1 or not s.samples for s in sched):
            return None
        rows = self._rows(so)
        if rows is None:
            return None
        B = next(b for b in self.batch_sizes if b >= len(sched))
        bucket = self.buckets.get(B) or self._make(B)
        self._fill(bucket, rows)
        self.steps += 1
        if bucket.graph is not None:
            bucket.graph.replay()
            self.replays += 1
            logits = bucket.logits
        else:
            with moe_dispatch(self.runner.model, _static_dispatch(B)):
                logits = self.forward(bucket.layout, rows=bucket.rows).logits
        return logits[:len(sched)].clone()

    def reset(self) -> None:
        """Forget the captured graphs (call after changing weights in place: MoE layers replay a
        stacked or concatenated copy of the expert weights taken at capture)."""
        self.buckets.clear()

    # --------------------------------------------------------------- internals
    def _rows(self, so: SchedulerOutput):
        """Per request: (token, position, write slot, key slots, key positions); None if too many keys."""
        bs, out = self.runner.block_size, []
        for s in so.scheduled:
            r = s.request
            c = r.num_computed_tokens
            table = self.runner.kv.get(r.request_id).block_ids
            kpos = _live_keys(table, c + 1, bs)
            if len(kpos) > self.max_keys:
                return None
            out.append((r.all_token_ids[c], c, _slots_of(table, [c], bs)[0], _slots_of(table, kpos, bs), kpos))
        return out

    def _fill(self, bucket: _Bucket, rows) -> None:
        B, K, n = bucket.B, bucket.K, len(rows)
        scratch = self.runner.scratch_slot
        pad = B - n
        lay = bucket.layout
        ids = [r[0] for r in rows] + [0] * pad
        pos = [r[1] for r in rows] + [0] * pad
        write = [r[2] for r in rows] + [scratch] * pad
        slots = [r[3] + [scratch] * (K - len(r[3])) for r in rows] + [[scratch] * K] * pad
        kpos = [r[4] + [0] * (K - len(r[4])) for r in rows] + [[0] * K] * pad
        valid = [[True] * len(r[4]) + [False] * (K - len(r[4])) for r in rows] + [[False] * K] * pad
        small = torch.tensor([ids, pos, write], dtype=torch.long)
        lay.input_ids.copy_(small[0], non_blocking=True)
        lay.positions.copy_(small[1], non_blocking=True)
        lay.write_slots.copy_(small[2], non_blocking=True)
        lay.decode_slots.copy_(torch.tensor(slots, dtype=torch.long), non_blocking=True)
        lay.decode_kpos.copy_(torch.tensor(kpos, dtype=torch.long), non_blocking=True)
        lay.decode_valid.copy_(torch.tensor(valid, dtype=torch.bool), non_blocking=True)

    def _make(self, B: int) -> _Bucket:
        r = self.runner
        bucket = _Bucket(B, self.max_keys, r.scratch_slot, r.device)
        self.buckets[B] = bucket
        if not self.capture:
            return bucket
        with torch.inference_mode(), moe_dispatch(r.model, _static_dispatch(B)):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up: kernels chosen, caches (stacked experts) built
                for _ in range(2):
                    self.forward(bucket.layout, rows=bucket.rows)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                bucket.logits = self.forward(bucket.layout, rows=bucket.rows).logits
        bucket.graph = graph
        return bucket
