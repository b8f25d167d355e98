"""Autoregressive graph encoder: L residual propagation layers on a sparse adjacency.

    h_0 = x W_in
    h_l = h_{l-1} + act(norm_adj @ h_{l-1} @ W_l)          l = 1..L

`norm_adj` = D^-1/2 (A + I) D^-1/2 is a sparse CSR matrix built from `edge_index` (never a
dense N x N matrix). With `attention=True` the fixed weights are replaced by GAT-style
attention over each node's in-neighbours (softmax per target node, multi-head, heads
concatenated), still computed edge-wise. `forward_sequence` runs a dynamic graph: node
states are carried across a list of snapshots, each snapshot's update starting from the
previous snapshot's final states.

Example:
    >>> import torch
    >>> enc = GraphEncoder(in_dim=8, hidden_dim=16, num_layers=2)
    >>> x = torch.randn(5, 8); ei = torch.tensor([[0, 1, 2, 3], [1, 2, 3, 4]])
    >>> enc(x, ei).shape
    torch.Size([5, 16])
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn
from torch_geometric.utils import softmax as segment_softmax

from .config import INITS, check_encoder_options

__all__ = ["normalized_adjacency", "attention_aggregate", "EdgeAttention", "ResidualGraphLayer", "GraphEncoder",
           "input_linear"]

SPARSE_INPUT_DENSITY = 0.1  # inputs with at most this share of non-zeros take the sparse matmul


def input_linear(x: torch.Tensor, lin: nn.Linear) -> torch.Tensor:
    """`lin(x)` for the first projection of raw node features, through a sparse matmul when `x`
    is mostly zeros (bag-of-words features: Cora's are 1.3% non-zero, so the dense (N, F) x (F, D)
    product is ~98% multiplications by zero). Same value and the same gradients for `lin`'s
    parameters; on CPU with 1 thread Cora's 2708 x 1433 -> 512 projection takes ~90 ms forward
    + backward instead of ~370 ms. Dense when `x` needs a gradient, is on a GPU (dense GEMMs are
    fast there), is small, or is denser than `SPARSE_INPUT_DENSITY`."""
    if (x.requires_grad or x.device.type != "cpu" or x.dim() != 2 or x.numel() < 1 << 16
            or torch.is_autocast_enabled("cpu")):
        return lin(x)
    if int(torch.count_nonzero(x)) > SPARSE_INPUT_DENSITY * x.numel():
        return lin(x)
    with warnings.catch_warnings():  # "sparse CSR support is in beta" is noise here
        warnings.simplefilter("ignore", UserWarning)
        out = torch.sparse.mm(x.to_sparse_csr(), lin.weight.t())
    return out + lin.bias if lin.bias is not None else out


def _validate(edge_index: torch.Tensor, num_nodes: int) -> None:
    if edge_index.dim() != 2 or edge_index.shape[0] != 2:
        raise ValueError(f"edge_index must have shape (2, E), got {tuple(edge_index.shape)}")
    if edge_index.numel() and (int(edge_index.min()) < 0 or int(edge_index.max()) >= num_nodes):
        raise ValueError(f"edge_index has node ids outside [0, {num_nodes}) (min {int(edge_index.min())}, "
                         f"max {int(edge_index.max())}); clean the graph with `autoglm graph clean` first")


def _with_self_loops(edge_index: torch.Tensor, num_nodes: int,
                     edge_weight: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop existing self-loops and add one per node with weight 1. -> ((2, E'), (E',))."""
    keep = edge_index[0] != edge_index[1]
    loops = torch.arange(num_nodes, device=edge_index.device).expand(2, num_nodes)
    w = torch.ones(edge_index.shape[1], device=edge_index.device) if edge_weight is None else edge_weight.float()
    ei = torch.cat([edge_index[:, keep], loops], dim=1)
    return ei, torch.cat([w[keep], torch.ones(num_nodes, device=edge_index.device)])


