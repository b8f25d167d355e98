"""The graph SSL config: four typed sections, each field with its one-line *why*.

    encoder   the GNN that makes the node embeddings
    views     how the two augmented views of the graph are made
    loss      the weighted objective (CCA-SSG term + InfoNCE + masked feature and edge reconstruction)
    optim     the optimiser, the run length, the seed and the mini-batch (sampling) options

The defaults are the best-validation configuration on Cora (configs/graph-cora.yaml pins the
same values; docs/notes/graph-ssl.md has the search). Every section checks its own fields in
`__post_init__`, so a bad value fails when the config is built (by
`autoglm.settings.load_config`, which names the field by its dotted path), before any data
loads. torch-free, so the CLI can build its options from it at start-up.

Example:
    >>> from autoglm.settings import load_config
    >>> cfg = load_config(GraphSSLConfig, overrides={"encoder.hidden_dim": "64", "views.aug_p": "0.3,0.2"})
    >>> cfg.encoder.hidden_dim, cfg.views.aug_p, cfg.loss.mask_rate, cfg.optim.batch_size
    (64, (0.3, 0.2), 0.5, None)
    >>> load_config(GraphSSLConfig, overrides={"encoder.init": "zeros"})
    Traceback (most recent call last):
    ...
    autoglm.settings.ConfigError: encoder.init: must be one of 'torch', 'glorot', got 'zeros'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from ..settings import section, setting, to_dict

__all__ = ["AUGMENTATIONS", "INITS", "EncoderConfig", "ViewConfig", "LossConfig", "OptimConfig", "GraphSSLConfig",
           "check_encoder_options"]

AUGMENTATIONS = ("node_drop", "edge_perturb", "edge_drop", "feature_mask")
INITS = ("torch", "glorot")


def check_encoder_options(init: str = "torch", propagate_input: bool = False, input_projection: bool = True) -> None:
    """The encoder options that can contradict each other or be misspelt; raises ValueError.
    Run by `EncoderConfig` (when a config is built) and by `GraphEncoder` (for direct callers)."""
    if init not in INITS:
        raise ValueError(f"init {init!r} must be one of {INITS}")
    if propagate_input and not input_projection:
        raise ValueError("propagate_input smooths the input projection, so it needs input_projection=True; "
                         "or turn it off (propagate_input=False, CLI: --no-propagate-input)")


def _rate(owner: Any, *names: str) -> None:
    for name in names:
        v = getattr(owner, name)
        if not 0.0 <= v < 1.0:
            raise ValueError(f"{name} ({v}) must be in [0, 1)")


def _pair(name: str, value: Any) -> tuple[float, float]:
    value = tuple(value)
    if len(value) != 2 or not all(0.0 <= p <= 1.0 for p in value):
        raise ValueError(f"{name} {value} must be two probabilities (view 1, view 2)")
    return value


@dataclass
class EncoderConfig:
    hidden_dim: int = setting(512, "embedding width (GraphMAE and CCA-SSG use 512 on Cora)")
    num_layers: int = setting(2, "propagation layers; the receptive field is num_layers hops")
    attention: bool = setting(False, "GAT-style attention over in-neighbours instead of fixed GCN weights")
    heads: int = setting(4, "attention heads (with attention only); hidden_dim must divide by it")
    residual: bool = setting(False, "residual layers h + act(A h W); off = plain GCN / GAT layers (CCA-SSG, "
                                    "GraphMAE)")
    input_projection: bool = setting(False, "a linear input projection before the layers; off = the first layer "
                                            "reads the features (the exact GCN of CCA-SSG), needs "
                                            "propagate_input off")
    propagate_input: bool = setting(False, "smooth the input projection once (norm_adj or attention), so no "
                                           "unsmoothed identity path reaches the embedding")
    final_act: bool = setting(False, "activation on the last layer; off = a linear last layer (CCA-SSG)")
    init: Literal["torch", "glorot"] = setting("glorot", "layer weight init: torch (nn.Linear's default) or glorot "
                                                         "(Xavier-uniform, as the GCN papers and PyG)")
    dropout: float = setting(0.0, "dropout on every layer's input (0.2 did not help on Cora)")
    input_dropout: float = setting(0.0, "dropout on the raw features before the first layer (GraphMAE's in_drop)")
    attn_dropout: float = setting(0.1, "dropout on the attention coefficients (with attention only)")

    def __post_init__(self) -> None:
        for name in ("hidden_dim", "num_layers", "heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} ({getattr(self, name)}) must be >= 1")
        check_encoder_options(self.init, self.propagate_input, self.input_projection)
        if self.attention and self.hidden_dim % self.heads:
            raise ValueError(f"hidden_dim ({self.hidden_dim}) must be divisible by heads ({self.heads}) for "
                             f"attention")
        _rate(self, "dropout", "input_dropout", "attn_dropout")


@dataclass
class ViewConfig:
    augmentations: tuple[str, ...] = setting(("edge_drop", "feature_mask"), "how the two views are made, applied "
                                             "in this order: node_drop, edge_perturb, edge_drop, feature_mask; "
                                             "empty = two identical views", flag="augment")
    aug_p: tuple[float, float] = setting((0.4, 0.4), "strength of view 1, view 2: every augmentation's rate")
    feature_p: tuple[float, float] | None = setting((0.1, 0.1), "feature-masking rate of view 1, view 2 when it "
                                                                "should differ from aug_p (CCA-SSG on Cora: 0.1); "
                                                                "none = aug_p")

    def __post_init__(self) -> None:
        self.augmentations = tuple(self.augmentations)
        bad = [a for a in self.augmentations if a not in AUGMENTATIONS]
        if bad:
            raise ValueError(f"augmentations: unknown {bad}; choose from {list(AUGMENTATIONS)}")
        self.aug_p = _pair("aug_p", self.aug_p)
        if self.feature_p is not None:
            self.feature_p = _pair("feature_p", self.feature_p)


@dataclass
class LossConfig:
    contrastive_weight: float = setting(0.1, "weight of InfoNCE between the two views' projections (GRACE); "
                                             "0 = off")
    reconstruction_weight: float = setting(1.0, "weight of masked feature reconstruction (GraphMAE); 0 = off")
    decorrelation_weight: float = setting(1.0, "weight of CCA-SSG's view invariance + feature decorrelation on "
                                               "the views' embeddings (no negatives, O(N D^2)); 0 = off")
    decorrelation_lambda: float = setting(1e-3, "CCA-SSG's lambda: decorrelation vs invariance")
    mask_rate: float = setting(0.5, "fraction of nodes whose features are replaced by [MASK] and "
                                    "reconstructed (GraphMAE on Cora: 0.5)")
    replace_rate: float = setting(0.0, "of the masked nodes, the fraction fed another node's features instead "
                                       "of [MASK] (GraphMAE: 0.05)")
    sce_alpha: float = setting(3.0, "exponent of the scaled cosine error; >1 down-weights easy nodes "
                                    "(GraphMAE on Cora: 3)")
    tau: float = setting(0.5, "InfoNCE temperature (GRACE)")
    proj_dim: int = setting(128, "width of the InfoNCE projection head")
    contrastive_nodes: int = setting(1024, "InfoNCE is O(N^2): anchors sampled per step (all nodes when the "
                                           "graph is smaller)")
    l2: float = setting(0.0, "coupled L2 in the loss (l2/2 ||params||^2, torch Adam's weight_decay; "
                             "GraphMAE: 2e-4); optim.weight_decay is AdamW's decoupled one")
    edge_weight: float = setting(0.0, "weight of masked edge reconstruction (MaskGAE): BCE of the masked edges "
                                      "against sampled non-edges, scored from the graph without them; 0 = off")
    edge_mask_rate: float = setting(0.15, "fraction of (undirected) edges masked for edge reconstruction")
    degree_weight: float = setting(0.0, "weight of MaskGAE's degree reconstruction: MSE of each node's count of "
                                        "masked edges predicted from its embedding; 0 = off")

    def __post_init__(self) -> None:
        weights = (self.contrastive_weight, self.reconstruction_weight, self.decorrelation_weight, self.edge_weight,
                   self.degree_weight)
        if min(weights) < 0 or max(weights) == 0:
            raise ValueError(f"contrastive_weight, reconstruction_weight, decorrelation_weight, edge_weight and "
                             f"degree_weight {weights} must be >= 0 and not all 0")
        _rate(self, "mask_rate", "replace_rate", "edge_mask_rate")
        if (self.edge_weight > 0 or self.degree_weight > 0) and self.edge_mask_rate == 0:
            raise ValueError("edge_weight / degree_weight score masked edges, so edge_mask_rate must be > 0 "
                             "(MaskGAE: 0.15 to 0.7)")
        if self.sce_alpha < 1:
            raise ValueError(f"sce_alpha ({self.sce_alpha}) must be >= 1 (GraphMAE uses 1-3)")
        if self.tau <= 0:
            raise ValueError(f"tau ({self.tau}) must be > 0; GRACE uses 0.5")
        if self.proj_dim < 1:
            raise ValueError(f"proj_dim ({self.proj_dim}) must be >= 1")
        if self.contrastive_nodes < 2:
            raise ValueError(f"contrastive_nodes ({self.contrastive_nodes}) must be >= 2: InfoNCE needs negatives")
        for name in ("decorrelation_lambda", "l2"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} ({getattr(self, name)}) must be >= 0")


@dataclass
class OptimConfig:
    epochs: int = setting(70, "full-batch: optimizer steps, one per epoch; mini-batch: passes over the nodes "
                              "(70: the best mean validation probe across generated SBMs and Cora splits)")
    lr: float = setting(1e-3, "peak AdamW learning rate (5% warmup, then cosine to 10%)")
    weight_decay: float = setting(0.0, "AdamW's decoupled weight decay")
    seed: int = setting(0, "seeds the initialisation and every step's masks and views: a run is reproducible")
    batch_size: int | None = setting(None, "seed nodes per mini-batch step (neighbour-sampled subgraphs, for "
                                           "graphs that do not fit full-batch); none = full-batch")
    fanouts: tuple[int, ...] = setting((10, 10), "mini-batch: in-neighbours sampled per node at each hop")
    sampled: bool = setting(False, "neighbour-sampled mini-batches (for graphs that do not fit full-batch); "
                                   "batch_size defaults to 1024 seed nodes; setting batch_size turns it on")

    def __post_init__(self) -> None:
        self.fanouts = tuple(self.fanouts)
        if self.batch_size is not None:
            self.sampled = True
        elif self.sampled:
            self.batch_size = 1024
        if self.epochs < 1:
            raise ValueError(f"epochs ({self.epochs}) must be >= 1")
        if self.lr <= 0:
            raise ValueError(f"lr ({self.lr}) must be > 0")
        if self.weight_decay < 0 or self.seed < 0:
            raise ValueError(f"weight_decay ({self.weight_decay}) and seed ({self.seed}) must be >= 0")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size ({self.batch_size}) must be >= 1, or none for full-batch")
        if not self.fanouts or min(self.fanouts) < 1:
            raise ValueError(f"fanouts {self.fanouts} must be one or more positive counts, e.g. 10,10")


@dataclass
class GraphSSLConfig:
    encoder: EncoderConfig = section(EncoderConfig, "the GNN encoder")
    views: ViewConfig = section(ViewConfig, "the two augmented views")
    loss: LossConfig = section(LossConfig, "the weighted objective")
    optim: OptimConfig = section(OptimConfig, "optimiser, run length, seed, mini-batches")

    def to_dict(self) -> dict[str, Any]:
        """Plain nested JSON/YAML types; `autoglm.settings.from_dict(GraphSSLConfig, d)` reads it back."""
        return to_dict(self)

    def effective_dict(self) -> dict[str, Any]:
        """`to_dict` with the values of switched-off terms set to None: an edge mask rate without
        the edge / degree terms, the feature-mask settings without reconstruction, InfoNCE's
        settings without InfoNCE, CCA's lambda without CCA, the views without a two-view term.
        Two configs with equal effective dicts train the same model (`GraphSSLObjective` never
        reads those values nor draws random numbers for them)."""
        d = self.to_dict()
        loss = d["loss"]
        if not loss["edge_weight"] and not loss["degree_weight"]:
            loss["edge_mask_rate"] = None
        if not loss["reconstruction_weight"]:
            loss["mask_rate"] = loss["replace_rate"] = loss["sce_alpha"] = None
        if not loss["contrastive_weight"]:
            loss["tau"] = loss["contrastive_nodes"] = None
        if not loss["decorrelation_weight"]:
            loss["decorrelation_lambda"] = None
        if not loss["contrastive_weight"] and not loss["decorrelation_weight"]:
            d["views"] = None
        return d
