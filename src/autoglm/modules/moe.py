"""Top-k Mixture-of-Experts FFN of gated (SwiGLU) experts.

Routing follows Mixtral: router logits in float32, softmax over all experts, keep the
top-k, renormalise their weights to sum to 1. Two dispatch paths give the same result:

* `sorted` - token copies are sorted by expert id and each expert runs once on its
             contiguous group (a loop over experts, never over tokens); only experts that
             are hit do work. Data-dependent shapes: fast in eager mode.
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

import torch
import torch.nn.functional as F
from torch import nn

from .ffn import SwiGLU

__all__ = ["MoEFeedForward", "RouterOutput", "moe_dispatch", "route", "sorted_groups"]


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


class MoEFeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, num_experts: int, top_k: int, dispatch: str = "sorted") -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.dispatch = dispatch
        self.router = nn.Linear(dim, num_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(dim, hidden) for _ in range(num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterOutput]:
        shape = x.shape
        xf = x.reshape(-1, shape[-1])  # (N, d)
        r = route(xf, self.router.weight, self.top_k)
        if self.dispatch == "dense":
            y = self._dense(xf, r)
        elif self.dispatch == "gather":
            y = self._gather(xf, r)
        else:
            y = self._sorted(xf, r)
        return y.view(shape), r

    def _sorted(self, xf: torch.Tensor, r: RouterOutput) -> torch.Tensor:
        order, token_of, counts = sorted_groups(r.topk_idx, self.num_experts)
        xs = xf[token_of]  # (N*k, d)
        outs = []
        for e, chunk in enumerate(xs.split(counts)):
            if counts[e]:
                outs.append(self.experts[e](chunk))
        ys = torch.cat(outs) * r.topk_weight.reshape(-1)[order, None].to(xf.dtype)
        return torch.zeros_like(xf).index_add_(0, token_of, ys)

    def _cached(self, kind: str, build: Callable[[], tuple[torch.Tensor, torch.Tensor]]):
        """Weights derived from the experts' (stacked or concatenated), cached per `kind` and
        rebuilt when a parameter changes (its version counter moves). Under torch.compile the
        cache built before compiling is used as is (the version check is Python-side
        bookkeeping a traced graph cannot hold)."""
        cache = self.__dict__.setdefault("_weight_cache", {})
        if torch.compiler.is_compiling() and kind in cache:
            return cache[kind][1]
        params = [p for e in self.experts for p in (e.gate_proj.weight, e.up_proj.weight, e.down_proj.weight)]
        key = tuple((p.data_ptr(), p._version, p.dtype) for p in params)
        if kind not in cache or cache[kind][0] != key:
            with torch.no_grad():
                cache[kind] = (key, build())
        return cache[kind][1]

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
            if m.dispatch == "gather":
                m.stacked_weights()
            elif m.dispatch == "dense" and not torch.is_grad_enabled() and m._plain_experts():
                m._wide()
        yield
    finally:
        for m, d in zip(moes, saved):
            m.dispatch = d
