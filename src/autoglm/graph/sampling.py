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

__all__ = ["build_csr", "sample_subgraph", "sampled_steps", "step_seeds", "pretrain_graph_sampled"]


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


def sampled_steps(num_nodes: int, batch_size: int, epochs: int) -> int:
    """Optimizer steps of `pretrain_graph_sampled`: ceil(num_nodes / batch_size) per epoch."""
    return epochs * -(-num_nodes // batch_size)


def step_seeds(num_nodes: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """The seed nodes (<= batch_size,) of mini-batch `step`: each epoch visits every node once,
    in a random order drawn from (seed, epoch), `batch_size` at a time (the last batch shorter)."""
    epoch, k = divmod(step, -(-num_nodes // batch_size))
    order = torch.randperm(num_nodes, generator=torch.Generator().manual_seed(seed * 7_000_003 + epoch))
    return order[k * batch_size:(k + 1) * batch_size]


def pretrain_graph_sampled(x: torch.Tensor, edge_index: torch.Tensor, cfg: Any, *, max_steps: int | None = None,
                           out_dir: str | Path | None = None, progress: bool = False, console: Any = None,
                           device: str | None = None, callbacks: Sequence[Any] = (),
                           log_every: int | None = None) -> tuple[Any, Any]:
    """Mini-batch pre-training with the shared Trainer, for graphs that do not fit full-batch.

    `cfg` is a `GraphSSLConfig` whose `optim.batch_size` is set. Every epoch visits the nodes
    in a fresh seeded order, `optim.batch_size` seed nodes per step; each step samples their
    `optim.fanouts`-hop in-neighbourhood (`sample_subgraph`) and runs `GraphSSLObjective` on
    that subgraph, so memory scales with batch_size * prod(fanouts), not with N. Steps:
    `sampled_steps(N, batch_size, optim.epochs)`; `max_steps` runs only the first ones (the
    schedule is shortened to match: for timing a fraction of an epoch). x and the graph stay
    where they are; each subgraph moves to `device` (None = CUDA when available). Returns
    (model in eval mode, TrainResult); the other arguments as in `pretrain_graph`.
    """
    from ..training import Trainer
    from ..training.strategy import SingleDevice
    from .ssl import GraphSSLModel, GraphSSLObjective, ssl_train_config

    opt = cfg.optim
    if opt.batch_size is None:
        raise ValueError("pretrain_graph_sampled needs optim.batch_size (seed nodes per step); "
                         "without it use the full-batch pretrain_graph")
    num_nodes = x.shape[0]
    if num_nodes == 0:
        raise ValueError("the graph is empty (0 nodes); nothing to pre-train on")
    steps = sampled_steps(num_nodes, opt.batch_size, opt.epochs)
    if max_steps is not None:
        if max_steps < 1:
            raise ValueError(f"max_steps ({max_steps}) must be >= 1 (or None for every step)")
        steps = min(steps, max_steps)
    csr = build_csr(edge_index, num_nodes)
    torch.manual_seed(opt.seed)
    model = GraphSSLModel(x.shape[1], cfg)

    def batch(i: int) -> dict[str, Any]:
        seeds = step_seeds(num_nodes, opt.batch_size, opt.seed, i)
        nodes, sub = sample_subgraph(csr, seeds, opt.fanouts, torch.Generator().manual_seed(opt.seed * 9_000_011 + i))
        return {"x": x[nodes], "edge_index": sub, "step": i}

    tcfg = ssl_train_config(steps, opt.lr, opt.weight_decay, opt.seed, log_every, min_lr_ratio=0.1)
    result = Trainer(model, tcfg, train_batch=batch, out_dir=out_dir, objective=GraphSSLObjective(cfg),
                     progress=progress, console=console, strategy=SingleDevice(device), callbacks=callbacks).fit()
    return model.eval(), result
