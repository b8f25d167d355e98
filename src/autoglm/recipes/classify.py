"""The classification recipe: a sequence-classification task adapter on a frozen backbone.

The adapter is trained with the backbone frozen and saved by name under
MODEL_DIR/adapters/NAME (see `autoglm.training.task_adapters`). `autoglm adapters train`
is this recipe.

Example:
    >>> from autoglm.settings import load_config
    >>> cfg = load_config(ClassifyConfig, overrides={"model_dir": "runs/a", "name": "topic", "data": "l.jsonl"})
    >>> cfg.train.lr, cfg.train.weight_decay, cfg.pooling
    (0.01, 0.0, 'last')
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..settings import section, setting
from ..training.config import TrainConfig

__all__ = ["ClassifyConfig", "classify"]


@dataclass
class ClassifyConfig:
    model_dir: Path | None = setting(None, "model directory; the adapter goes to MODEL_DIR/adapters/NAME",
                                     argument=True, required=True)
    name: str | None = setting(None, "adapter name (letters, digits, '_' or '-')", required=True)
    data: Path | None = setting(None, "JSONL of {text, label} records", required=True)
    pooling: Literal["last", "mean"] = setting("last", "pool the last real token or the mean of the tokens")
    train: TrainConfig = section(TrainConfig, max_steps=200, seq_len=128, lr=1e-2, weight_decay=0.0,
                                 eval_every=0, save_every=0)


def classify(cfg: ClassifyConfig, progress: bool = True) -> dict[str, Any]:
    """Train and save the adapter; returns {"path", "labels", "train_accuracy", "steps"}.
    The text length is `train.seq_len` tokens (longer texts are cut)."""
    from ..rundir import RunDir
    from ..training.task_adapters import read_labeled_jsonl, save_named_adapter, train_classifier

    texts, labels = read_labeled_jsonl(cfg.data)
    run = RunDir.open(cfg.model_dir)
    model, tok = run.load()
    _, classes, stats = train_classifier(model, tok, cfg.name, texts, labels, cfg.train, pooling=cfg.pooling,
                                         max_len=cfg.train.seq_len, progress=progress)
    path = save_named_adapter(model, cfg.name, run.path, classes)
    return {"path": path, "labels": classes, **stats}
