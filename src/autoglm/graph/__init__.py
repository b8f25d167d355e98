"""Graph branch: augmentations (pure functions), the autoregressive graph encoder, the
contrastive + masked-reconstruction objective, the linear probe and data cleaning."""

from .augment import drop_edges, drop_nodes, mask_features, perturb_edges
from .encoder import GraphEncoder, ResidualGraphLayer, normalized_adjacency
from .losses import info_nce, scaled_cosine_error
from .probe import linear_probe, load_planetoid
from .sampling import build_csr, pretrain_graph_sampled, sample_subgraph
from .ssl import AUGMENTATIONS, GraphSSLConfig, GraphSSLModel, GraphSSLObjective, pretrain_graph

__all__ = ["drop_edges", "drop_nodes", "mask_features", "perturb_edges", "GraphEncoder", "ResidualGraphLayer",
           "normalized_adjacency", "info_nce", "scaled_cosine_error", "linear_probe", "load_planetoid",
           "build_csr", "pretrain_graph_sampled", "sample_subgraph", "AUGMENTATIONS", "GraphSSLConfig", "GraphSSLModel", "GraphSSLObjective", "pretrain_graph"]
