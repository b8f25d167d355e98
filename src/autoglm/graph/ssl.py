"""Self-supervised graph pre-training: InfoNCE between two augmented views plus masked
feature reconstruction (GraphMAE: [MASK] token, re-masking, scaled cosine error).

    loss = contrastive_weight * info_nce(proj(enc(view1)), proj(enc(view2)), tau)
         + reconstruction_weight * sce(dec(remask(enc(x with masked rows = [MASK]))), x)[masked]
         + decorrelation_weight * cca_ssg(enc(view1), enc(view2), decorrelation_lambda)
         + edge_weight * bce(edge_dec(h_u * h_v) for masked edges (1) and sampled non-edges (0)),
                         h = enc(graph without the masked edges)                       (MaskGAE)
         + degree_weight * mse(deg_dec(h), masked edges per node)

(the weights and rates are `GraphSSLConfig.loss`, the views `.views`, the encoder `.encoder`).
`GraphSSLModel` holds the parameters (encoder, [MASK] token, decoder, projector, edge and
degree decoders when their terms are on);
`GraphSSLObjective` is a training objective `(model, batch) -> {"loss", ...}` for
`autoglm.training.Trainer`, whose randomness is a pure function of (optim.seed, step) so a
run is reproducible; `pretrain_graph` runs it full-batch for `optim.epochs` steps
(`autoglm.graph.sampling.pretrain_graph_sampled`: neighbour-sampled mini-batches).

Example:
    >>> import torch
    >>> from autoglm.graph.config import EncoderConfig
    >>> cfg = GraphSSLConfig(encoder=EncoderConfig(hidden_dim=16, num_layers=1))
    >>> model = GraphSSLModel(8, cfg)
    >>> batch = {"x": torch.randn(6, 8), "edge_index": torch.tensor([[0, 1, 2], [1, 2, 3]]), "step": 0}
    >>> sorted(GraphSSLObjective(cfg)(model, batch))
    ['contrastive_loss', 'decorrelation_loss', 'loss', 'reconstruction_loss']
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .augment import drop_edges, drop_nodes, mask_edges, mask_features, perturb_edges, sample_non_edges
from .config import AUGMENTATIONS, GraphSSLConfig
from .encoder import EdgeAttention, GraphEncoder
from .losses import cca_ssg, info_nce, masked_edge_loss, scaled_cosine_error

__all__ = ["AUGMENTATIONS", "GraphSSLConfig", "GraphSSLModel", "GraphSSLObjective", "pretrain_graph",
           "ssl_train_config"]

log = logging.getLogger(__name__)


class GraphSSLModel(nn.Module):
    """Encoder + [MASK] token + decoder (one propagation to the input width: GCN weights, or
    single-head attention when the encoder uses attention) + projector."""

    def __init__(self, in_dim: int, cfg: GraphSSLConfig) -> None:
        super().__init__()
        self.cfg = cfg
        enc, hidden = cfg.encoder, cfg.encoder.hidden_dim
        self.encoder = GraphEncoder(in_dim, **dataclasses.asdict(enc))  # EncoderConfig's fields are its arguments
        self.mask_token = nn.Parameter(torch.zeros(1, in_dim))
        self.encoder_to_decoder = nn.Linear(hidden, hidden, bias=False)
        self.decoder = nn.Linear(hidden, in_dim)
        self.decoder_act = nn.PReLU()
        # without a propagation step the re-masked rows would decode to a constant
        self.decoder_attention = EdgeAttention(in_dim, 1, enc.attn_dropout) if enc.attention else None
        self.projector = nn.Sequential(nn.Linear(hidden, cfg.loss.proj_dim), nn.ELU(),
                                       nn.Linear(cfg.loss.proj_dim, hidden))
        # MaskGAE's heads, built only when their term is on (so other configs keep their init and files)
        self.edge_decoder = (nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))
                             if cfg.loss.edge_weight > 0 else None)
        self.degree_decoder = (nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))
                               if cfg.loss.degree_weight > 0 else None)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        """Embeddings for downstream use: x (N, F), edge_index (2, E) -> (N, hidden_dim)."""
        return self.encoder(x, edge_index)

    @staticmethod
    def edge_input(h: torch.Tensor) -> torch.Tensor:
        """The embeddings the edge and degree decoders read: each row layer-normalised (no learned
        scale). The CCA-SSG term keeps embeddings small (mean |h| ~0.05), so the products h_u * h_v
        of raw rows are ~1e-3 and the edge loss stayed at chance (ln 4) for tens of epochs."""
        return nn.functional.layer_norm(h, h.shape[-1:])

    def score_edges(self, h: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
        """Edge logits of node pairs from embeddings: h (N, D), pairs (2, M) -> (M,), the edge
        decoder (an MLP) on h_u * h_v of the layer-normalised rows (MaskGAE)."""
        z = self.edge_input(h)
        return self.edge_decoder(z[pairs[0]] * z[pairs[1]]).squeeze(-1)

    def reconstruct(self, x: torch.Tensor, node_mask: torch.Tensor,
                    graph: tuple[torch.Tensor | None, torch.Tensor | None],
                    replace_from: torch.Tensor | None = None) -> torch.Tensor:
        """Masked rows of x replaced by [MASK], encoded, re-masked, decoded: -> (N, F).

        `replace_from` (N,) long, optional: masked node i whose entry is >= 0 gets the
        features of node replace_from[i] instead of the [MASK] token (GraphMAE's random
        replacement); it is still re-masked and scored like every masked node."""
        tokens = node_mask
        if replace_from is not None:
            swap = node_mask & (replace_from >= 0)
            x = torch.where(swap.unsqueeze(1), x[replace_from.clamp_min(0)], x)
            tokens = node_mask & ~swap
        h = self.encoder(x, graph=graph, replace=(tokens, self.mask_token))
        rep = self.encoder_to_decoder(self.decoder_act(h)).masked_fill(node_mask.unsqueeze(1), 0.0)  # re-mask
        adj, ei = graph
        out = self.decoder(rep)
        if self.decoder_attention is not None:
            return self.decoder_attention(out, ei)
        return adj @ out


class GraphSSLObjective:
    """(model: GraphSSLModel, batch) -> {"loss", "contrastive_loss", "reconstruction_loss",
    "decorrelation_loss"}, plus "edge_loss" / "degree_loss" when those terms are on (masked
    edge reconstruction: a share `loss.edge_mask_rate` of the undirected edges is removed, the
    rest encoded, the masked edges scored against as many sampled non-edges, MaskGAE).

    batch = {"x": (N, F) float, "edge_index": (2, E) long, "step": int, optional "graph" (the
    encoder's prepared structure of edge_index)}; the step seeds this step's masks and views
    (generator seed = cfg.optim.seed * 1_000_003 + step).
    """

    unit = "nodes"  # the trainer's throughput: nodes encoded per second (a subgraph's, when sampled)

    def __init__(self, cfg: GraphSSLConfig) -> None:
        self.cfg = cfg

    @staticmethod
    def count(batch: dict[str, Any]) -> int:
        return int(batch["x"].shape[0])

    def view(self, x: torch.Tensor, edge_index: torch.Tensor, p: float, gen: torch.Generator,
             feature_p: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One augmented view: the configured augmentations applied in a fixed order, each at
        rate p (feature masking at `feature_p` when given)."""
        n = x.shape[0]
        for aug in self.cfg.views.augmentations:
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
        lc, views = self.cfg.loss, self.cfg.views
        x, edge_index = batch["x"], batch["edge_index"]
        n = x.shape[0]
        step = int(batch.get("step", 0))
        gen = torch.Generator(device=x.device).manual_seed(self.cfg.optim.seed * 1_000_003 + step)
        zero = x.new_zeros(())
        rec = con = dec = zero
        if lc.reconstruction_weight > 0:
            graph = batch.get("graph") or model.encoder.prepare(edge_index, n)
            _, node_mask = mask_features(x, lc.mask_rate, mode="node", generator=gen)
            replace_from = None
            if lc.replace_rate > 0:
                swap = torch.rand(n, generator=gen, device=x.device) < lc.replace_rate
                replace_from = torch.where(swap, torch.randint(0, n, (n,), generator=gen, device=x.device), -1)
            recon = model.reconstruct(x, node_mask, graph, replace_from)
            rec = scaled_cosine_error(recon[node_mask], x[node_mask], lc.sce_alpha)
        if lc.contrastive_weight > 0 or lc.decorrelation_weight > 0:
            fp = views.feature_p or (None, None)
            (x1, e1), (x2, e2) = (self.view(x, edge_index, p, gen, f) for p, f in zip(views.aug_p, fp))
            h1, h2 = model.encoder(x1, e1), model.encoder(x2, e2)
            if lc.decorrelation_weight > 0:
                dec = cca_ssg(h1, h2, lc.decorrelation_lambda)
            if lc.contrastive_weight > 0:
                z1, z2 = model.projector(h1), model.projector(h2)
                if n > lc.contrastive_nodes:  # O(N^2) term on a random subset of anchors
                    idx = torch.randperm(n, generator=gen, device=x.device)[:lc.contrastive_nodes]
                    z1, z2 = z1[idx], z2[idx]
                con = info_nce(z1, z2, lc.tau)
        edge = deg = zero
        if lc.edge_weight > 0 or lc.degree_weight > 0:  # drawn last: the other terms' masks stay as they were
            kept, pos = mask_edges(edge_index, n, lc.edge_mask_rate, generator=gen)
            h = model.encoder(x, kept)
            if lc.edge_weight > 0:
                neg = sample_non_edges(edge_index, n, pos.shape[1], generator=gen)
                edge = masked_edge_loss(model.score_edges(h, pos), model.score_edges(h, neg))
            if lc.degree_weight > 0:
                target = torch.bincount(pos.reshape(-1), minlength=n).float()  # masked edges at each node
                deg = nn.functional.mse_loss(model.degree_decoder(model.edge_input(h)).squeeze(-1).float(), target)
        loss = (lc.contrastive_weight * con + lc.reconstruction_weight * rec + lc.decorrelation_weight * dec
                + lc.edge_weight * edge + lc.degree_weight * deg)
        if lc.l2 > 0:
            loss = loss + 0.5 * lc.l2 * sum(p.pow(2).sum() for p in model.parameters() if p.requires_grad)
        out = {"loss": loss, "contrastive_loss": con.detach(), "reconstruction_loss": rec.detach(),
               "decorrelation_loss": dec.detach()}
        if lc.edge_weight > 0:
            out["edge_loss"] = edge.detach()
        if lc.degree_weight > 0:
            out["degree_loss"] = deg.detach()
        return out

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


def pretrain_graph(x: torch.Tensor, edge_index: torch.Tensor, cfg: GraphSSLConfig, *,
                   out_dir: str | Path | None = None, progress: bool = False, console: Any = None,
                   device: str | None = None, callbacks: Sequence[Any] = (),
                   log_every: int | None = None) -> tuple[GraphSSLModel, Any]:
    """Full-batch pre-training with `autoglm.training.Trainer`: `cfg.optim.epochs` optimizer
    steps (one per epoch) at `cfg.optim.lr` / `weight_decay`, seeded by `cfg.optim.seed`.

    x (N, F), edge_index (2, E). Returns (model in eval mode, TrainResult). With `out_dir`
    the Trainer writes metrics.jsonl and safetensors checkpoints there. `device`: None = CUDA
    when available, else CPU (the Trainer's `SingleDevice` default). `callbacks` go to the Trainer
    (`on_step(trainer, row)` runs every `log_every` epochs, default epochs // 10, and after the last).
    """
    from ..training import Trainer
    from ..training.strategy import SingleDevice

    if x.shape[0] == 0:
        raise ValueError("the graph is empty (0 nodes); nothing to pre-train on")
    opt = cfg.optim
    torch.manual_seed(opt.seed)
    model = GraphSSLModel(x.shape[1], cfg)
    strategy = SingleDevice(device)
    x, edge_index = x.to(strategy.device), edge_index.to(strategy.device)  # once, not every step
    # the fixed (un-augmented) adjacency is reused by the reconstruction branch every epoch
    graph = model.encoder.prepare(edge_index, x.shape[0])
    batch = {"x": x, "edge_index": edge_index, "graph": graph}
    tcfg = ssl_train_config(opt.epochs, opt.lr, opt.weight_decay, opt.seed, log_every, min_lr_ratio=0.1)
    trainer = Trainer(model, tcfg, train_batch=lambda i: {**batch, "step": i}, out_dir=out_dir,
                      objective=GraphSSLObjective(cfg), progress=progress, console=console,
                      strategy=strategy, callbacks=callbacks)
    result = trainer.fit()
    return model.eval(), result
