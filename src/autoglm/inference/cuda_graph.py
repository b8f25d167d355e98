"""Decode steps replayed from CUDA graphs: one captured graph per batch-size bucket.

At batch 1 a decode step of a 16-layer MoE model is a thousand tiny kernels: in eager
mode the GPU waits on Python launching them (HF `generate()` runs there). The runner's
packed forward has static shapes and no host sync when every row is a decode token and
early exit is off, so it can be captured once per bucket B (1, 2, 4, ...) and replayed.
The runner builds its decoder from `DecodeGraphOptions` and hands it its forward function
and its layout builder; the decoder never reaches back into the runner:

* static inputs: one fixed-shape layout per bucket (`LayoutBuilder.build(..., rows=B,
  keys=K)`): token ids, positions, KV write slots (B,), and each row's key slots, key
  positions and validity (B, K). Each step's layout is built by the same builder on the
  host and copied into the bucket's tensors before the replay. K is fixed: a decode row
  reads exactly the keys it may attend to, with local-window + global attention at most
  global + window of them, so K is small however long it generates; dense models use the
  whole context;
* padding rows (a step with fewer requests than the bucket) and padding keys write to and
  read from the runner's scratch block, which no block table points to;
* MoE layers use the `gather` dispatch (or `dense` for large buckets): static shapes, no
  `.tolist()`;
* optionally (`compile=True`) the forward is compiled with torch.compile first, which fuses
  the elementwise kernels; the compiled kernels are then captured the same way;
* a step that does not fit (prefill chunks, more rows or keys than captured) gives None and
  the runner runs it eagerly.

`capture=False` runs the same fixed-shape forward eagerly: on CPU it tests the padding
and layout logic against the plain path; on CUDA it is a fallback.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..modules.moe import moe_dispatch
from .layout import LayoutBuilder, Segment, StepLayout

__all__ = ["CUDAGraphDecoder", "DecodeGraphOptions", "max_decode_keys"]


@dataclass(frozen=True)
class DecodeGraphOptions:
    """How the runner replays decode-only steps."""

    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32)  # buckets, captured lazily on first use
    capture: bool = True  # False: run the fixed-shape layouts eagerly (a CPU check of the graph path)
    compile: bool = False  # torch.compile the decode forward before capturing it
    max_keys: int | None = None  # key slots per row; None = the most a sequence can hold (max_decode_keys)

    def __post_init__(self) -> None:
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"give at least one batch size >= 1 to capture, got {self.batch_sizes}")


def max_decode_keys(config, max_len: int) -> int:
    """Most keys one decode row reads (`LayoutBuilder`): the global tokens and the window, or
    without a window the whole context."""
    if config.attention == "sparse":
        return config.num_global_tokens + config.window_size
    return max_len


def _static_dispatch(tokens: int):
    """Static-shape MoE dispatch for `tokens` rows: gather while it reads fewer weights than
    running every expert, dense otherwise."""
    return lambda m: "gather" if tokens * m.top_k <= 2 * m.num_experts else "dense"


class _Bucket:
    def __init__(self, layout: StepLayout) -> None:
        self.layout = layout  # static inputs, refilled in place every step
        self.rows = torch.arange(len(layout.sample_rows), device=layout.input_ids.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None


class CUDAGraphDecoder:
    def __init__(self, forward: Callable[..., object], model, builder: LayoutBuilder,
                 options: DecodeGraphOptions) -> None:
        """forward(layout, rows=...) -> object with `.logits`: the runner's packed forward."""
        if options.capture and builder.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device, not {builder.device}; "
                             f"use capture=False (or no graphs) on CPU")
        self.model, self.builder, self.options = model, builder, options
        self.capture = options.capture
        self.max_keys = options.max_keys or max_decode_keys(model.config, model.config.max_position_embeddings)
        self.batch_sizes = tuple(sorted(set(options.batch_sizes)))
        self.buckets: dict[int, _Bucket] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None
        self.steps = 0  # decode steps run through the fixed-shape path (replayed or eager)
        self.replays = 0
        # torch.compile fuses the small elementwise kernels (norms, rotary, masks, SwiGLU) before capture
        self.forward = torch.compile(forward, dynamic=False) if options.compile else forward

    def run(self, segments: list[Segment]) -> torch.Tensor | None:
        """Logits (R, V) of a decode-only step, or None when the step does not fit a bucket."""
        if not segments or len(segments) > self.batch_sizes[-1]:
            return None
        B = next(b for b in self.batch_sizes if b >= len(segments))
        if not self.builder.fits(segments, B, self.max_keys):
            return None
        bucket = self.buckets.get(B) or self._make(B)
        # built on the host, copied into the bucket's (device) tensors: one transfer per tensor
        bucket.layout.copy_(self.builder.build(segments, rows=B, keys=self.max_keys, device="cpu"))
        self.steps += 1
        if bucket.graph is not None:
            bucket.graph.replay()
            self.replays += 1
            logits = bucket.logits
        else:
            with moe_dispatch(self.model, _static_dispatch(B)):
                logits = self.forward(bucket.layout, rows=bucket.rows).logits
        return logits[:len(segments)].clone()

    def reset(self) -> None:
        """Forget the captured graphs (call after changing weights in place: MoE layers replay a
        stacked or concatenated copy of the expert weights taken at capture)."""
        self.buckets.clear()

    def _make(self, B: int) -> _Bucket:
        bucket = self.buckets[B] = _Bucket(self.builder.build([], rows=B, keys=self.max_keys))
        if not self.capture:
            return bucket
        with torch.inference_mode(), moe_dispatch(self.model, _static_dispatch(B)):
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
