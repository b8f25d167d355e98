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
* False negatives: both take an optional (B, B) bool `positives` (pair i, j of the batch is a
  correct match: the same caption text, or the same class). The target of row i is then
  spread evenly over its positives instead of one-hot on the diagonal, so a duplicate is not
  pushed away as a negative (`positive_targets`). The relation must be symmetric (it is for
  "same text" and "same class"). Queue entries stay negatives.
* Several processes: `gather_features` collects every rank's batch (rank order) with
  gradients flowing back to each rank's own rows (OpenCLIP's `gather_with_grad`); both losses
  then score this rank's B rows against all N = world * B columns (`img_cols`, `txt_cols`;
  this rank's own pairs at columns `offset .. offset + B`). Averaged over ranks (DDP), the
  loss and its gradients equal those of one process holding the whole global batch.

Example:
    >>> img = torch.eye(3); txt = torch.eye(3)
    >>> round(float(clip_loss(img, txt, torch.tensor(1.0))), 4)  # logits = I: -log(e / (e + 2))
    0.5514
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["clip_loss", "itc_loss", "soft_cross_entropy", "positive_targets", "gather_features", "world_info",
           "MAX_LOGIT_SCALE"]

MAX_LOGIT_SCALE = 100.0  # CLIP's clamp on exp(logit_scale): temperature never below 0.01


def world_info() -> tuple[int, int]:
    """(world size, rank) of the default process group; (1, 0) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient of the gathered tensor and hands
    each rank the slice of its own rows (what `torch.distributed.nn.all_gather` does)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        W, rank = world_info()
        parts = [torch.empty_like(x) for _ in range(W)]
        dist.all_gather(parts, x.contiguous())
        ctx.rows = (rank * len(x), (rank + 1) * len(x))
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # sum over ranks: each one's loss depends on every rank's rows
        return grad[ctx.rows[0]:ctx.rows[1]]


def gather_features(x: torch.Tensor, with_grad: bool = True) -> torch.Tensor:
    """(B, ...) on each of W ranks -> (W * B, ...) in rank order (every rank passes the same
    shape); `x` itself without a process group. with_grad: the backward sends every rank's
    gradient for a slice to the rank that owns it (summed), so each rank's encoder learns
    from the whole global batch; else a plain all_gather (momentum features, labels)."""
    W, _ = world_info()
    if W == 1:
        return x
    if with_grad:
        return _GatherWithGrad.apply(x)
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(W)]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts)


def positive_targets(positives: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """(B, N) bool (row i = item i of this batch, column j = item j of the N columns; item i is
    column offset + i, which is set here) -> (B, N) float targets, each row uniform over its
    positives (one-hot where its own pair is the only one)."""
    B = len(positives)
    pos = positives.bool().clone()
    pos[torch.arange(B, device=pos.device), offset + torch.arange(B, device=pos.device)] = True
    pos = pos.float()
    return pos / pos.sum(-1, keepdim=True)


def clip_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, positives: torch.Tensor | None = None,
              img_cols: torch.Tensor | None = None, txt_cols: torch.Tensor | None = None,
              offset: int = 0) -> torch.Tensor:
    """img (B, D), txt (B, D) (normalised here), scale () = 1 / temperature -> scalar loss.
    positives (B, N) bool, optional: item i and column j match (see the module doc).
    img_cols, txt_cols (N, D): the columns scored against (default: img, txt; every rank's
    batch when gathered), this batch's own pairs at columns offset + i."""
    img, txt = F.normalize(img.float(), dim=-1), F.normalize(txt.float(), dim=-1)
    img_c = img if img_cols is None else F.normalize(img_cols.float(), dim=-1)
    txt_c = txt if txt_cols is None else F.normalize(txt_cols.float(), dim=-1)
    s = scale.float()
    i2t, t2i = s * img @ txt_c.T, s * txt @ img_c.T  # (B, N): image i against every caption, and back
    if positives is not None:
        t = positive_targets(positives, offset)
        return (soft_cross_entropy(i2t, t) + soft_cross_entropy(t2i, t)) / 2
    target = offset + torch.arange(len(img), device=img.device)
    return (F.cross_entropy(i2t, target) + F.cross_entropy(t2i, target)) / 2


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -sum_j targets_ij log softmax(logits)_ij. Both (N, M)."""
    return -(targets * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


def itc_loss(img: torch.Tensor, txt: torch.Tensor, img_m: torch.Tensor, txt_m: torch.Tensor,
             img_queue: torch.Tensor, txt_queue: torch.Tensor, scale: torch.Tensor,
             alpha: float = 0.0, positives: torch.Tensor | None = None, offset: int = 0) -> torch.Tensor:
    """Image-text contrastive loss with momentum features and queues (ALBEF's ITC).

    img, txt (B, D): online embeddings; img_m, txt_m (N, D): the momentum encoders'
    embeddings of the batch (N = B; with several ranks, every rank's batch gathered, this
    batch's at rows offset .. offset + B; no gradient); img_queue, txt_queue (K, D): earlier
    momentum embeddings (K may be 0); scale (): 1 / temperature; alpha: weight of the
    momentum encoders' soft targets (0 = one-hot targets only). All embeddings are
    L2-normalised here. Image i's positive is column offset + i of [txt_m; txt_queue]
    (N + K columns), and symmetrically; positives (B, N) bool, optional: more positives
    among the batch's columns.
    """
    img, txt = F.normalize(img.float(), dim=-1), F.normalize(txt.float(), dim=-1)
    img_m, txt_m = F.normalize(img_m.float(), dim=-1), F.normalize(txt_m.float(), dim=-1)
    txt_all = torch.cat([txt_m, F.normalize(txt_queue.float(), dim=-1)])  # (N + K, D)
    img_all = torch.cat([img_m, F.normalize(img_queue.float(), dim=-1)])
    s = scale.float()
    sim_i2t, sim_t2i = s * img @ txt_all.T, s * txt @ img_all.T  # (B, N + K)
    B, N = len(img), len(img_m)
    # no extra positives: positive_targets still sets each row's own pair
    pos = torch.zeros(B, N, dtype=torch.bool, device=img.device) if positives is None else positives
    hard = torch.zeros_like(sim_i2t)
    hard[:, :N] = positive_targets(pos, offset)
    if alpha > 0:
        with torch.no_grad():
            own_img_m, own_txt_m = img_m[offset:offset + B], txt_m[offset:offset + B]
            soft_i2t = F.softmax(s * own_img_m @ txt_all.T, dim=-1)
            soft_t2i = F.softmax(s * own_txt_m @ img_all.T, dim=-1)
        t_i2t, t_t2i = alpha * soft_i2t + (1 - alpha) * hard, alpha * soft_t2i + (1 - alpha) * hard
    else:
        t_i2t = t_t2i = hard
    return (soft_cross_entropy(sim_i2t, t_i2t) + soft_cross_entropy(sim_t2i, t_t2i)) / 2
