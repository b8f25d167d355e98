"""Pre-train + linear-probe over several seeds (mean and std), and saving/loading a
pre-trained graph model as safetensors + JSON.

Example:
    >>> from autoglm.graph.datasets import sbm_graph
    >>> res = ssl_probe(sbm_graph(200, 4, 32, 0.05, 0.005), GraphSSLConfig(hidden_dim=32), seeds=[0], epochs=5)
    >>> sorted(res)
    ['config', 'epochs', 'mean', 'runs', 'seconds_per_epoch', 'split', 'std', 'val_mean']
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .probe import tuned_linear_probe
from .ssl import GraphSSLConfig, GraphSSLModel, pretrain_graph

__all__ = ["ssl_probe", "save_ssl_model", "load_ssl_model", "embed"]

log = logging.getLogger(__name__)


@torch.no_grad()
def embed(model: GraphSSLModel, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
    """Frozen embeddings (N, hidden_dim) in eval mode, computed on the model's device and
    returned on the device of `x`."""
    dev = next(model.parameters()).device
    return model.eval()(x.to(dev), edge_index.to(dev)).to(x.device)


def ssl_probe(data: Any, cfg: GraphSSLConfig, seeds: Sequence[int] = (0, 1, 2, 3, 4), epochs: int = 300,
              lr: float = 1e-3, weight_decay: float = 2e-4,
              probe_weight_decays: Sequence[float] = (1e-4, 1e-3, 1e-2, 5e-2),
              probe_standardize: Sequence[bool] = (False, True), device: str | None = None) -> dict[str, Any]:
    """For each seed: pre-train on (data.x, data.edge_index), embed, probe on data's masks
    (`tuned_linear_probe`: weight decay and standardisation chosen on the validation split).
    Returns {"mean", "std" (test accuracy in %, std over seeds), "val_mean" (validation accuracy
    in %, what configurations are compared on), "runs", "seconds_per_epoch", "config", "epochs",
    "split"}."""
    runs = []
    for seed in seeds:
        t = time.perf_counter()
        model, _ = pretrain_graph(data.x, data.edge_index, GraphSSLConfig(**{**cfg.to_dict(), "seed": seed}),
                                  epochs=epochs, lr=lr, weight_decay=weight_decay, device=device)
        dt = time.perf_counter() - t
        res = tuned_linear_probe(embed(model, data.x, data.edge_index), data.y, data.train_mask, data.val_mask,
                                 data.test_mask, probe_weight_decays, probe_standardize, seed=seed)
        runs.append({"seed": seed, "pretrain_seconds": round(dt, 2), **res})
        log.info("seed %d: test %.2f%% (val %.2f%%; probe wd %g, standardize %d), %.1f s", seed,
                 100 * res["test_acc"], 100 * res["val_acc"], res["weight_decay"], res["standardize"], dt)
    accs = [100 * r["test_acc"] for r in runs]
    split = {k: int(getattr(data, k).sum()) for k in ("train_mask", "val_mask", "test_mask")}
    return {"mean": statistics.mean(accs), "std": statistics.pstdev(accs) if len(accs) > 1 else 0.0,
            "val_mean": statistics.mean(100 * r["val_acc"] for r in runs), "runs": runs,
            "seconds_per_epoch": sum(r["pretrain_seconds"] for r in runs) / (len(runs) * epochs),
            "config": cfg.to_dict(), "epochs": epochs, "split": split}


def save_ssl_model(model: GraphSSLModel, out_dir: str | Path) -> None:
    """out_dir/model.safetensors + out_dir/graph_ssl_config.json."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    (out / "graph_ssl_config.json").write_text(json.dumps({"in_dim": model.encoder.in_dim, **model.cfg.to_dict()},
                                                          indent=1))


def load_ssl_model(out_dir: str | Path) -> GraphSSLModel:
    from safetensors.torch import load_file

    out = Path(out_dir)
    if not (out / "graph_ssl_config.json").is_file():
        raise FileNotFoundError(f"{out} holds no graph_ssl_config.json; pre-train with `autoglm graph pretrain --out {out}`")
    meta = json.loads((out / "graph_ssl_config.json").read_text())
    model = GraphSSLModel(meta.pop("in_dim"), GraphSSLConfig(**meta))
    model.load_state_dict(load_file(str(out / "model.safetensors")))
    return model.eval()
