"""Pre-train + linear-probe over several seeds (mean and std), and saving/loading a
pre-trained graph model as safetensors + JSON.

Example:
    >>> from autoglm.graph.datasets import sbm_graph
    >>> from autoglm.settings import load_config
    >>> cfg = load_config(GraphSSLConfig, overrides={"encoder.hidden_dim": 32, "optim.epochs": 5})
    >>> res = ssl_probe(sbm_graph(200, 4, 32, 0.05, 0.005), cfg, seeds=[0], probe_weight_decays=[1e-3])
    >>> sorted(res)
    ['config', 'curve', 'epochs', 'mean', 'runs', 'seconds_per_epoch', 'seeds', 'split', 'std', 'val_mean']
"""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_files
from ..settings import ConfigError, from_dict, leaves
from .probe import tuned_linear_probe
from .sampling import pretrain_graph_sampled
from .ssl import GraphSSLConfig, GraphSSLModel, pretrain_graph

__all__ = ["ProbeCurve", "curve_rows", "probe_model", "pretrain", "with_seed", "ssl_probe", "save_ssl_model",
           "load_ssl_model", "embed"]

log = logging.getLogger(__name__)


@torch.no_grad()
def embed(model: GraphSSLModel, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
    """Frozen embeddings (N, hidden_dim) in eval mode, computed on the model's device and
    returned on the device of `x`."""
    dev = next(model.parameters()).device
    return model.eval()(x.to(dev), edge_index.to(dev)).to(x.device)


def probe_model(model: GraphSSLModel, data: Any, seed: int = 0, **probe_kw: Any) -> dict[str, float]:
    """`tuned_linear_probe` on the frozen embeddings of `model` over data's labels and masks."""
    return tuned_linear_probe(embed(model, data.x, data.edge_index), data.y, data.train_mask, data.val_mask,
                              data.test_mask, seed=seed, **probe_kw)


class ProbeCurve:
    """Trainer callback: every `every` epochs (and after the last) probes the current encoder's
    frozen embeddings like `ssl_probe` does and appends {"epoch", "val_acc", "test_acc",
    "val_loss"} to `points`; `final` keeps the whole probe result of the last epoch. A
    diagnostic (how accuracy evolves during pre-training); its probe time is not counted as
    pre-training time by `ssl_probe`."""

    def __init__(self, data: Any, every: int, seed: int, probe_kw: dict[str, Any]) -> None:
        if every < 1:
            raise ValueError(f"probe every {every} epochs: must be >= 1")
        self.data, self.every, self.seed, self.probe_kw = data, every, seed, probe_kw
        self.points: list[dict[str, float]] = []
        self.final: dict[str, float] | None = None
        self.seconds = 0.0

    def on_step(self, trainer: Any, row: dict[str, float]) -> None:
        step = int(row["step"])
        last = step == trainer.cfg.max_steps
        if step % self.every and not last:
            return
        t = time.perf_counter()
        model = trainer.strategy.unwrap(trainer.model)
        with torch.random.fork_rng(devices=[]):  # the probe's nn.Linear must not shift training's CPU RNG
            res = probe_model(model, self.data, self.seed, **self.probe_kw)
        model.train()  # embed() switched to eval mode
        self.points.append({"epoch": step, "val_acc": res["val_acc"], "test_acc": res["test_acc"],
                            "val_loss": res["val_loss"]})
        if last:
            self.final = res
        self.seconds += time.perf_counter() - t


def curve_rows(curve: list[dict[str, float]]) -> list[tuple[str, str, str]]:
    """`ssl_probe`'s "curve" as display rows: (epoch, "val mean +/- std", "test mean +/- std")."""
    return [(str(c["epoch"]), f"{c['val_acc_mean']:.2f} +/- {c['val_acc_std']:.2f}",
             f"{c['test_acc_mean']:.2f} +/- {c['test_acc_std']:.2f}") for c in curve]


def _mean_curve(runs: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Per-epoch mean and population std (in %) over the seeds' probe curves."""
    by_epoch: dict[int, list[dict[str, float]]] = {}
    for r in runs:
        for p in r.get("curve", []):
            by_epoch.setdefault(int(p["epoch"]), []).append(p)
    out = []
    for epoch, pts in sorted(by_epoch.items()):
        row: dict[str, float] = {"epoch": epoch, "seeds": len(pts)}
        for k in ("val_acc", "test_acc"):
            vals = [100 * p[k] for p in pts]
            row[f"{k}_mean"] = statistics.mean(vals)
            row[f"{k}_std"] = statistics.pstdev(vals) if len(vals) > 1 else 0.0
        out.append(row)
    return out


def pretrain(x: torch.Tensor, edge_index: torch.Tensor, cfg: GraphSSLConfig, **kw: Any) -> tuple[GraphSSLModel, Any]:
    """`pretrain_graph` (full-batch), or `pretrain_graph_sampled` when `cfg.optim.sampled` (CLI:
    --sampled) or `cfg.optim.batch_size` is set."""
    train = pretrain_graph_sampled if cfg.optim.sampled else pretrain_graph
    return train(x, edge_index, cfg, **kw)


def with_seed(cfg: GraphSSLConfig, seed: int) -> GraphSSLConfig:
    """A copy of `cfg` with `optim.seed = seed`."""
    return dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, seed=seed))


