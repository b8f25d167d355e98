"""Graph branch: augmentations (pure functions), the graph encoder, the contrastive +
masked feature / edge reconstruction + CCA-SSG objective, the linear probe, neighbour
sampling, the validation-only recipe search, dynamic graphs and data cleaning. The workflow
that assembles them is `autoglm.recipes.graph_ssl`.

Names are imported on first use, so `autoglm.graph.config` (the typed config the CLI reads
at start-up) loads without torch_geometric."""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "drop_edges": "augment", "drop_nodes": "augment", "mask_features": "augment", "perturb_edges": "augment",
    "mask_edges": "augment", "sample_non_edges": "augment", "masked_edge_loss": "losses",
    "tune_graph": "tune", "TuneBudget": "tune", "evolving_graph": "dynamic", "snapshot_edges": "dynamic",
    "train_temporal": "dynamic", "compare_temporal": "dynamic",
    "GraphEncoder": "encoder", "ResidualGraphLayer": "encoder", "normalized_adjacency": "encoder",
    "info_nce": "losses", "scaled_cosine_error": "losses", "cca_ssg": "losses",
    "linear_probe": "probe", "tuned_linear_probe": "probe", "load_planetoid": "probe",
    "build_csr": "sampling", "pretrain_graph_sampled": "sampling", "sample_subgraph": "sampling",
    "AUGMENTATIONS": "config", "EncoderConfig": "config", "ViewConfig": "config", "LossConfig": "config",
    "OptimConfig": "config", "GraphSSLConfig": "config",
    "GraphSSLModel": "ssl", "GraphSSLObjective": "ssl", "pretrain_graph": "ssl",
    "ssl_probe": "experiment", "save_ssl_model": "experiment", "load_ssl_model": "experiment", "embed": "experiment",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'autoglm.graph' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
