"""Pure loss functions. Shapes in docstrings; everything upcast to float32.

Example:
    >>> import torch
    >>> logits = torch.zeros(1, 3, 5); labels = torch.tensor([[1, 2, -100]])
    >>> round(float(lm_loss(logits, labels)), 4)  # uniform over 5 classes: log(5)
    1.6094
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .modules.moe import RouterOutput

__all__ = ["IGNORE_INDEX", "lm_loss", "load_balancing_loss", "router_z_loss", "expert_load", "moe_aux_loss"]

IGNORE_INDEX = -100


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Next-token cross-entropy. logits (B, T, V), labels (B, T) already aligned with logits
    (label t is the token that follows input t); `ignore_index` positions are skipped."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=ignore_index)


def load_balancing_loss(router_logits: torch.Tensor, topk_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch Transformer auxiliary loss: E * sum_e f_e * P_e.

    router_logits (N, E); topk_idx (N, k). f_e is the fraction of the N*k token copies
    sent to expert e, P_e the mean router probability of e. Equals 1 for a perfectly
    uniform router and grows as routing collapses onto few experts.
    """
    probs = router_logits.float().softmax(-1)  # (N, E)
    counts = torch.zeros(num_experts, device=probs.device).scatter_add_(
        0, topk_idx.reshape(-1), torch.ones(topk_idx.numel(), device=probs.device))
    f = counts / topk_idx.numel()
    return num_experts * torch.sum(f * probs.mean(0))


def router_z_loss(router_logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2. router_logits (N, E)."""
    return torch.logsumexp(router_logits.float(), dim=-1).pow(2).mean()


def expert_load(topk_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Fraction of token copies per expert, (E,); sums to 1."""
    counts = torch.bincount(topk_idx.reshape(-1), minlength=num_experts).float()
    return counts / counts.sum().clamp_min(1)


def moe_aux_loss(routing: Sequence[RouterOutput], num_experts: int, aux_coef: float,
                 z_coef: float) -> torch.Tensor:
    """Weighted sum of load-balancing and z-loss, averaged over MoE layers (0 if none)."""
    if not routing:
        return torch.zeros(())
    total = sum(aux_coef * load_balancing_loss(r.logits, r.topk_idx, num_experts)
                + z_coef * router_z_loss(r.logits) for r in routing)
    return total / len(routing)
