"""Graph augmentations as pure tensor functions (PyG style).

Every function takes the tensors it changes, a probability `p` (checked with
`ValueError`), a `training` flag (`training=False` returns the input unchanged, so the
same code runs in eval mode) and an optional `torch.Generator` for reproducibility. Each
returns the augmented data *and* the mask or index that says what changed, so a loss can
be restricted to the affected nodes/edges and tests can measure the rates.

Example:
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> ei = torch.tensor([[0, 1, 2, 3], [1, 2, 3, 0]])
    >>> out, keep = drop_edges(ei, p=0.5, generator=g)
    >>> out.shape[0], int(keep.sum()) == out.shape[1]
    (2, True)
    >>> drop_edges(ei, p=0.5, training=False)[0] is ei
    True
"""

from __future__ import annotations

import torch

__all__ = ["drop_nodes", "drop_edges", "perturb_edges", "mask_features", "mask_edges", "sample_non_edges"]


def _check_p(p: float, name: str = "p") -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} ({p}) must be a probability in [0, 1]; e.g. p=0.2 changes 20% of items")


def _check_edge_index(edge_index: torch.Tensor) -> None:
    if edge_index.dim() != 2 or edge_index.shape[0] != 2:
        raise ValueError(f"edge_index must have shape (2, E), got {tuple(edge_index.shape)}; "
                         f"stack (source, target) rows: torch.stack([src, dst])")


def _rand(n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=device)


