"""Held-out evaluation: mean next-token cross-entropy, perplexity and accuracy.

Only the language-modelling loss is measured (no MoE auxiliary loss), summed over every
labelled token and divided once at the end, so the result does not depend on how the
tokens are split into batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..losses import IGNORE_INDEX
from .strategy import autocast_context

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
             precision: str = "fp32") -> dict[str, float]:
    """Evaluate `model` on (input_ids, labels) batches, labels aligned with inputs (-100 ignored).

    Returns {"loss": mean token CE, "perplexity": exp(loss), "accuracy": fraction of
    labelled tokens whose argmax prediction equals the label, "tokens": labelled tokens}.
    The model runs in eval mode; its previous train/eval mode is restored afterwards.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    count = torch.zeros((), dtype=torch.int64, device=device)
    try:
        for input_ids, labels in batches:
            input_ids = input_ids.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            with autocast_context(precision, device):
                logits = model(input_ids).logits  # (B, T, V)
            logits = logits.float().reshape(-1, logits.shape[-1])
            flat = labels.reshape(-1)
            mask = flat != IGNORE_INDEX
            total += F.cross_entropy(logits, flat, ignore_index=IGNORE_INDEX, reduction="sum").double()
            correct += ((logits.argmax(-1) == flat) & mask).sum()
            count += mask.sum()
    finally:
        model.train(was_training)
    n = int(count)  # the one device sync
    if n == 0:
        raise ValueError("evaluation saw no labelled tokens: the batches were empty or every label was -100; "
                         "pass a non-empty validation split (e.g. a larger val fraction or smaller seq_len)")
    loss = float(total) / n
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "accuracy": int(correct) / n, "tokens": n}
