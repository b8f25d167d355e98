"""Contrastive image-text losses. Pure functions; shapes in docstrings; float32 inside.

* `clip_loss`: symmetric InfoNCE over one batch (CLIP): L2-normalised embeddings, the
  (B, B) similarity matrix times the logit scale (1 / temperature), cross-entropy against
  the diagonal in both directions, averaged.
* `itc_loss`: the MoCo / ALBEF form: each online embedding is scored against the momentum
  encoders' embeddings of the batch *and* a queue of earlier momentum embeddings (more
  negatives than one batch holds); targets are the diagonal (one-hot), optionally mixed
  with soft targets from the momentum encoders' own similarities (momentum distillation:
  `alpha * softmax(momentum sims) + (1 - alpha) * one-hot`). With an empty queue, momentum
  embeddings equal to the online ones and alpha 0 it is exactly `clip_loss`.

Example:
    >>> img = torch.eye(3); txt = torch.eye(3)
    >>> round(float(clip_loss(img, txt, torch.tensor(1.0))), 4)  # logits = I: -log(e / (e + 2))
    0.5514
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["clip_loss", "itc_loss", "soft_cross_entropy", "MAX_LOGIT_SCALE"]

MAX_LOGIT_SCALE = 100.0  # CLIP's clamp on exp(logit_scale): temperature never below 0.01


def clip_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """img (B, D), txt (B, D) (normalised here), scale () = 1 / temperature -> scalar loss."""
    img, txt = F.normalize(img.float(), dim=-1), F.normalize(txt.float(), dim=-1)
    logits = scale.float() * img @ txt.T  # (B, B): row i = image i against every caption
    target = torch.arange(len(img), device=img.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -sum_j targets_ij log softmax(logits)_ij. Both (N, M)."""
    return -(targets * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


def itc_loss(img: torch.Tensor, txt: torch.Tensor, img_m: torch.Tensor, txt_m: torch.Tensor,
             img_queue: torch.Tensor, txt_queue: torch.Tensor, scale: torch.Tensor,
             alpha: float = 0.0) -> torch.Tensor:
    """Image-text contrastive loss with momentum features and queues (ALBEF's ITC).

    img, txt (B, D): online embeddings; img_m, txt_m (B, D): the momentum encoders'
    embeddings of the same batch (no gradient); img_queue, txt_queue (K, D): earlier momentum
    embeddings (K may be 0); scale (): 1 / temperature; alpha: weight of the momentum
    encoders' soft targets (0 = one-hot targets only). All embeddings are L2-normalised here.
    Image i's positive is column i of [txt_m; txt_queue] (B + K columns), and symmetrically.
    """
    img, txt = F.normalize(img.float(), dim=-1), F.normalize(txt.float(), dim=-1)
    img_m, txt_m = F.normalize(img_m.float(), dim=-1), F.normalize(txt_m.float(), dim=-1)
    txt_all = torch.cat([txt_m, F.normalize(txt_queue.float(), dim=-1)])  # (B + K, D)
    img_all = torch.cat([img_m, F.normalize(img_queue.float(), dim=-1)])
    s = scale.float()
    sim_i2t, sim_t2i = s * img @ txt_all.T, s * txt @ img_all.T  # (B, B + K)
    hard = torch.zeros_like(sim_i2t)
    hard[:, :len(img)] = torch.eye(len(img), device=img.device)
    if alpha > 0:
        with torch.no_grad():
            soft_i2t = F.softmax(s * img_m @ txt_all.T, dim=-1)
            soft_t2i = F.softmax(s * txt_m @ img_all.T, dim=-1)
        t_i2t, t_t2i = alpha * soft_i2t + (1 - alpha) * hard, alpha * soft_t2i + (1 - alpha) * hard
    else:
        t_i2t = t_t2i = hard
    return (soft_cross_entropy(sim_i2t, t_i2t) + soft_cross_entropy(sim_t2i, t_t2i)) / 2
