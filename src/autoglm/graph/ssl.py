"""Self-supervised graph pre-training: InfoNCE between two augmented views plus masked
feature reconstruction (GraphMAE: [MASK] token, re-masking, scaled cosine error).

    loss = contrastive_weight * info_nce(proj(enc(view1)), proj(enc(view2)), tau)
         + reconstruction_weight * sce(dec(remask(enc(x with masked rows = [MASK]))), x)[masked]
         + decorrelation_weight * cca_ssg(enc(view1), enc(view2), decorrelation_lambda)   (optional)

`GraphSSLModel` holds the parameters (encoder, [MASK] token, decoder, projector);
`GraphSSLObjective` is a training objective `(model, batch) -> {"loss", ...}` for
`autoglm.training.Trainer`, whose randomness is a pure function of (seed, step) so a run
is reproducible; `pretrain_graph` runs it full-batch.

Example:
    >>> import torch
    >>> cfg = GraphSSLConfig(hidden_dim=16, num_layers=1)
    >>> model = GraphSSLModel(8, cfg)
    >>> batch = {"x": torch.randn(6, 8), "edge_index": torch.tensor([[0, 1, 2], [1, 2, 3]]), "step": 0}
    >>> sorted(GraphSSLObjective(cfg)(model, batch))
    ['contrastive_loss', 'decorrelation_loss', 'loss', 'reconstruction_loss']
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .augment import drop_edges, drop_nodes, mask_features, perturb_edges
from .encoder import EdgeAttention, GraphEncoder, check_encoder_options
from ..graph_recipes import CORA_RECIPE, CORA_TRAINING  # noqa: F401 (re-exported)
from .losses import cca_ssg, info_nce, scaled_cosine_error

__all__ = ["AUGMENTATIONS", "CORA_RECIPE", "CORA_TRAINING", "GraphSSLConfig", "GraphSSLModel", "GraphSSLObjective",
           "pretrain_graph"]

log = logging.getLogger(__name__)

AUGMENTATIONS = ("node_drop", "edge_perturb", "edge_drop", "feature_mask")



@dataclass
class GraphSSLConfig:
    hidden_dim: int = 256  # embedding width; GraphMAE uses 512 on Cora
    num_layers: int = 2  # residual propagation layers (receptive field = num_layers hops)
    attention: bool = False  # GAT-style attention instead of fixed GCN weights
    propagate_input: bool = False  # h_0 = norm_adj @ x W_in: no unsmoothed identity path to the embedding
    residual: bool = True  # h_l = h_{l-1} + act(...); False = plain GCN/GAT layers (GraphMAE's encoder)
    input_projection: bool = True  # False: the first layer reads x directly (exact GCN / GAT of
    # GraphMAE and CCA-SSG); needs propagate_input=False
    final_act: bool = True  # False: no activation on the last layer (CCA-SSG's encoder)
    init: str = "torch"  # layer weights: "torch" (nn.Linear default) or "glorot" (GCN / GAT papers, PyG)
    heads: int = 4  # attention heads (only with attention=True)
    dropout: float = 0.2  # input dropout of every layer (regularises small graphs)
    input_dropout: float = 0.0  # dropout on the raw features before the input projection
    attn_dropout: float = 0.1  # dropout on attention coefficients
    mask_rate: float = 0.15  # fraction of nodes whose features are replaced by [MASK]
    replace_rate: float = 0.0  # of the masked nodes, this fraction gets another node's features (GraphMAE: 0.05)
    sce_alpha: float = 2.0  # scaled cosine error exponent
    tau: float = 0.5  # InfoNCE temperature (GRACE)
    proj_dim: int = 128  # projection head width for the contrastive term
    augmentations: tuple[str, ...] = ("edge_perturb", "feature_mask")  # how the two views are made
    aug_p: tuple[float, float] = (0.2, 0.3)  # strength of view 1 and view 2 (same p for every augmentation)
    feature_p: tuple[float, float] | None = None  # feature-masking rate of view 1 and 2 if it should differ
    # from aug_p (CCA-SSG on Cora: edges dropped at 0.4, feature columns masked at 0.1)
    contrastive_weight: float = 1.0  # weight of InfoNCE; 0 turns it off (pure GraphMAE)
    reconstruction_weight: float = 1.0  # weight of masked reconstruction; 0 turns it off (pure GRACE)
    decorrelation_weight: float = 0.0  # weight of CCA-SSG's view-invariance + decorrelation term on the
    # encoder outputs of the same two views (no negatives, O(N D^2)); 0 = off
    decorrelation_lambda: float = 1e-3  # CCA-SSG's lambda (decorrelation vs invariance)
    l2: float = 0.0  # coupled L2 (loss += l2/2 ||params||^2) = torch Adam's weight_decay, GraphMAE's 2e-4;
    # the Trainer's AdamW decay is decoupled (lr * wd per step, ~0 at lr 1e-3)
    contrastive_nodes: int = 4096  # InfoNCE is O(N^2): sample at most this many nodes per step
    seed: int = 0  # seeds the per-step augmentation generator

    def __post_init__(self) -> None:
        self.augmentations, self.aug_p = tuple(self.augmentations), tuple(self.aug_p)
        if self.feature_p is not None:
            self.feature_p = tuple(self.feature_p)
            if len(self.feature_p) != 2 or not all(0.0 <= p <= 1.0 for p in self.feature_p):
                raise ValueError(f"feature_p {self.feature_p} must be two probabilities (view 1, view 2) or None")
        bad = [a for a in self.augmentations if a not in AUGMENTATIONS]
        if bad:
            raise ValueError(f"unknown augmentations {bad}; choose from {list(AUGMENTATIONS)}")
        if self.l2 < 0:
            raise ValueError(f"l2 ({self.l2}) must be >= 0")
        for name in ("mask_rate", "replace_rate", "dropout", "attn_dropout", "input_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} ({getattr(self, name)}) must be in [0, 1)")
        if len(self.aug_p) != 2 or not all(0.0 <= p <= 1.0 for p in self.aug_p):
            raise ValueError(f"aug_p {self.aug_p} must be two probabilities (view 1, view 2)")
        weights = (self.contrastive_weight, self.reconstruction_weight, self.decorrelation_weight)
        if min(weights) < 0 or max(weights) == 0:
            raise ValueError("contrastive_weight, reconstruction_weight and decorrelation_weight must be >= 0 "
                             "and not all 0")
        check_encoder_options(self.init, self.propagate_input, self.input_projection)
        if self.decorrelation_lambda < 0:
            raise ValueError(f"decorrelation_lambda ({self.decorrelation_lambda}) must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class GraphSSLModel(nn.Module):
    """Encoder + [MASK] token + decoder (one propagation to the input width: GCN weights, or
    single-head attention when the encoder uses attention) + projector."""

    def __init__(self, in_dim: int, cfg: GraphSSLConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = GraphEncoder(in_dim, cfg.hidden_dim, cfg.num_layers, cfg.attention, cfg.heads,
                                    cfg.dropout, cfg.attn_dropout, cfg.propagate_input, cfg.input_dropout,
                                    cfg.residual, cfg.input_projection, cfg.final_act, cfg.init)
        self.mask_token = nn.Parameter(torch.zeros(1, in_dim))
        self.encoder_to_decoder = nn.Linear(cfg.hidden_dim, cfg.hidden_dim, bias=False)
        self.decoder = nn.Linear(cfg.hidden_dim, in_dim)
        self.decoder_act = nn.PReLU()
        # without a propagation step the re-masked rows would decode to a constant
        self.decoder_attention = EdgeAttention(in_dim, 1, cfg.attn_dropout) if cfg.attention else None
        self.projector = nn.Sequential(nn.Linear(cfg.hidden_dim, cfg.proj_dim), nn.ELU(),
                                       nn.Linear(cfg.proj_dim, cfg.hidden_dim))

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        """Embeddings for downstream use: x (N, F), edge_index (2, E) -> (N, hidden_dim)."""
        return self.encoder(x, edge_index)

    def reconstruct(self, x: torch.Tensor, node_mask: torch.Tensor,
                    graph: tuple[torch.Tensor | None, torch.Tensor | None],
                    replace_from: torch.Tensor | None = None) -> torch.Tensor:
        """Masked rows of x replaced by [MASK], encoded, re-masked, decoded: -> (N, F).

        `replace_from` (N,) long, optional: masked node i whose entry is >= 0 gets the
        features of node replace_from[i] instead of the [MASK] token (GraphMAE's random
        replacement); it is still re-masked and scored like every masked node."""
        x_in = torch.where(node_mask.unsqueeze(1), self.mask_token.expand_as(x), x)
        if replace_from is not None:
            swap = node_mask & (replace_from >= 0)
            x_in = torch.where(swap.unsqueeze(1), x[replace_from.clamp_min(0)], x_in)
        h = self.encoder(x_in, graph=graph)
        rep = self.encoder_to_decoder(self.decoder_act(h)).masked_fill(node_mask.unsqueeze(1), 0.0)  # re-mask
        adj, ei = graph
        out = self.decoder(rep)
        if self.decoder_attention is not None:
            return self.decoder_attention(out, ei)
        return adj @ out


class GraphSSLObjective:
    """(model: GraphSSLModel, batch) -> {"loss", "contrastive_loss", "reconstruction_loss",
    "decorrelation_loss"}.

    batch = {"x": (N, F) float, "edge_index": (2, E) long, "step": int}; the step seeds this
    step's masks and views (generator seed = cfg.seed * 1_000_003 + step).
    """

    def __init__(self, cfg: GraphSSLConfig) -> None:
        self.cfg = cfg

    def view(self, x: torch.Tensor, edge_index: torch.Tensor, p: float, gen: torch.Generator,
             feature_p: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One augmented view: the configured augmentations applied in a fixed order, each at
        rate p (feature masking at `feature_p` when given)."""
        n = x.shape[0]
        for aug in self.cfg.augmentations:
            if aug == "node_drop":
                edge_index, keep = drop_nodes(edge_index, n, p, generator=gen)
                x = x * keep.unsqueeze(1)  # dropped nodes lose their features too
            elif aug == "edge_drop":
                edge_index, _ = drop_edges(edge_index, p, generator=gen)
            elif aug == "edge_perturb":
                edge_index, _, _ = perturb_edges(edge_index, n, p, generator=gen)
            elif aug == "feature_mask":
                x, _ = mask_features(x, p if feature_p is None else feature_p, mode="column", generator=gen)
        return x, edge_index

    def __call__(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        x, edge_index = batch["x"], batch["edge_index"]
        n = x.shape[0]
        gen = torch.Generator(device=x.device).manual_seed(cfg.seed * 1_000_003 + int(batch.get("step", 0)))
        zero = x.new_zeros(())
        rec = con = dec = zero
        if cfg.reconstruction_weight > 0:
            graph = batch.get("graph") or model.encoder.prepare(edge_index, n)
            _, node_mask = mask_features(x, cfg.mask_rate, mode="node", generator=gen)
            replace_from = None
            if cfg.replace_rate > 0:
                swap = torch.rand(n, generator=gen, device=x.device) < cfg.replace_rate
                replace_from = torch.where(swap, torch.randint(0, n, (n,), generator=gen, device=x.device), -1)
            recon = model.reconstruct(x, node_mask, graph, replace_from)
            rec = scaled_cosine_error(recon[node_mask], x[node_mask], cfg.sce_alpha)
        if cfg.contrastive_weight > 0 or cfg.decorrelation_weight > 0:
            fp = cfg.feature_p or (None, None)
            (x1, e1), (x2, e2) = (self.view(x, edge_index, p, gen, f) for p, f in zip(cfg.aug_p, fp))
            h1, h2 = model.encoder(x1, e1), model.encoder(x2, e2)
            if cfg.decorrelation_weight > 0:
                dec = cca_ssg(h1, h2, cfg.decorrelation_lambda)
            if cfg.contrastive_weight > 0:
                z1, z2 = model.projector(h1), model.projector(h2)
                if n > cfg.contrastive_nodes:  # O(N^2) term on a random subset of anchors
                    idx = torch.randperm(n, generator=gen, device=x.device)[:cfg.contrastive_nodes]
                    z1, z2 = z1[idx], z2[idx]
                con = info_nce(z1, z2, cfg.tau)
        loss = cfg.contrastive_weight * con + cfg.reconstruction_weight * rec + cfg.decorrelation_weight * dec
        if cfg.l2 > 0:
            loss = loss + 0.5 * cfg.l2 * sum(p.pow(2).sum() for p in model.parameters() if p.requires_grad)
        return {"loss": loss, "contrastive_loss": con.detach(), "reconstruction_loss": rec.detach(),
                "decorrelation_loss": dec.detach()}

    def __repr__(self) -> str:
        return f"GraphSSLObjective({self.cfg})"


def ssl_train_config(steps: int, lr: float, weight_decay: float, seed: int, log_every: int | None = None,
                     **kw: Any):
    """The Trainer settings graph pre-training uses (one optimizer step = one batch or epoch;
    no gradient clipping, fp32, 5% warmup, Adam's betas; a metrics row every `log_every` steps,
    default steps // 10)."""
    from ..training import TrainConfig

    return TrainConfig(batch_size=1, seq_len=1, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999),
                       warmup_steps=max(1, steps // 20), max_steps=steps, eval_every=0, save_every=0,
                       log_every=log_every or max(1, steps // 10), seed=seed, grad_clip=0.0, precision="fp32",
                       **kw)


def pretrain_graph(x: torch.Tensor, edge_index: torch.Tensor, cfg: GraphSSLConfig, epochs: int = 300,
                   lr: float = 1e-3, weight_decay: float = 2e-4, out_dir: str | Path | None = None,
                   progress: bool = False, console: Any = None, device: str | None = None,
                   callbacks: Sequence[Any] = (), log_every: int | None = None) -> tuple[GraphSSLModel, Any]:
    """Full-batch pre-training with `autoglm.training.Trainer` (one optimizer step = one epoch).

    x (N, F), edge_index (2, E). Returns (model in eval mode, TrainResult). With `out_dir`
    the Trainer writes metrics.jsonl and safetensors checkpoints there. `device`: None = CUDA
    when available, else CPU (the Trainer's `SingleDevice` default). `callbacks` go to the Trainer
    (`on_step(trainer, row)` runs every `log_every` epochs, default epochs // 10, and after the last).
    """
    from ..training import Trainer
    from ..training.strategy import SingleDevice

    if x.shape[0] == 0:
        raise ValueError("the graph is empty (0 nodes); nothing to pre-train on")
    torch.manual_seed(cfg.seed)
    model = GraphSSLModel(x.shape[1], cfg)
    strategy = SingleDevice(device)
    x, edge_index = x.to(strategy.device), edge_index.to(strategy.device)  # once, not every step
    # the fixed (un-augmented) adjacency is reused by the reconstruction branch every epoch
    graph = model.encoder.prepare(edge_index, x.shape[0])
    batch = {"x": x, "edge_index": edge_index, "graph": graph}
    tcfg = ssl_train_config(epochs, lr, weight_decay, cfg.seed, log_every, min_lr_ratio=0.1)
    trainer = Trainer(model, tcfg, train_batch=lambda i: {**batch, "step": i}, out_dir=out_dir,
                      objective=GraphSSLObjective(cfg), progress=progress, console=console,
                      strategy=strategy, callbacks=callbacks)
    result = trainer.fit()
    return model.eval(), result