def normalized_adjacency(edge_index: torch.Tensor, num_nodes: int,
                         edge_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Sparse CSR (N, N) matrix D^-1/2 (A + I) D^-1/2 with A[target, source] = weight.

    edge_index (2, E) as (source, target) rows; duplicate edges add up. Degrees are
    in-degrees (incl. the self-loop), as in PyG's `gcn_norm`; for an undirected graph
    (both directions present) this is the symmetric GCN normalisation.
    """
    _validate(edge_index, num_nodes)
    ei, w = _with_self_loops(edge_index, num_nodes, edge_weight)
    src, dst = ei
    deg = torch.zeros(num_nodes, device=ei.device).index_add_(0, dst, w)
    dinv = deg.pow(-0.5).masked_fill_(deg == 0, 0.0)
    vals = dinv[dst] * w * dinv[src]
    with warnings.catch_warnings():  # "sparse CSR support is in beta" is noise here
        warnings.simplefilter("ignore", UserWarning)
        adj = torch.sparse_coo_tensor(torch.stack([dst, src]), vals, (num_nodes, num_nodes)).coalesce()
        return adj.to_sparse_csr()


def attention_aggregate(hw: torch.Tensor, edge_index: torch.Tensor, att_src: torch.Tensor, att_dst: torch.Tensor,
                        attn_dropout: float = 0.0, training: bool = False) -> torch.Tensor:
    """GAT aggregation of already-projected features, edge-wise (no dense N x N).

    hw (N, D), edge_index (2, E) (source, target) incl. self-loops, att_src / att_dst (H, D/H)
    -> (N, D): for each head, out_i = sum_j alpha_ij hw_j over i's in-edges with
    alpha = softmax_j LeakyReLU(a_src . hw_j + a_dst . hw_i) (slope 0.2); heads concatenated.
    """
    n, d = hw.shape
    heads = att_src.shape[0]
    hh = hw.view(n, heads, d // heads)  # (N, H, C)
    src, dst = edge_index
    a_src = (hh * att_src).sum(-1)  # (N, H)
    a_dst = (hh * att_dst).sum(-1)
    score = nn.functional.leaky_relu(a_src[src] + a_dst[dst], 0.2)  # (E, H)
    alpha = segment_softmax(score, dst, num_nodes=n)  # sums to 1 over each target's in-edges
    alpha = nn.functional.dropout(alpha, attn_dropout, training)
    msg = hh[src] * alpha.unsqueeze(-1)  # (E, H, C)
    return torch.zeros_like(hh).index_add_(0, dst, msg).view(n, d)


class EdgeAttention(nn.Module):
    """The attention weights of one GAT aggregation, as a module: hw (N, D), edge_index with
    self-loops -> (N, D). Used for attention-mode input propagation and the decoder."""

    def __init__(self, dim: int, heads: int = 1, attn_dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads}) for attention")
        self.attn_dropout = attn_dropout
        self.att_src = nn.Parameter(torch.empty(heads, dim // heads))
        self.att_dst = nn.Parameter(torch.empty(heads, dim // heads))
        nn.init.xavier_uniform_(self.att_src)
        nn.init.xavier_uniform_(self.att_dst)

    def forward(self, hw: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        return attention_aggregate(hw, edge_index, self.att_src, self.att_dst, self.attn_dropout, self.training)


def _init_weight(w: torch.Tensor, init: str) -> None:
    """"torch": keep nn.Linear's default (kaiming-uniform, bound 1/sqrt(fan_in)); "glorot":
    Xavier-uniform, bound sqrt(6 / (fan_in + fan_out)), the GCN / GAT papers' and PyG's init."""
    if init == "glorot":
        nn.init.xavier_uniform_(w)
    elif init != "torch":
        raise ValueError(f"init {init!r} must be one of {INITS}")


class ResidualGraphLayer(nn.Module):
    """h -> h + act(aggregate(h) W), aggregate = norm_adj @ (or attention over in-edges);
    with `residual=False` the plain GCN / GAT layer h -> act(aggregate(h) W).

    h (N, D) -> (N, D); a plain layer may change the width (`in_dim` -> D). `act=False` leaves
    the layer linear (CCA-SSG's last layer); `init` as in `_init_weight`. With attention, D
    must divide by `heads`; each head has D/heads channels and scores
    e_ij = LeakyReLU(a_src . (W h_j) + a_dst . (W h_i)).
    """

    def __init__(self, dim: int, attention: bool = False, heads: int = 1, dropout: float = 0.0,
                 attn_dropout: float = 0.0, residual: bool = True, in_dim: int | None = None,
                 act: bool = True, init: str = "torch") -> None:
        super().__init__()
        in_dim = dim if in_dim is None else in_dim
        if residual and in_dim != dim:
            raise ValueError(f"a residual layer needs in_dim == dim (got {in_dim} -> {dim}); pass residual=False")
        self.residual = residual
        if attention and dim % heads:
            raise ValueError(f"hidden_dim ({dim}) must be divisible by heads ({heads}) for attention")
        self.attention, self.heads = attention, heads
        self.lin = nn.Linear(in_dim, dim, bias=False)
        _init_weight(self.lin.weight, init)
        self.bias = nn.Parameter(torch.zeros(dim))
        self.act = nn.PReLU() if act else nn.Identity()
        self.dropout = nn.Dropout(dropout)
        self.attn_dropout = attn_dropout
        if attention:
            self.att_src = nn.Parameter(torch.empty(heads, dim // heads))
            self.att_dst = nn.Parameter(torch.empty(heads, dim // heads))
            nn.init.xavier_uniform_(self.att_src)
            nn.init.xavier_uniform_(self.att_dst)

    def aggregate(self, h: torch.Tensor, adj: torch.Tensor | None, edge_index: torch.Tensor | None,
                  hw: torch.Tensor | None = None) -> torch.Tensor:
        """aggregate(h) W: (N, D) -> (N, D). `adj` for the fixed GCN weights, `edge_index`
        (with self-loops already added) for attention; `hw`: h W already computed (the
        encoder's first layer reading raw features, `GraphEncoder._project`)."""
        if hw is None:
            hw = self.lin(self.dropout(h))  # (N, D)
        if not self.attention:
            return adj @ hw
        return attention_aggregate(hw, edge_index, self.att_src, self.att_dst, self.attn_dropout, self.training)

    def forward(self, h: torch.Tensor, adj: torch.Tensor | None = None,
                edge_index: torch.Tensor | None = None, hw: torch.Tensor | None = None) -> torch.Tensor:
        out = self.act(self.aggregate(h, adj, edge_index, hw) + self.bias)
        return h + out if self.residual else out


class GraphEncoder(nn.Module):
    """x (N, F), edge_index (2, E) -> node embeddings (N, hidden_dim).

    `state` (N, hidden_dim), when given, is added to the input projection: this is how
    `forward_sequence` carries node states from one snapshot to the next. With
    `propagate_input=True` the input projection is smoothed once, h_0 = norm_adj @ x W_in
    (with attention: h_0 = attention-weighted mean of x_j W_in over in-neighbours, own
    attention weights), so no layer carries a node's raw features unsmoothed. With
    `residual=False` the layers drop the `h_{l-1} +` path: with propagate_input=False this is
    GraphMAE's plain L-layer GAT / GCN up to the extra linear input projection.
    `input_projection=False` drops that projection: the first layer reads x directly,
    h_1 = act(aggregate(x) W_1) (a plain layer, since x's width differs), and layers 2..L are
    as above; with residual=False this is exactly the L-layer GCN / GAT of GraphMAE and
    CCA-SSG. It matters for training, not for what the model can express: on Cora,
    CCA-SSG's recipe through the extra projection probes ~2 points lower. `state` is then
    added to h_1. `final_act=False` leaves the last layer without its activation (CCA-SSG's
    encoder; GraphMAE keeps it); `init="glorot"` initialises the weights as the GCN / GAT papers
    and PyG do (Xavier-uniform) instead of nn.Linear's default: with the CCA-SSG term on Cora
    both matter (probe ~82 -> ~84 together for the plain GCN).
    """

    def __init__(self, in_dim: int, hidden_dim: int = 256, num_layers: int = 2, attention: bool = False,
                 heads: int = 1, dropout: float = 0.0, attn_dropout: float = 0.0,
                 propagate_input: bool = False, input_dropout: float = 0.0, residual: bool = True,
                 input_projection: bool = True, final_act: bool = True, init: str = "torch") -> None:
        super().__init__()
        self.propagate_input = propagate_input
        if in_dim < 1 or hidden_dim < 1 or num_layers < 1:
            raise ValueError(f"in_dim ({in_dim}), hidden_dim ({hidden_dim}) and num_layers ({num_layers}) "
                             f"must all be >= 1")
        check_encoder_options(init, propagate_input, input_projection)
        self.in_dim, self.hidden_dim, self.attention = in_dim, hidden_dim, attention
        self.input = nn.Linear(in_dim, hidden_dim) if input_projection else None
        if self.input is not None:
            _init_weight(self.input.weight, init)
        self.input_dropout = nn.Dropout(input_dropout)  # feature dropout on x (GraphMAE's in_drop)
        self.input_attention = EdgeAttention(hidden_dim, heads, attn_dropout) if attention and propagate_input else None
        layers = []
        for i in range(num_layers):
            reads_x = i == 0 and not input_projection  # width in_dim -> hidden_dim, so never residual
            layers.append(ResidualGraphLayer(hidden_dim, attention, heads, dropout, attn_dropout,
                                             residual=residual and not reads_x, in_dim=in_dim if reads_x else None,
                                             act=final_act or i < num_layers - 1, init=init))
        self.layers = nn.ModuleList(layers)

    def prepare(self, edge_index: torch.Tensor, num_nodes: int,
                edge_weight: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The structure the layers need: (norm_adj, None) or, with attention, (None, edge_index
        with self-loops). Compute once and pass as `graph=` to reuse across calls."""
        if self.attention:
            _validate(edge_index, num_nodes)
            return None, _with_self_loops(edge_index, num_nodes, None)[0]
        return normalized_adjacency(edge_index, num_nodes, edge_weight), None

    def _project(self, x: torch.Tensor, lin: nn.Linear, dropout_p: float,
                 replace: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor | None:
        """lin(dropout(x')) of the first projection, where x' is x with the rows of `replace`'s
        mask read from its (1, F) token, computed row-wise (a linear map of a row is the map of
        that row: where(m, lin(token), lin(x))) so x itself can take the sparse matmul
        (`input_linear`). None when a dropout is active: the caller then materialises x'."""
        if self.training and (self.input_dropout.p > 0 or dropout_p > 0):
            return None
        hw = input_linear(x, lin)
        if replace is not None:
            mask, token = replace
            hw = torch.where(mask.unsqueeze(1), lin(token), hw)
        return hw

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor | None = None,
                edge_weight: torch.Tensor | None = None, state: torch.Tensor | None = None,
                graph: tuple[torch.Tensor | None, torch.Tensor | None] | None = None,
                replace: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """`replace` = (mask (N,) bool, token (1, F)): the masked rows of x read the token instead
        (the [MASK] token of masked feature reconstruction), without building that copy of x."""
        if x.dim() != 2 or x.shape[1] != self.in_dim:
            raise ValueError(f"x must be (num_nodes, {self.in_dim}), got {tuple(x.shape)}; the encoder was "
                             f"built for {self.in_dim} input features")
        if graph is None:
            if edge_index is None:
                raise ValueError("pass edge_index (2, E) or a prepared graph= from encoder.prepare(...)")
            graph = self.prepare(edge_index, x.shape[0], edge_weight)
        adj, ei = graph
        layers = list(self.layers)
        first = layers[0] if self.input is None else None  # the first layer reads x directly
        hw = self._project(x, first.lin if first else self.input, first.dropout.p if first else 0.0, replace)
        if hw is None:  # dropout on x: materialise the masked copy and run the plain layers
            if replace is not None:
                x = torch.where(replace[0].unsqueeze(1), replace[1].expand_as(x), x)
            h = self.input_dropout(x)
        if self.input is None:
            h = layers.pop(0)(None if hw is not None else h, adj, ei, hw=hw)
        else:
            h = hw if hw is not None else self.input(h)  # (N, D)
            if self.propagate_input:
                h = self.input_attention(h, ei) if self.attention else adj @ h
        if state is not None:
            if state.shape != h.shape:
                raise ValueError(f"state must be {tuple(h.shape)}, got {tuple(state.shape)}")
            h = h + state
        for layer in layers:
            h = layer(h, adj, ei)
        return h

    def forward_sequence(self, snapshots: Sequence[tuple[torch.Tensor, torch.Tensor]],
                         state: torch.Tensor | None = None, normalize_state: bool = False) -> list[torch.Tensor]:
        """Dynamic graph: snapshots [(x_t (N, F), edge_index_t (2, E_t))] over a fixed node set.
        Snapshot t starts from the final states of snapshot t-1 (or `state`); returns the
        states after every snapshot, each (N, hidden_dim). `normalize_state` layer-normalises
        (no learned scale) each state before it is carried, so its size cannot grow with the
        number of snapshots."""
        if not snapshots:
            raise ValueError("forward_sequence needs at least one (x, edge_index) snapshot")
        out = []
        for t, (x, ei) in enumerate(snapshots):
            if state is not None and x.shape[0] != state.shape[0]:
                raise ValueError(f"snapshot {t} has {x.shape[0]} nodes but the carried state has "
                                 f"{state.shape[0]}; snapshots must share one node set (pad absent nodes)")
            if state is not None and normalize_state:
                state = nn.functional.layer_norm(state, state.shape[-1:])
            state = self(x, ei, state=state)
            out.append(state)
        return out
