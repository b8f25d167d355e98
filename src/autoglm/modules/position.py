"""Learned absolute position embedding that extends past the trained length.

Method (documented, the one ViT/DeiT use to move a learned position table to a larger
grid): the learned table of `n` rows is treated as samples of a smooth function of the
relative position `p / (n - 1)` and linearly interpolated to `m > n` rows
(`F.interpolate(..., mode="linear", align_corners=True)`). After `resize(m)` every
position 0..m-1 has an embedding; the first and last rows are kept exactly, and the
positions in between see the learned curve stretched by `(m - 1) / (n - 1)`. Optionally
fine-tune briefly at the new length (as Position Interpolation does for RoPE).

Example:
    >>> import torch
    >>> pe = LearnedPositionEmbedding(16, 8)
    >>> pe.resize(32)
    >>> pe(torch.arange(32)[None]).shape
    torch.Size([1, 32, 8])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LearnedPositionEmbedding", "interpolate_table"]


def interpolate_table(table: torch.Tensor, new_len: int) -> torch.Tensor:
    """Linearly resample a (n, d) table to (new_len, d), keeping both ends."""
    if new_len < 2 or table.shape[0] < 2:
        raise ValueError(f"need at least 2 rows to interpolate, got {table.shape[0]} -> {new_len}")
    t = table.detach().float().t().unsqueeze(0)  # (1, d, n)
    out = F.interpolate(t, size=new_len, mode="linear", align_corners=True)
    return out.squeeze(0).t().to(table.dtype).contiguous()  # (new_len, d)


class LearnedPositionEmbedding(nn.Module):
    def __init__(self, num_positions: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_positions, dim))

    @property
    def num_positions(self) -> int:
        return self.weight.shape[0]

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        """position_ids (B, T) long -> (B, T, d)."""
        if position_ids.numel() and int(position_ids.max()) >= self.num_positions:
            raise ValueError(
                f"position {int(position_ids.max())} is beyond the position table "
                f"({self.num_positions} positions, the model's max_position_embeddings); shorten the "
                f"input or extend the context with model.extend_context(N) / --context-length N, "
                f"which interpolates the learned table")
        return F.embedding(position_ids.clamp_min(0), self.weight)

    @torch.no_grad()
    def resize(self, new_len: int) -> None:
        """Interpolate the table to `new_len` rows (see module docstring)."""
        if new_len == self.num_positions:
            return
        self.weight = nn.Parameter(interpolate_table(self.weight, new_len),
                                   requires_grad=self.weight.requires_grad)
