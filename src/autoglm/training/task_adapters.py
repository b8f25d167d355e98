"""Task adapters trained on a frozen backbone, saved next to the model and loaded by name.

A model directory keeps its adapters under `<model_dir>/adapters/<name>/` (the folder
format of `autoglm.adapters.save_adapter`, plus `labels.json` with the class names).
`train_classifier` freezes every backbone parameter, registers a
`SequenceClassificationAdapter`, and trains only the head with the existing `Trainer`
and `ClassificationObjective`.

Data: JSONL of {"text": str, "label": str | int} records.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import SequenceClassificationAdapter, check_name
from .config import TrainConfig
from .loop import Trainer

__all__ = ["read_labeled_jsonl", "encode_texts", "ClassificationObjective", "train_classifier",
           "classify_accuracy", "adapters_root", "save_named_adapter", "list_saved_adapters", "load_named_adapter"]

log = logging.getLogger(__name__)


def read_labeled_jsonl(path: str | Path) -> tuple[list[str], list[str]]:
    """-> (texts, labels as strings); every line is checked before training, errors name it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; pass a JSONL file of {{\"text\", \"label\"}} records")
    texts, labels = [], []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno} is not valid JSON ({e.msg})") from e
        if not isinstance(rec, dict) or "text" not in rec or "label" not in rec:
            raise ValueError(f"{path}:{lineno} needs a \"text\" and a \"label\" field; got "
                             f"{sorted(rec) if isinstance(rec, dict) else type(rec).__name__}")
        texts.append(str(rec["text"]))
        labels.append(str(rec["label"]))
    if len(set(labels)) < 2:
        raise ValueError(f"{path} has {len(set(labels))} distinct label(s); a classifier needs at least 2")
    return texts, labels


def encode_texts(tokenizer, texts: Sequence[str], max_len: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> input_ids (N, L) right-padded with pad_id, attention_mask (N, L); texts cut to max_len tokens."""
    enc = [tokenizer(t, add_special_tokens=False).input_ids[:max_len] or [pad_id] for t in texts]
    L = max(len(e) for e in enc)
    x = torch.full((len(enc), L), pad_id, dtype=torch.long)
    m = torch.zeros((len(enc), L), dtype=torch.long)
    for i, e in enumerate(enc):
        x[i, :len(e)] = torch.tensor(e)
        m[i, :len(e)] = 1
    return x, m


class ClassificationObjective:
    """batch = {"input_ids" (B, L), "attention_mask" (B, L), "labels" (B,)} -> CE of the
    active adapter's logits (B, num_labels); reports "accuracy"."""

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = model(batch["input_ids"], attention_mask=batch["attention_mask"])
        if out.adapter_output is None:
            raise ValueError("no task adapter is active; call model.set_task_adapter(name) before training it")
        logits = out.adapter_output.float()
        loss = F.cross_entropy(logits, batch["labels"])
        acc = (logits.argmax(-1) == batch["labels"]).float().mean()
        return {"loss": loss, "accuracy": acc.detach()}

    def __repr__(self) -> str:
        return "ClassificationObjective()"


@torch.no_grad()
def classify_accuracy(model: nn.Module, x: torch.Tensor, mask: torch.Tensor, y: torch.Tensor,
                      batch_size: int = 64) -> float:
    """Fraction of rows whose argmax adapter output equals y (the active adapter)."""
    was = model.training
    model.eval()
    correct = 0
    for b in range(0, len(x), batch_size):
        logits = model(x[b:b + batch_size], attention_mask=mask[b:b + batch_size]).adapter_output
        correct += int((logits.argmax(-1) == y[b:b + batch_size]).sum())
    model.train(was)
    return correct / max(len(x), 1)


def train_classifier(model: nn.Module, tokenizer, name: str, texts: Sequence[str], labels: Sequence[str],
                     cfg: TrainConfig, pooling: str = "last", max_len: int = 128,
                     progress: bool = False) -> tuple[SequenceClassificationAdapter, list[str], dict[str, Any]]:
    """Register adapter `name` (a SequenceClassificationAdapter over the sorted label set),
    freeze the backbone and train the head on (texts, labels) with the Trainer.

    Returns (adapter, label names, {"train_accuracy", "steps"}). The backbone's weights
    are unchanged afterwards (only the adapter has requires_grad=True during training).
    """
    check_name(name)
    classes = sorted(set(labels))
    y = torch.tensor([classes.index(lab) for lab in labels])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    x, m = encode_texts(tokenizer, texts, max_len, pad)
    head = SequenceClassificationAdapter(model.config.hidden_size, len(classes), pooling=pooling)
    model.register_task_adapter(name, head)
    model.set_task_adapter(name)
    model.requires_grad_(False)
    head.requires_grad_(True)
    n = len(x)

    def batch(i: int) -> dict[str, torch.Tensor]:
        idx = torch.from_numpy(np.random.default_rng([cfg.seed, i]).integers(0, n, size=min(cfg.batch_size, n)))
        return {"input_ids": x[idx], "attention_mask": m[idx], "labels": y[idx]}

    try:
        trainer = Trainer(model, cfg, train_batch=batch, objective=ClassificationObjective(), progress=progress)
        result = trainer.fit()
    finally:
        model.requires_grad_(True)
    acc = classify_accuracy(model, x, m, y)
    log.info("adapter %s: %d steps, train accuracy %.3f", name, result.steps, acc)
    return head, classes, {"train_accuracy": acc, "steps": result.steps}


def adapters_root(model_dir: str | Path) -> Path:
    return Path(model_dir) / "adapters"


def save_named_adapter(model: nn.Module, name: str, model_dir: str | Path, labels: Sequence[str] | None = None) -> Path:
    """Save adapter `name` to <model_dir>/adapters/<name>/ (+ labels.json with the class names)."""
    path = model.save_task_adapter(name, adapters_root(model_dir) / name)
    if labels is not None:
        (path / "labels.json").write_text(json.dumps(list(labels)))
    return path


def list_saved_adapters(model_dir: str | Path) -> list[dict[str, Any]]:
    """[{"name", "type", "kwargs", "labels"}] for every saved adapter of a model directory."""
    root = adapters_root(model_dir)
    out = []
    for d in sorted(root.iterdir()) if root.is_dir() else []:
        cfg = d / "adapter_config.json"
        if d.is_dir() and cfg.is_file():
            c = json.loads(cfg.read_text())
            lab = json.loads((d / "labels.json").read_text()) if (d / "labels.json").is_file() else None
            out.append({"name": d.name, "type": c.get("type"), "kwargs": c.get("kwargs", {}), "labels": lab})
    return out


def load_named_adapter(model: nn.Module, model_dir: str | Path, name: str,
                       activate: bool = True) -> tuple[nn.Module, list[str] | None]:
    """Load <model_dir>/adapters/<name>/ into `model` under `name`; returns (adapter, labels)."""
    check_name(name)
    path = adapters_root(model_dir) / name
    if not (path / "adapter_config.json").is_file():
        have = [a["name"] for a in list_saved_adapters(model_dir)]
        raise KeyError(f"no saved adapter named {name!r} in {adapters_root(model_dir)}; saved: {have or 'none'} "
                       f"(train one with `autoglm adapters train`)")
    module = model.load_task_adapter(name, path, activate=activate)
    lab = json.loads((path / "labels.json").read_text()) if (path / "labels.json").is_file() else None
    return module, lab
