"""Graph sources that need no download: a generated stochastic block model with
class-dependent features (networkx), and loaders for Planetoid / cleaned graphs.

Example:
    >>> d = sbm_graph(num_nodes=120, num_blocks=3, num_features=16, seed=0)
    >>> d.x.shape, int(d.train_mask.sum()), int(d.y.max()) + 1
    (torch.Size([120, 16]), 30, 3)
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch_geometric.data import Data

__all__ = ["sbm_graph", "planetoid_split", "structural_features", "load_graph", "looks_like_path"]

log = logging.getLogger(__name__)


def looks_like_path(source: str) -> bool:
    """A graph source meant as a file or folder (it has a suffix or a slash), not a source name."""
    return "/" in source or os.sep in source or Path(source).suffix != ""


def planetoid_split(y: torch.Tensor, per_class: int = 20, num_val: int = 500, num_test: int = 1000,
                    seed: int = 0, pool: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Planetoid-style split: `per_class` train nodes per class, then `num_val` and
    `num_test` nodes (capped at what is left) from a seeded permutation. -> 3 bool masks (N,).
    `pool` (bool (N,)) restricts all three to those nodes, e.g. everything outside a test set
    that must stay unseen."""
    n = y.shape[0]
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen)
    if pool is not None:
        if pool.shape != (n,) or pool.dtype != torch.bool:
            raise ValueError(f"pool must be a bool mask of shape ({n},), got {tuple(pool.shape)} {pool.dtype}")
        perm = perm[pool[perm]]
    train = torch.zeros(n, dtype=torch.bool)
    for c in range(int(y.max()) + 1):
        train[perm[y[perm] == c][:per_class]] = True
    rest = perm[~train[perm]]
    val, test = torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)
    num_val = min(num_val, rest.numel() // 2)
    val[rest[:num_val]] = True
    test[rest[num_val:num_val + num_test]] = True
    return train, val, test


def sbm_graph(num_nodes: int = 1000, num_blocks: int = 5, num_features: int = 64, p_in: float = 0.02,
              p_out: float = 0.002, feature_signal: float = 0.1, seed: int = 0) -> Any:
    """Stochastic block model (networkx) with sparse bag-of-words-like binary features.

    Each block has random "topic" columns (20%); a node sets each column with probability
    0.02, plus `feature_signal` on its block's topic columns (Cora-like sparse features). Returns a PyG `Data` (x (N, F), edge_index (2, E)
    undirected, y (N,) block ids, Planetoid-style train/val/test masks with 10 per class)."""
    import networkx as nx

    if num_blocks < 1 or num_nodes < num_blocks:
        raise ValueError(f"need num_nodes ({num_nodes}) >= num_blocks ({num_blocks}) >= 1")
    if not 0 <= feature_signal <= 0.98:
        raise ValueError(f"feature_signal ({feature_signal}) must be in [0, 0.98]")
    sizes = [num_nodes // num_blocks + (i < num_nodes % num_blocks) for i in range(num_blocks)]
    probs = [[p_in if i == j else p_out for j in range(num_blocks)] for i in range(num_blocks)]
    g = nx.stochastic_block_model(sizes, probs, seed=seed)
    edges = torch.tensor(list(g.edges()), dtype=torch.long).t().reshape(2, -1)
    edge_index = torch.cat([edges, edges.flip(0)], 1)
    y = torch.repeat_interleave(torch.arange(num_blocks), torch.tensor(sizes))
    gen = torch.Generator().manual_seed(seed)
    topic = (torch.rand(num_blocks, num_features, generator=gen) < 0.2).float()  # each block's "topic words"
    x = (torch.rand(num_nodes, num_features, generator=gen) < 0.02 + feature_signal * topic[y]).float()
    train, val, test = planetoid_split(y, per_class=10, num_val=num_nodes // 4, num_test=num_nodes // 2, seed=seed)
    return Data(x=x, edge_index=edge_index, y=y, train_mask=train, val_mask=val, test_mask=test)


def structural_features(data: Any) -> torch.Tensor:
    """Features for a graph that has none: PyG's `LocalDegreeProfile` (a node's degree and the
    min / max / mean / std of its neighbours' degrees) in the undirected graph, log1p-scaled.

    >>> from torch_geometric.data import Data
    >>> structural_features(Data(edge_index=torch.tensor([[0, 1, 1, 2], [1, 0, 2, 1]]), num_nodes=3)).shape
    torch.Size([3, 5])
    """
    from torch_geometric.transforms import LocalDegreeProfile
    from torch_geometric.utils import to_undirected

    edge_index = to_undirected(data.edge_index, num_nodes=data.num_nodes)
    profile = LocalDegreeProfile()(Data(edge_index=edge_index, num_nodes=data.num_nodes)).x
    return torch.log1p(profile.float())


def load_graph(source: str, root: str | Path | None = None, cache_dir: str | Path | None = None,
               normalize_features: bool = True) -> Any:
    """`source`: "sbm" (generated), a Planetoid name ("Cora", "CiteSeer", "PubMed"; needs
    `root` with <name>/raw and a writable `cache_dir`) or a folder written by
    `autoglm graph clean`. Features are row-normalised (sum to 1) when asked, as is
    standard for Planetoid."""
    from .clean import load_clean_graph
    from .probe import load_planetoid

    if source == "sbm":
        data = sbm_graph()
    elif Path(source).is_dir() and (Path(source) / "graph.safetensors").is_file():
        data = load_clean_graph(source)
        if getattr(data, "x", None) is None:
            data.x = structural_features(data)
            log.warning("%s has no node features (no --nodes table was cleaned); using each node's local degree "
                        "profile (PyG's LocalDegreeProfile, log1p) as its 5 features", source)
            normalize_features = False  # row-normalising would erase the degree scale
    elif source in ("Cora", "CiteSeer", "PubMed"):
        if root is None or cache_dir is None:
            raise ValueError(f"Planetoid {source} needs root= (folder with {source}/raw) and a writable cache_dir=")
        data = load_planetoid(root, source, cache_dir)
    elif Path(source).is_dir():
        data = load_clean_graph(source)  # a folder without graph.safetensors: says to run `graph clean`
    elif Path(source).is_file():
        raise ValueError(f"{source} is a file; pre-training reads a folder written by `autoglm graph clean`: run "
                         f"`autoglm graph clean --out DIR --edges {source}` (with --nodes FILE for node features), "
                         f"then pass DIR (or use --dynamic, which cleans a timed edge file itself)")
    elif looks_like_path(source):
        raise FileNotFoundError(f"{source}: no such file or folder; the graph source is 'sbm', Cora/CiteSeer/PubMed "
                                f"(with --root) or a folder written by `autoglm graph clean`")
    else:
        raise ValueError(f"unknown graph source {source!r}; use 'sbm', Cora/CiteSeer/PubMed (with --root) or a "
                         f"folder written by `autoglm graph clean`")
    if normalize_features:
        data.x = data.x / data.x.sum(1, keepdim=True).clamp_min(1e-12) if bool((data.x >= 0).all()) else data.x
    return data
