"""RMSNorm: torch's own `nn.RMSNorm` (fused where available); re-exported for one import place."""

from torch.nn import RMSNorm

__all__ = ["RMSNorm"]
