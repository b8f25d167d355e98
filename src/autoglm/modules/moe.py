"""Top-k Mixture-of-Experts FFN of gated (SwiGLU) experts.

Routing follows Mixtral: router logits in float32, softmax over all experts, keep the
top-k, renormalise their weights to sum to 1. Every dispatch path gives the same result:

* `auto`    - (the default) picks one of the paths below per call, from the shape: for a few
             token copies (N * k <= 2 * E, small-batch decode) `gather` on a GPU (reads only
             the chosen experts) and `sorted` on CPU (the gather's weight copies cost 2-10x the
             loop there, and a host sync is free), `grouped` otherwise (prefill, training; on CPU two interleaved runs
             found it within +-12% of the loop over experts, in both directions:
             docs/results/architecture-speed*.md); `sorted` where grouped GEMM
             cannot run (expert projections wrapped by PEFT or hooked by multi-LoRA serving,
             or a dtype/device without a grouped-GEMM kernel: stated once in the log). Under
             `torch.compile` grouped GEMM traces in bfloat16 only (PyTorch's fake kernel), so
             a compiled float32 model takes the static `dense` path instead.
* `grouped` - token copies sorted by expert, every expert's SwiGLU as two grouped GEMMs
             (`torch.nn.functional.grouped_mm`, `torch._grouped_mm` on older torch) over
             the contiguous groups, group offsets computed on the device: no host sync, no
             loop over experts, no capacity (no token is dropped), static shapes for
             `torch.compile`; the backward is grouped GEMMs too. Needs an input dtype the
             device has a kernel for (`grouped_mm_supported`).
* `sorted` - token copies are sorted by expert id and each expert runs once on its
             contiguous group (a loop over experts, never over tokens); only experts that
             are hit do work. Data-dependent shapes and a host sync for the group sizes:
             the reference for `grouped`, and the path that calls each expert module.
* `dense`  - every expert runs on every token and a dense (N, E) combine matrix with
             zeros off the top-k selects; static shapes for ONNX export / full-graph
             compile. The experts run as three wide matmuls over their concatenated
             weights (gate and up: (N, d) x (d, E * hidden); down: the combine-scaled
             (N, E * hidden) x (E * hidden, d), which sums the experts' outputs), so an
             exported graph has 3 large MatMuls per layer instead of 3 * E small ones.
             Experts whose projections are wrapped (PEFT) or hooked (multi-LoRA
             serving) are called one by one instead, so their adapters apply.
* `gather` - each token copy gathers its expert's weights from stacked (E, ...) copies
             and runs one batched matmul: static shapes and no host sync (CUDA-graph
             capture), and only the chosen experts' weights are read - the fast path for a
             few tokens (batch decode). The stacked weights are cached and rebuilt when a
             parameter changes (its version counter moves).

The layer returns the router logits and chosen experts so the losses (load balancing,
z-loss) and per-expert load statistics are computed outside, in `autoglm.losses`.

Example:
    >>> import torch
    >>> moe = MoEFeedForward(dim=8, hidden=16, num_experts=4, top_k=2)
    >>> y, routing = moe(torch.randn(2, 3, 8))
    >>> y.shape, routing.logits.shape, routing.topk_idx.shape
    (torch.Size([2, 3, 8]), torch.Size([6, 4]), torch.Size([6, 2]))
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NamedTuple

import logging

import torch
import torch.nn.functional as F
from torch import nn

from .ffn import SwiGLU

__all__ = ["GROUPED_MM", "MoEFeedForward", "RouterOutput", "grouped_mm_supported", "moe_dispatch", "route",
           "sorted_groups"]

log = logging.getLogger(__name__)

# the public grouped GEMM (torch >= 2.13) or the private op it wraps (older torch); results name which ran
_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
GROUPED_MM = ("torch.nn.functional.grouped_mm" if hasattr(F, "grouped_mm")
              else "torch._grouped_mm" if _grouped_mm is not None else None)
DISPATCHES = ("auto", "grouped", "sorted", "dense", "gather")


def grouped_mm_supported(device: torch.device, dtype: torch.dtype, dims: tuple[int, ...] = ()) -> str | None:
    """None when a grouped GEMM can run on `device` in `dtype` with these feature widths, else the
    reason it cannot (CUDA: bfloat16 on compute capability >= 8.0; CPU: float32/bfloat16/float16;
    every row stride a multiple of 16 bytes)."""
    if _grouped_mm is None:
        return f"this torch ({torch.__version__}) has no grouped GEMM (torch.nn.functional.grouped_mm, torch >= 2.8)"
    if device.type == "cuda":
        if dtype != torch.bfloat16:
            return f"grouped GEMM on CUDA needs bfloat16 inputs, got {dtype} (train or run with bf16 autocast)"
        if torch.cuda.get_device_capability(device) < (8, 0):
            return f"grouped GEMM on CUDA needs compute capability >= 8.0, this GPU has " \
                   f"{torch.cuda.get_device_capability(device)}"
    elif device.type == "cpu":
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return f"grouped GEMM on CPU needs float32, bfloat16 or float16 inputs, got {dtype}"
    else:
        return f"no grouped GEMM kernel is known for device type {device.type!r}"
    size = torch.empty((), dtype=dtype).element_size()
    bad = [d for d in dims if (d * size) % 16]
    if bad:
        return f"grouped GEMM needs every feature width to be a multiple of {16 // size} for {dtype}; got {bad}"
    return None


class RouterOutput(NamedTuple):
    logits: torch.Tensor  # (N, E) float32 router logits
    topk_idx: torch.Tensor  # (N, k) chosen experts
    topk_weight: torch.Tensor  # (N, k) float32 renormalised weights


def route(x: torch.Tensor, router_weight: torch.Tensor, top_k: int) -> RouterOutput:
    """x (N, d) -> float32 routing decision."""
    logits = F.linear(x.float(), router_weight.float())  # (N, E), float32 for stable softmax
    probs = logits.softmax(dim=-1)
    w, idx = probs.topk(top_k, dim=-1)
    w = w / w.sum(dim=-1, keepdim=True)
    return RouterOutput(logits, idx, w)


def sorted_groups(topk_idx: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The `sorted` dispatch's layout of token copies: (order (N*k,) flat copy index sorted by
    expert, token_of (N*k,) source token of each sorted copy, counts: copies per expert).
    Expert e runs on tokens token_of[sum(counts[:e]) : sum(counts[:e + 1])], in that order."""
    flat = topk_idx.reshape(-1)  # (N*k,) expert of each token copy
    order = torch.argsort(flat, stable=True)  # token copies grouped by expert
    return order, order // topk_idx.shape[1], torch.bincount(flat, minlength=num_experts).tolist()


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul of `x` runs in: the autocast dtype when autocast is on for its device."""
    if x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class MoEFeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, num_experts: int, top_k: int, dispatch: str = "auto") -> None:
        super().__init__()
        if dispatch not in DISPATCHES:
            raise ValueError(f"dispatch must be one of {DISPATCHES}, got {dispatch!r}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.dim, self.hidden = dim, hidden
        self.dispatch = dispatch
        self.router = nn.Linear(dim, num_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(dim, hidden) for _ in range(num_experts))

    def choose(self, xf: torch.Tensor) -> str:
        """The dispatch this layer runs for input rows `xf` (N, d): the configured one, or under
        `auto` the one that fits the shape (see the module docstring)."""
        if self.dispatch != "auto":
            return self.dispatch
        if not self._plain_experts():
            return "sorted"  # adapters live in the expert modules: call each one
        compiling = torch.compiler.is_compiling()
        if xf.shape[0] * self.top_k <= 2 * self.num_experts:
            # a few token copies: on a GPU read only the chosen experts' weights, with static shapes;
            # on CPU that gather copies whole weight matrices (2-10x slower than the loop over the
            # hit experts, whose host sync costs nothing there), so eager CPU runs the loop
            return "sorted" if xf.device.type == "cpu" and not compiling else "gather"
        cdt = _compute_dtype(xf)
        why = grouped_mm_supported(xf.device, cdt, (self.dim, self.hidden))
        if why is None and compiling and cdt != torch.bfloat16:
            return "dense"  # PyTorch traces grouped GEMM in bfloat16 only; dense is static too
        if why is None:
            return "grouped"
        warned = self.__dict__.setdefault("_fallback_warned", set())
        if (xf.device.type, _compute_dtype(xf)) not in warned and not torch.compiler.is_compiling():
            warned.add((xf.device.type, _compute_dtype(xf)))
            log.warning("MoE dispatch 'auto' runs the sorted loop over experts (a host sync per layer): %s", why)
        return "sorted"

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterOutput]:
        shape = x.shape
        xf = x.reshape(-1, shape[-1])  # (N, d)
        r = route(xf, self.router.weight, self.top_k)
        dispatch = self.choose(xf)
        if dispatch == "grouped":
            y = self._grouped(xf, r)
        elif dispatch == "dense":
            y = self._dense(xf, r)
        elif dispatch == "gather":
            y = self._gather(xf, r)
        else:
            y = self._sorted(xf, r)
        return y.view(*shape[:-1], y.shape[-1]), r

    def _grouped(self, xf: torch.Tensor, r: RouterOutput, align: int | None = None) -> torch.Tensor:
        """Both SwiGLU halves as grouped GEMMs over the token copies sorted by expert.

        Group offsets come from a scatter-add of the routing on the device (no `.tolist()`),
        so the shapes are static: N * k rows (plus up to E * (align - 1) zero rows when each
        group is padded to a multiple of `align` rows, as CUDA kernels prefer)."""
        cdt = _compute_dtype(xf)
        why = grouped_mm_supported(xf.device, cdt, (self.dim, self.hidden))
        if why is not None:
            raise ValueError(f"MoE dispatch 'grouped' cannot run here: {why}; use moe_dispatch='auto' "
                             f"(falls back to 'sorted') or 'sorted'")
        if align is None:
            align = 8 if xf.device.type == "cuda" else 1
        N, k = r.topk_idx.shape
        E = self.num_experts
        flat = r.topk_idx.reshape(-1)  # (N*k,) expert of each token copy
        order = torch.argsort(flat, stable=True)  # token copies grouped by expert
        counts = torch.zeros(E, dtype=torch.int64, device=xf.device).scatter_add_(0, flat, torch.ones_like(flat))
        xs = xf.index_select(0, order // k).to(cdt)  # (N*k, d) token of each sorted copy (backward: index_add)
        if align > 1:  # copy i of expert e goes to row i - start[e] + padded_start[e]
            padded = (counts + align - 1) // align * align
            ends = padded.cumsum(0)
            shift = (ends - padded) - (counts.cumsum(0) - counts)  # (E,) padded start - start
            rows = torch.arange(N * k, device=xf.device) + shift[flat[order]]
            xs = xs.new_zeros(N * k + E * (align - 1), xs.shape[1]).index_copy(0, rows, xs)
        else:
            ends = counts.cumsum(0)
        offs = ends.to(torch.int32)
        gu, down = self._stacked_for(cdt)  # (E, 2h, d), (E, d, h)
        h = _grouped_mm(xs, gu.transpose(1, 2), offs=offs)  # (M, 2h)
        g, u = h.chunk(2, dim=-1)
        ys = _grouped_mm(F.silu(g) * u, down.transpose(1, 2), offs=offs)  # (M, d)
        if align > 1:
            ys = ys.index_select(0, rows)
        # back to (token, copy) order, weighted, summed over the k copies: no scatter-add
        inv = torch.empty_like(order).scatter_(0, order, torch.arange(N * k, device=xf.device))
        w = r.topk_weight.to(ys.dtype).reshape(N, k, 1)
        return (ys.index_select(0, inv).view(N, k, -1) * w).sum(1)

    def _stacked_for(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacked expert weights in `dtype`: built in the graph while training (gradients reach
        every expert), cached otherwise."""
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.experts.parameters()):
            gu = torch.stack([torch.cat([e.gate_proj.weight, e.up_proj.weight]) for e in self.experts])
            down = torch.stack([e.down_proj.weight for e in self.experts])
            return gu.to(dtype), down.to(dtype)
        gu, down = self.stacked_weights()
        if gu.dtype == dtype:
            return gu, down
        return self._cached(f"stacked-{dtype}", lambda: tuple(t.to(dtype) for t in self.stacked_weights()))

    def _sorted(self, xf: torch.Tensor, r: RouterOutput) -> torch.Tensor:
        order, token_of, counts = sorted_groups(r.topk_idx, self.num_experts)
        xs = xf.index_select(0, token_of)  # (N*k, d)
        outs = []
        for e, chunk in enumerate(xs.split(counts)):
            if counts[e]:
                outs.append(self.experts[e](chunk))
        ys = torch.cat(outs) * r.topk_weight.reshape(-1)[order, None].to(xf.dtype)
        return torch.zeros_like(xf).index_add_(0, token_of, ys)

    def _cached(self, kind: str, build: Callable[[], tuple[torch.Tensor, torch.Tensor]]):
        """Weights derived from the experts' (stacked or concatenated), cached per `kind` (see
        `_cache_usable`) and rebuilt when a parameter changes (its version counter moves). Under torch.compile the
        cache built before compiling is used as is (the version check is Python-side
        bookkeeping a traced graph cannot hold)."""
        cache = self.__dict__.setdefault("_weight_cache", {})
        if not self._cache_usable():
            return build()
        if torch.compiler.is_compiling():
            return cache[kind][1] if kind in cache else build()
        params = [p for e in self.experts for p in (e.gate_proj.weight, e.up_proj.weight, e.down_proj.weight)]
        key = tuple((p.data_ptr(), p._version, p.dtype) for p in params)
        if kind not in cache or cache[kind][0] != key:
            with torch.no_grad():
                cache[kind] = (key, build())
        return cache[kind][1]

    def _cache_usable(self) -> bool:
        """Derived weights may be cached for a frozen model or under inference mode. A model
        still in training builds them per call: the fused AdamW kernel updates parameters in
        place without moving their version counters, so a cache could silently go stale."""
        frozen = not any(p.requires_grad for p in self.experts.parameters())
        if torch.compiler.is_compiling():  # inference mode cannot be queried in a trace
            return frozen
        return frozen or torch.is_inference_mode_enabled()

    def stacked_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(E, 2 * hidden, d) gate|up and (E, d, hidden) down weights of all experts, cached."""
        return self._cached("stacked", lambda: (
            torch.stack([torch.cat([e.gate_proj.weight, e.up_proj.weight]) for e in self.experts]),
            torch.stack([e.down_proj.weight for e in self.experts])))

    def _wide(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(2 * E * hidden, d) [gate of every expert; up of every expert] and (d, E * hidden) down."""
        ex = self.experts
        build = lambda: (torch.cat([e.gate_proj.weight for e in ex] + [e.up_proj.weight for e in ex]),  # noqa: E731
                         torch.cat([e.down_proj.weight for e in ex], dim=1))
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.experts.parameters()):
            return build()  # training: concatenated in the graph, so gradients reach every expert
        return self._cached("wide", build)

    def _gather(self, xf: torch.Tensor, r: RouterOutput) -> torch.Tensor:
        gu, down = self.stacked_weights()
        N, k = r.topk_idx.shape
        flat = r.topk_idx.reshape(-1)  # (N*k,)
        x = xf[:, None, :].expand(N, k, xf.shape[-1]).reshape(N * k, -1, 1)  # (N*k, d, 1)
        g, u = torch.bmm(gu[flat], x).chunk(2, dim=1)  # (N*k, hidden, 1) each
        y = torch.bmm(down[flat], F.silu(g) * u)[..., 0]  # (N*k, d)
        y = y * r.topk_weight.reshape(-1, 1).to(y.dtype)
        return y.view(N, k, -1).sum(1)

    def _plain_experts(self) -> bool:
        """True when every expert projection is a bare nn.Linear: no PEFT wrapper and no hooks
        (multi-LoRA serving), which only a call of the module itself would honour."""
        return all(type(lin) is nn.Linear and not lin._forward_hooks and not lin._forward_pre_hooks
                   for e in self.experts for lin in (e.gate_proj, e.up_proj, e.down_proj))

    def _dense(self, xf: torch.Tensor, r: RouterOutput) -> torch.Tensor:
        combine = torch.zeros_like(r.logits).scatter(1, r.topk_idx, r.topk_weight).to(xf.dtype)  # (N, E)
        if not self._plain_experts():  # adapters live in the expert modules: call each one
            y = torch.zeros_like(xf)
            for e, expert in enumerate(self.experts):
                y = y + combine[:, e : e + 1] * expert(xf)
            return y
        gu, down = self._wide()
        N, E = xf.shape[0], self.num_experts
        g, u = F.linear(xf, gu).chunk(2, dim=-1)  # (N, E * hidden) each
        h = (F.silu(g) * u).view(N, E, -1) * combine[:, :, None]
        return F.linear(h.view(N, -1), down)  # sum over experts of combine * down_e(h_e)


@contextmanager
def moe_dispatch(model: nn.Module, dispatch: str | Callable[[MoEFeedForward], str]) -> Iterator[None]:
    """Temporarily run every MoE layer of `model` with `dispatch` (a name, or a function of the
    layer giving one); the layers' own settings come back afterwards. Stacked expert weights
    of `gather` layers are built here, eagerly, so no trace (export, compile, CUDA-graph
    capture) has to."""
    moes = [m for m in model.modules() if isinstance(m, MoEFeedForward)]
    saved = [m.dispatch for m in moes]
    try:
        for m in moes:
            m.dispatch = dispatch(m) if callable(dispatch) else dispatch
            if m.dispatch in ("gather", "grouped", "auto"):
                m.stacked_weights()
            elif m.dispatch == "dense" and not torch.is_grad_enabled() and m._plain_experts():
                m._wide()
        yield
    finally:
        for m, d in zip(moes, saved):
            m.dispatch = d
