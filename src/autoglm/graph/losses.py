"""Pure loss functions of the graph branch (float32 upcast, shapes in docstrings).

Example:
    >>> import torch
    >>> z = torch.nn.functional.normalize(torch.eye(4), dim=-1)
    >>> bool(info_nce(z, z, tau=0.5) < info_nce(z, z.roll(1, 0), tau=0.5))  # aligned views score better
    True
    >>> float(scaled_cosine_error(z, z))
    0.0
    >>> x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    >>> bool(cca_ssg(x, x + 0.1 * x.roll(1, 0)) < cca_ssg(x, x.roll(1, 0)))  # agreeing views score better
    True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["cca_ssg", "info_nce", "masked_edge_loss", "scaled_cosine_error"]


def _one_way(a: torch.Tensor, b: torch.Tensor, tau: float) -> torch.Tensor:
    """Per-node loss with anchor a_i, positive b_i, negatives b_k (inter-view) and a_k
    (intra-view), k != i. a, b (N, D) L2-normalised -> (N,)."""
    inter = a @ b.t() / tau  # (N, N) cross-view similarities; diagonal = positives
    intra = a @ a.t() / tau  # (N, N) same-view similarities; diagonal (self) excluded
    intra = intra.masked_fill(torch.eye(a.shape[0], dtype=torch.bool, device=a.device), float("-inf"))
    return torch.logsumexp(torch.cat([inter, intra], dim=1), dim=1) - inter.diagonal()


def info_nce(z1: torch.Tensor, z2: torch.Tensor, tau: float = 0.5) -> torch.Tensor:
    """GRACE's symmetric InfoNCE between two views of the same N nodes.

    z1, z2 (N, D) projections (normalised here). For anchor z1_i the positive is z2_i; the
    2N-2 negatives are every other node in both views (inter- and intra-view). Averaged
    over both directions and all nodes -> scalar. Cost O(N^2 D): for large graphs call it
    on a sampled subset of node indices.
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"z1 and z2 must both be (N, D); got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if tau <= 0:
        raise ValueError(f"tau ({tau}) must be > 0; GRACE uses 0.5")
    a, b = F.normalize(z1.float(), dim=-1), F.normalize(z2.float(), dim=-1)
    return 0.5 * (_one_way(a, b, tau) + _one_way(b, a, tau)).mean()


def scaled_cosine_error(pred: torch.Tensor, target: torch.Tensor, alpha: float = 2.0) -> torch.Tensor:
    """GraphMAE's scaled cosine error: mean_i (1 - cos(pred_i, target_i)) ** alpha.

    pred, target (M, F) -> scalar. alpha >= 1 down-weights easy (already close) nodes.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must match")
    if alpha < 1:
        raise ValueError(f"alpha ({alpha}) must be >= 1 (GraphMAE uses 1-3)")
    if pred.shape[0] == 0:
        return pred.sum() * 0.0  # nothing masked: zero loss that keeps the graph connected
    cos = F.cosine_similarity(pred.float(), target.float(), dim=-1)
    return (1 - cos).pow(alpha).mean()


def cca_ssg(z1: torch.Tensor, z2: torch.Tensor, lambd: float = 1e-3) -> torch.Tensor:
    """CCA-SSG's objective (Zhang et al., 2021) between two views of the same N nodes.

    z1, z2 (N, D) encoder outputs, each standardised per dimension over the nodes (zero
    mean, unit std). Invariance: -trace(z1^T z2 / N), i.e. minus the summed per-dimension
    correlation of the views; decorrelation: lambd * (||I - z1^T z1 / N||_F^2 +
    ||I - z2^T z2 / N||_F^2), which keeps the dimensions of each view uncorrelated so the
    embedding cannot collapse. No negatives: O(N D^2). -> scalar.
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"z1 and z2 must both be (N, D); got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if z1.shape[0] < 2:
        raise ValueError(f"cca_ssg standardises over nodes and needs at least 2, got {z1.shape[0]}")
    if lambd < 0:
        raise ValueError(f"lambd ({lambd}) must be >= 0; CCA-SSG uses 5e-4 to 1e-3")
    n = z1.shape[0]
    a = (z1.float() - z1.float().mean(0)) / z1.float().std(0).clamp_min(1e-6)
    b = (z2.float() - z2.float().mean(0)) / z2.float().std(0).clamp_min(1e-6)
    eye = torch.eye(a.shape[1], device=a.device)
    invariance = -(a * b).sum() / n  # = -trace(a^T b / N) without forming the D x D matrix
    decorrelation = (eye - a.t() @ a / n).pow(2).sum() + (eye - b.t() @ b / n).pow(2).sum()
    return invariance + lambd * decorrelation


def masked_edge_loss(pos_logits: torch.Tensor, neg_logits: torch.Tensor) -> torch.Tensor:
    """MaskGAE's edge reconstruction loss: binary cross-entropy of the masked edges' scores
    (label 1) plus that of the sampled non-edges' scores (label 0), each averaged over its own
    pairs: mean_i -log sigmoid(pos_i) + mean_j -log(1 - sigmoid(neg_j)).

    pos_logits (M,), neg_logits (K,) raw scores -> scalar. An empty side contributes 0.
    """
    pos, neg = pos_logits.float(), neg_logits.float()
    out = pos.sum() * 0.0 + neg.sum() * 0.0  # keeps both in the graph when a side is empty
    if pos.numel():
        out = out + F.binary_cross_entropy_with_logits(pos, torch.ones_like(pos))
    if neg.numel():
        out = out + F.binary_cross_entropy_with_logits(neg, torch.zeros_like(neg))
    return out
