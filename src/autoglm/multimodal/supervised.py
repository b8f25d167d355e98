"""The supervised reference for zero-shot accuracy: the same image encoder with a linear
classifier, trained with cross-entropy on the labels, the same augmentations, optimiser and
number of steps as the aligned model (benchmarks/alignment.py compares the two).

Example:
    >>> from autoglm.multimodal.encoders import ImageEncoderConfig
    >>> m = SupervisedImageClassifier(ImageEncoderConfig(image_size=8, patch_size=4, dim=16, layers=1, heads=2), 10)
    >>> m(torch.rand(2, 1, 8, 8)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .encoders import ImageEncoder, ImageEncoderConfig

__all__ = ["SupervisedImageClassifier", "SupervisedObjective", "accuracy"]


class SupervisedImageClassifier(nn.Module):
    """ImageEncoder -> Linear(num_classes)."""

    def __init__(self, cfg: ImageEncoderConfig, num_classes: int) -> None:
        super().__init__()
        self.image_encoder = ImageEncoder(cfg)
        self.head = nn.Linear(cfg.dim, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.image_encoder(images))


class SupervisedObjective:
    """batch = {"images", "labels"} -> cross-entropy (+ MoE aux loss); reports "accuracy"."""

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = model(batch["images"]).float()
        ce = F.cross_entropy(logits, batch["labels"])
        aux = model.image_encoder.aux_loss
        acc = (logits.argmax(-1) == batch["labels"]).float().mean()
        return {"loss": ce + aux, "ce": ce.detach(), "accuracy": acc.detach()}

    def __repr__(self) -> str:
        return "SupervisedObjective()"


@torch.no_grad()
def accuracy(model: Any, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float:
    """Percent of images classified as their label (eval mode; the mode is restored)."""
    was, dev = model.training, next(model.parameters()).device
    model.eval()
    pred = torch.cat([model(images[i:i + batch_size].to(dev)).argmax(-1).cpu()
                      for i in range(0, len(images), batch_size)])
    model.train(was)
    return 100.0 * float((pred == labels).float().mean())