def ssl_probe(data: Any, cfg: GraphSSLConfig, seeds: Sequence[int] = (0, 1, 2, 3, 4),
              probe_weight_decays: Sequence[float] = (1e-4, 1e-3, 1e-2, 5e-2),
              probe_standardize: Sequence[bool] = (False, True), device: str | None = None,
              probe_every: int = 0) -> dict[str, Any]:
    """For each seed: pre-train `cfg` (its `optim.seed` replaced by the seed) on (data.x,
    data.edge_index), embed, probe on data's masks (`tuned_linear_probe`: weight decay and
    standardisation chosen on the validation split). Returns {"mean", "std" (test accuracy in %,
    std over seeds), "val_mean" (validation accuracy in %, what configurations are compared on),
    "runs", "seeds", "seconds_per_epoch", "config", "epochs", "split" (train/val/test node
    counts), "curve"}. With `probe_every` N > 0 the encoder is also probed every N epochs (steps,
    with mini-batches) while it trains (`ProbeCurve`): each run gets its "curve" and "curve"
    holds the per-epoch mean / std over seeds (empty without). The reported accuracy is always
    the final model's."""
    runs = []
    probe_kw = {"weight_decays": probe_weight_decays, "standardize": probe_standardize}
    for seed in seeds:
        curve = [ProbeCurve(data, probe_every, seed, probe_kw)] if probe_every else []
        t = time.perf_counter()
        model, _ = pretrain(data.x, data.edge_index, with_seed(cfg, seed), device=device, callbacks=curve,
                            log_every=probe_every or None)
        dt = time.perf_counter() - t - sum(c.seconds for c in curve)
        # the curve's last point already probed this model
        res = curve[0].final if curve else probe_model(model, data, seed, **probe_kw)
        runs.append({"seed": seed, "pretrain_seconds": round(dt, 2), **res,
                     **({"curve": curve[0].points} if curve else {})})
        log.info("seed %d: test %.2f%% (val %.2f%%; probe wd %g, standardize %d), %.1f s", seed,
                 100 * res["test_acc"], 100 * res["val_acc"], res["weight_decay"], res["standardize"], dt)
    accs = [100 * r["test_acc"] for r in runs]
    split = {k: int(getattr(data, k).sum()) for k in ("train_mask", "val_mask", "test_mask")}
    epochs = cfg.optim.epochs
    return {"mean": statistics.mean(accs), "std": statistics.pstdev(accs) if len(accs) > 1 else 0.0,
            "val_mean": statistics.mean(100 * r["val_acc"] for r in runs), "runs": runs, "seeds": list(seeds),
            "seconds_per_epoch": sum(r["pretrain_seconds"] for r in runs) / (len(runs) * epochs),
            "config": cfg.to_dict(), "epochs": epochs, "split": split, "curve": _mean_curve(runs)}


def save_ssl_model(model: GraphSSLModel, out_dir: str | Path) -> None:
    """out_dir/model.safetensors + out_dir/graph_ssl_config.json ({"in_dim", **nested config}),
    each landing by atomic rename (an interrupted save keeps the previous model)."""
    from safetensors.torch import save_file

    with atomic_files(out_dir) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
        (tmp / "graph_ssl_config.json").write_text(json.dumps({"in_dim": model.encoder.in_dim,
                                                               **model.cfg.to_dict()}, indent=1))


def _nested(meta: dict[str, Any]) -> dict[str, Any]:
    """A graph_ssl_config.json written before the config had sections (flat field names) in
    today's nested layout; a nested one unchanged."""
    sections = {f.name for f in dataclasses.fields(GraphSSLConfig)}
    if set(meta) <= sections:
        return meta
    where = {leaf.path.rsplit(".", 1)[-1]: leaf.path.split(".")[0] for leaf in leaves(GraphSSLConfig)}
    out: dict[str, Any] = {}
    for k, v in meta.items():
        out.setdefault(where.get(k, k), {})[k] = v
    return out


def load_ssl_model(out_dir: str | Path) -> GraphSSLModel:
    """The model `save_ssl_model` wrote (in eval mode); FileNotFoundError naming what is missing."""
    from safetensors.torch import load_file

    from ..rundir import RunDir

    run = RunDir.open(out_dir, "graph")
    meta = json.loads((run.path / "graph_ssl_config.json").read_text())
    in_dim = meta.pop("in_dim")
    try:
        cfg = from_dict(GraphSSLConfig, _nested(meta))
    except ConfigError as e:
        raise ValueError(f"{run.path / 'graph_ssl_config.json'}: {e}; the file is damaged or from another "
                         f"version") from None
    model = GraphSSLModel(in_dim, cfg)
    model.load_state_dict(load_file(str(run.path / "model.safetensors")))
    return model.eval()
