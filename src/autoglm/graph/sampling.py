"""Mini-batch neighbour sampling for graphs that do not fit full-batch (no compiled
extensions: CSR offsets + uniform draws in plain torch).

Example:
    >>> import torch
    >>> ei = torch.tensor([[1, 2, 3, 0], [0, 0, 0, 1]])   # 1, 2, 3 -> 0 and 0 -> 1
    >>> csr = build_csr(ei, 4)
    >>> nodes, sub = sample_subgraph(csr, torch.tensor([0]), fanouts=[2], generator=torch.Generator().manual_seed(0))
    >>> int(nodes[0]), sub.shape[0], bool((sub[1] == 0).all())  # the seed comes first; edges point at it
    (0, 2, True)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["build_csr", "sample_subgraph", "pretrain_graph_sampled"]


def build_csr(edge_index: torch.Tensor, num_nodes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """In-neighbour CSR: (rowptr (N+1,), col (E,)); col[rowptr[i]:rowptr[i+1]] are the sources
    of edges into i."""
    src, dst = edge_index
    order = torch.argsort(dst, stable=True)
    rowptr = torch.zeros(num_nodes + 1, dtype=torch.long)
    rowptr[1:] = torch.cumsum(torch.bincount(dst, minlength=num_nodes), 0)
    return rowptr, src[order]


def sample_subgraph(csr: tuple[torch.Tensor, torch.Tensor], seeds: torch.Tensor, fanouts: Sequence[int],
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample `fanouts[h]` in-neighbours (uniform, with replacement) of every frontier node at
    hop h, starting from `seeds`. Returns (nodes (M,) global ids, seeds first, and
    edge_index (2, E') in local ids over `nodes`, each edge a real edge of the graph)."""
    rowptr, col = csr
    n = rowptr.numel() - 1
    local = torch.full((n,), -1, dtype=torch.long)
    nodes = [seeds.unique()]
    local[nodes[0]] = torch.arange(nodes[0].numel())
    count = nodes[0].numel()
    frontier, srcs, dsts = nodes[0], [], []
    for fanout in fanouts:
        deg = rowptr[frontier + 1] - rowptr[frontier]
        f = frontier[deg > 0].repeat_interleave(fanout)
        d = deg[deg > 0].repeat_interleave(fanout)
        if f.numel() == 0:
            break
        off = (torch.rand(f.numel(), generator=generator) * d).long()
        nbr = col[rowptr[f] + off]
        new = nbr[local[nbr] < 0].unique()
        local[new] = torch.arange(count, count + new.numel())
        count += new.numel()
        nodes.append(new)
        srcs.append(nbr)
        dsts.append(f)
        frontier = new
    all_nodes = torch.cat(nodes)
    if not srcs:
        return all_nodes, torch.empty(2, 0, dtype=torch.long)
    edge_index = torch.stack([local[torch.cat(srcs)], local[torch.cat(dsts)]])
    return all_nodes, edge_index.unique(dim=1)


def pretrain_graph_sampled(x: torch.Tensor, edge_index: torch.Tensor, cfg: Any, steps: int = 100,
                           batch_size: int = 1024, fanouts: Sequence[int] = (10, 10), lr: float = 1e-3,
                           weight_decay: float = 2e-4, out_dir: str | Path | None = None) -> tuple[Any, Any]:
    """Mini-batch pre-training with the shared Trainer: each step samples `batch_size` seed
    nodes and their `fanouts`-hop neighbourhood and runs `GraphSSLObjective` on that
    subgraph. Memory scales with batch_size * prod(fanouts), not with N."""
    from ..training import Trainer
    from .ssl import GraphSSLModel, GraphSSLObjective, ssl_train_config

    num_nodes = x.shape[0]
    if num_nodes == 0:
        raise ValueError("the graph is empty (0 nodes); nothing to pre-train on")
    csr = build_csr(edge_index, num_nodes)
    torch.manual_seed(cfg.seed)
    model = GraphSSLModel(x.shape[1], cfg)

    def batch(i: int) -> dict[str, Any]:
        gen = torch.Generator().manual_seed(cfg.seed * 7_000_003 + i)
        seeds = torch.randint(0, num_nodes, (min(batch_size, num_nodes),), generator=gen)
        nodes, sub = sample_subgraph(csr, seeds, fanouts, gen)
        return {"x": x[nodes], "edge_index": sub, "step": i}

    result = Trainer(model, ssl_train_config(steps, lr, weight_decay, cfg.seed), train_batch=batch, out_dir=out_dir,
                     objective=GraphSSLObjective(cfg), progress=False).fit()
    return model.eval(), result