def drop_nodes(edge_index: torch.Tensor, num_nodes: int, p: float = 0.2, training: bool = True,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop each node with probability `p` and every edge touching a dropped node.

    Node ids are kept (the node set is not re-indexed, so features stay aligned); a dropped
    node simply becomes isolated. edge_index (2, E) -> (edge_index (2, E'), node_mask (N,)
    bool, True = kept). Eval mode keeps everything.
    """
    _check_p(p)
    _check_edge_index(edge_index)
    if not training or p == 0.0:
        return edge_index, torch.ones(num_nodes, dtype=torch.bool, device=edge_index.device)
    node_mask = _rand(num_nodes, generator, edge_index.device) >= p
    keep = node_mask[edge_index[0]] & node_mask[edge_index[1]]
    return edge_index[:, keep], node_mask


def drop_edges(edge_index: torch.Tensor, p: float = 0.2, training: bool = True,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop each edge independently with probability `p`.

    edge_index (2, E) -> (edge_index (2, E'), edge_mask (E,) bool, True = kept).
    """
    _check_p(p)
    _check_edge_index(edge_index)
    if not training or p == 0.0:
        return edge_index, torch.ones(edge_index.shape[1], dtype=torch.bool, device=edge_index.device)
    edge_mask = _rand(edge_index.shape[1], generator, edge_index.device) >= p
    return edge_index[:, edge_mask], edge_mask


def perturb_edges(edge_index: torch.Tensor, num_nodes: int, p: float = 0.2, training: bool = True,
                  generator: torch.Generator | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Drop a fraction `p` of edges and add the same number of uniformly random ones.

    Exactly round(p * E) edges are removed (sampled without replacement) and as many
    (source, target) pairs are drawn uniformly from [0, N)^2 without self-loops, so the
    edge count is unchanged. Returns (edge_index (2, E), dropped (k,) indices into the
    input edges, added (2, k) new edges); the output is kept edges followed by `added`.
    """
    _check_p(p)
    _check_edge_index(edge_index)
    device = edge_index.device
    num_edges = edge_index.shape[1]
    k = int(round(p * num_edges)) if training else 0
    if k == 0:
        return edge_index, torch.empty(0, dtype=torch.long, device=device), edge_index.new_empty((2, 0))
    if num_nodes < 2:
        raise ValueError(f"perturb_edges needs at least 2 nodes to add edges without self-loops, got {num_nodes}")
    dropped = torch.randperm(num_edges, generator=generator, device=device)[:k]
    keep = torch.ones(num_edges, dtype=torch.bool, device=device)
    keep[dropped] = False
    src = torch.randint(0, num_nodes, (k,), generator=generator, device=device)
    # target = src + offset in [1, N) mod N: uniform over the other N-1 nodes, never a self-loop
    dst = (src + torch.randint(1, num_nodes, (k,), generator=generator, device=device)) % num_nodes
    added = torch.stack([src, dst]).to(edge_index.dtype)
    return torch.cat([edge_index[:, keep], added], dim=1), dropped.sort().values, added


def mask_features(x: torch.Tensor, p: float = 0.2, mode: str = "column", training: bool = True,
                  generator: torch.Generator | None = None, fill_value: float = 0.0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Set features to `fill_value` with probability `p`.

    mode="column": whole feature columns are masked for all nodes (GRACE), mask (F,);
    mode="element": each entry independently, mask (N, F); mode="node": whole rows (used by
    masked-feature reconstruction), mask (N,). x (N, F) -> (x', mask bool, True = masked).
    """
    _check_p(p)
    if x.dim() != 2:
        raise ValueError(f"x must be (num_nodes, num_features), got shape {tuple(x.shape)}")
    shapes = {"column": (x.shape[1],), "element": tuple(x.shape), "node": (x.shape[0],)}
    if mode not in shapes:
        raise ValueError(f"mode {mode!r} is not one of {sorted(shapes)}")
    if not training or p == 0.0:
        return x, torch.zeros(shapes[mode], dtype=torch.bool, device=x.device)
    mask = torch.rand(shapes[mode], generator=generator, device=x.device) < p
    full = {"column": mask.unsqueeze(0), "element": mask, "node": mask.unsqueeze(1)}[mode]
    return x.masked_fill(full, fill_value), mask


def _pair_keys(edge_index: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """Direction-free key min(u, v) * N + max(u, v) of every edge. (E,) long."""
    lo, hi = edge_index.min(0).values, edge_index.max(0).values
    return lo * num_nodes + hi


def mask_edges(edge_index: torch.Tensor, num_nodes: int, p: float = 0.15, training: bool = True,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask each undirected edge with probability `p` (MaskGAE's edge masking).

    Both directions of a masked pair leave the graph, so the encoder cannot read a masked edge
    back through its reverse; self-loops are never masked. edge_index (2, E) -> (kept (2, E')
    the remaining edges, masked (2, M) the masked pairs, once each as (min, max)).

    >>> ei = torch.tensor([[0, 1, 1, 2], [1, 0, 2, 1]])
    >>> kept, masked = mask_edges(ei, 3, p=0.5, generator=torch.Generator().manual_seed(1))
    >>> kept.shape[1] + 2 * masked.shape[1]
    4
    """
    _check_p(p)
    _check_edge_index(edge_index)
    if not training or p == 0.0 or edge_index.shape[1] == 0:
        return edge_index, edge_index.new_empty((2, 0))
    keys = _pair_keys(edge_index, num_nodes)
    uniq, inverse = torch.unique(keys, return_inverse=True)  # one coin per undirected pair
    hit = _rand(uniq.numel(), generator, edge_index.device) < p
    hit &= (uniq // num_nodes) != (uniq % num_nodes)  # a self-loop is not an edge to predict
    masked = torch.stack([uniq[hit] // num_nodes, uniq[hit] % num_nodes])
    return edge_index[:, ~hit[inverse]], masked


def sample_non_edges(edge_index: torch.Tensor, num_nodes: int, num: int, generator: torch.Generator | None = None,
                     rounds: int = 10) -> torch.Tensor:
    """`num` uniform random node pairs (u != v) that are not edges of `edge_index` in either
    direction: the negatives edge reconstruction and link prediction score against.
    (2, num) long; fewer only when the graph is so dense that `rounds` redraws cannot find them.

    >>> ei = torch.tensor([[0, 1], [1, 2]])
    >>> neg = sample_non_edges(ei, 4, 5, generator=torch.Generator().manual_seed(0))
    >>> neg.shape, bool((neg[0] != neg[1]).all())
    (torch.Size([2, 5]), True)
    """
    _check_edge_index(edge_index)
    if num_nodes < 2 or num <= 0:
        return edge_index.new_empty((2, 0))
    existing = torch.unique(_pair_keys(edge_index, num_nodes)) if edge_index.numel() else edge_index.new_empty(0)
    found, have = [], 0
    dev = edge_index.device
    for _ in range(rounds):
        k = 2 * (num - have) + 8
        src = torch.randint(0, num_nodes, (k,), generator=generator, device=dev)
        dst = (src + torch.randint(1, num_nodes, (k,), generator=generator, device=dev)) % num_nodes
        pairs = torch.stack([src, dst])
        ok = ~torch.isin(_pair_keys(pairs, num_nodes), existing)
        found.append(pairs[:, ok][:, :num - have])
        have += found[-1].shape[1]
        if have >= num:
            break
    return torch.cat(found, 1)
