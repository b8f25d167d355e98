"""Linear probe on frozen node embeddings, and Planetoid loading from local raw files.

The probe is multinomial logistic regression (one `nn.Linear`, Adam, weight decay)
trained full-batch on the train nodes; the epoch with the best validation accuracy gives
the reported test accuracy (GraphMAE's protocol). `standardize=True` z-scores the
embeddings with label-free all-node statistics first (off by default: on Cora it lowered
the probe by 3-5 points for every encoder we tried at a fixed weight decay).
`tuned_linear_probe` grids weight decay x standardisation and keeps the setting with the
best *validation* accuracy (test accuracy never takes part in the choice).

Both also return "val_loss": the lowest validation cross-entropy the probe reached (over its
epochs, and over the grid in `tuned_linear_probe`). On 500 validation nodes the best accuracy
moves in steps of 0.2 points and often ties between different embeddings; the loss is a
continuous measure of how well a linear classifier separates the same nodes, which the
recipe search (`autoglm.graph.tune`) uses to break those ties.

Example:
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> y = torch.arange(60) % 3
    >>> emb = torch.nn.functional.one_hot(y, 3).float() + 0.1 * torch.randn(60, 3, generator=g)
    >>> masks = [(torch.arange(60) // 3) % 3 == r for r in range(3)]  # train/val/test, every class in each
    >>> linear_probe(emb, y, *masks, seed=0)["test_acc"]
    1.0
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["linear_probe", "tuned_linear_probe", "load_planetoid"]

log = logging.getLogger(__name__)


def linear_probe(emb: torch.Tensor, y: torch.Tensor, train_mask: torch.Tensor, val_mask: torch.Tensor,
                 test_mask: torch.Tensor, epochs: int = 300, lr: float = 0.01, weight_decay: float = 1e-4,
                 seed: int = 0, standardize: bool = False) -> dict[str, float]:
    """Logistic regression on frozen `emb` (N, D) with labels `y` (N,) and boolean node
    masks (N,). Returns {"train_acc", "val_acc", "test_acc", "best_epoch", "val_loss"} (accuracies
    in [0, 1]; val/test at the epoch of best validation accuracy, ties -> earliest; val_loss the
    lowest validation cross-entropy over the epochs, nats)."""
    for name, m in (("train_mask", train_mask), ("val_mask", val_mask), ("test_mask", test_mask)):
        if m.shape != y.shape or m.dtype != torch.bool:
            raise ValueError(f"{name} must be a bool tensor of shape {tuple(y.shape)}, got {m.dtype} "
                             f"{tuple(m.shape)}")
        if not bool(m.any()):
            raise ValueError(f"{name} selects no node; the probe needs labelled train/val/test nodes")
    if emb.shape[0] != y.shape[0]:
        raise ValueError(f"emb has {emb.shape[0]} rows but y has {y.shape[0]} labels")
    emb = emb.detach().float()
    mu, sd = emb.mean(0), emb.std(0).clamp_min(1e-6)
    if standardize:
        emb = (emb - mu) / sd
    num_classes = int(y.max()) + 1
    gen = torch.Generator().manual_seed(seed)
    clf = nn.Linear(emb.shape[1], num_classes)
    with torch.no_grad():
        bound = 1 / emb.shape[1] ** 0.5
        clf.weight.uniform_(-bound, bound, generator=gen)
        clf.bias.zero_()
    opt = torch.optim.Adam(clf.parameters(), lr=lr, weight_decay=weight_decay)
    best = {"val_acc": -1.0}
    val_loss = float("inf")
    for epoch in range(epochs):
        opt.zero_grad()
        nn.functional.cross_entropy(clf(emb[train_mask]), y[train_mask]).backward()
        opt.step()
        with torch.no_grad():
            logits = clf(emb)
            pred = logits.argmax(-1)
            acc = {k: float((pred[m] == y[m]).float().mean())
                   for k, m in (("train_acc", train_mask), ("val_acc", val_mask), ("test_acc", test_mask))}
            val_loss = min(val_loss, float(nn.functional.cross_entropy(logits[val_mask], y[val_mask])))
        if acc["val_acc"] > best["val_acc"]:
            best = {**acc, "best_epoch": float(epoch)}
    return {**best, "val_loss": val_loss}


def tuned_linear_probe(emb: torch.Tensor, y: torch.Tensor, train_mask: torch.Tensor, val_mask: torch.Tensor,
                       test_mask: torch.Tensor, weight_decays: Sequence[float] = (1e-4, 1e-3, 1e-2, 5e-2),
                       standardize: Sequence[bool] = (False, True), epochs: int = 300, lr: float = 0.01,
                       seed: int = 0) -> dict[str, float]:
    """`linear_probe` for every (weight_decay, standardize) pair; returns the result of the
    pair with the best validation accuracy (ties -> first in grid order), with the chosen
    "weight_decay" and "standardize" (1.0 / 0.0) added and "val_loss" the lowest validation
    cross-entropy of any pair. Selection uses val only."""
    if not weight_decays or not standardize:
        raise ValueError("weight_decays and standardize must each hold at least one value")
    best: dict[str, float] = {"val_acc": -1.0}
    val_loss = float("inf")
    for std in standardize:
        for wd in weight_decays:
            res = linear_probe(emb, y, train_mask, val_mask, test_mask, epochs=epochs, lr=lr, weight_decay=wd,
                               seed=seed, standardize=std)
            val_loss = min(val_loss, res["val_loss"])
            if res["val_acc"] > best["val_acc"]:
                best = {**res, "weight_decay": float(wd), "standardize": float(std)}
    return {**best, "val_loss": val_loss}


def load_planetoid(root: str | Path, name: str, cache_dir: str | Path) -> Any:
    """Planetoid `name` (Cora, CiteSeer, PubMed) from `root/<name>/raw/ind.<name>.*` with the
    public split, no network. The raw folder is copied to `cache_dir` first because PyG
    writes `processed/` next to `raw/`. Returns a PyG `Data` (x, edge_index, y, masks)."""
    from torch_geometric.datasets import Planetoid

    raw = Path(root) / name / "raw"
    if not raw.is_dir() or not any(raw.glob(f"ind.{name.lower()}.*")):
        raise FileNotFoundError(f"no Planetoid raw files at {raw} (expected ind.{name.lower()}.x, .y, .graph, ...); "
                                f"pass --root pointing at the folder that holds {name}/raw")
    dst = Path(cache_dir) / name / "raw"
    if not dst.is_dir():
        shutil.copytree(raw, dst)
    return Planetoid(str(cache_dir), name, split="public")[0]
