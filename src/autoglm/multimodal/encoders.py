"""The two towers of the aligned model: a small ViT-style image encoder built from the
project's own transformer blocks, and the Open-AutoGLM text backbone with pooling.

Image encoder: non-overlapping patches (a strided convolution) -> a learned [CLS] token
and learned patch positions -> `DecoderBlock`s (RMSNorm, grouped-query attention, SwiGLU or
MoE feed-forward) -> final norm -> the [CLS] state. The blocks are the language model's;
they are made bidirectional by the attention metadata alone: every query and key gets
position 0, so the causal rule "key position <= query position" admits every pair (the
dense kernel with an all-true mask). With `position="absolute"` the attention itself adds
no positional signal; the patch positions are the encoder's own table.

Text encoder: the backbone of a causal LM (`AutoGLMBackbone`, no LM head) over a padded
caption batch, pooled by the last real token (the causal model's summary of the whole
caption) or the mean over real tokens.

Example:
    >>> enc = ImageEncoder(ImageEncoderConfig(image_size=8, patch_size=2, channels=1, dim=32, layers=1, heads=4))
    >>> enc(torch.rand(3, 1, 8, 8)).shape
    torch.Size([3, 32])
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ..config import OpenAutoGLMConfig
from ..losses import moe_aux_loss
from ..modules import AttentionMetadata, DecoderBlock, RMSNorm
from ..settings import setting

__all__ = ["ImageEncoderConfig", "ImageEncoder", "TextEncoder", "bidirectional_metadata", "pool"]


@dataclass
class ImageEncoderConfig:
    image_size: int = setting(16, "images are resized to image_size x image_size before the encoder (digits: 8x8 "
                                  "upsampled to 16x16, so random crops keep detail)")
    patch_size: int = setting(4, "side of the square patches; (image_size / patch_size)^2 tokens")
    channels: int = setting(1, "input channels (1 = grey, 3 = RGB); images of another count are converted")
    dim: int = setting(64, "width of the image transformer", flag="image_dim")
    layers: int = setting(3, "transformer blocks", flag="image_layers")
    heads: int = setting(4, "attention heads", flag="image_heads")
    ffn_hidden: int = setting(128, "hidden width of the SwiGLU feed-forward (of each expert with MoE)")
    num_experts: int = setting(0, "experts per feed-forward (MoE, top-2 routing); 0 = dense SwiGLU",
                               flag="image_experts")
    dropout: float = setting(0.0, "residual dropout in the blocks", flag="image_dropout")

    def __post_init__(self) -> None:
        if self.image_size < 1 or self.patch_size < 1 or self.image_size % self.patch_size:
            raise ValueError(f"patch_size ({self.patch_size}) must divide image_size ({self.image_size}); e.g. "
                             f"image_size 16 with patch_size 4")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {self.channels}")
        if self.dim < 1 or self.layers < 1 or self.heads < 1 or self.dim % self.heads or (self.dim // self.heads) % 2:
            raise ValueError(f"heads ({self.heads}) must divide dim ({self.dim}) into an even head size; e.g. dim 64, "
                             f"heads 4")
        if self.num_experts not in (0,) and self.num_experts < 2:
            raise ValueError(f"num_experts must be 0 (dense) or >= 2 (top-2 routing), got {self.num_experts}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def block_config(self) -> OpenAutoGLMConfig:
        """The `OpenAutoGLMConfig` the blocks are built from (dense attention, no rotary)."""
        return OpenAutoGLMConfig(vocab_size=2, hidden_size=self.dim, num_hidden_layers=self.layers,
                                 num_attention_heads=self.heads, max_position_embeddings=self.num_patches + 1,
                                 attention="dense", position="absolute", attn_impl="dense",
                                 intermediate_size=self.ffn_hidden, num_experts=self.num_experts,
                                 num_experts_per_tok=2, expert_intermediate_size=self.ffn_hidden,
                                 moe_dispatch="dense", dropout=self.dropout)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def bidirectional_metadata(batch: int, tokens: int, device: torch.device) -> AttentionMetadata:
    """Attention metadata under which a causal block attends to every token: all positions 0,
    so `k_pos <= q_pos` holds for every (query, key) pair."""
    zeros = torch.zeros(1, tokens, dtype=torch.long, device=device)
    return AttentionMetadata(q_pos=zeros, k_pos=zeros)


class ImageEncoder(nn.Module):
    """(B, C, H, W) images in [0, 1] -> (B, dim) [CLS] features. `aux_loss` holds the MoE
    auxiliary loss of the last forward (0 without experts)."""

    def __init__(self, cfg: ImageEncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        bc = cfg.block_config()
        self.patch_embed = nn.Conv2d(cfg.channels, cfg.dim, cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.num_patches + 1, cfg.dim) * 0.02)
        self.blocks = nn.ModuleList(DecoderBlock(bc, i) for i in range(cfg.layers))
        self.norm = RMSNorm(cfg.dim, eps=bc.rms_norm_eps)
        self._aux = (bc.router_aux_loss_coef, bc.router_z_loss_coef)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        self.aux_loss = torch.zeros(())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        s = self.cfg.image_size
        if images.shape[-2:] != (s, s):
            images = nn.functional.interpolate(images, size=(s, s), mode="bilinear", align_corners=False)
        x = self.patch_embed(images * 2 - 1).flatten(2).transpose(1, 2)  # (B, P, d)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1) + self.pos_embed  # (B, 1 + P, d)
        meta = bidirectional_metadata(len(x), x.shape[1], x.device)
        routing = []
        for block in self.blocks:
            x, r = block(x, meta)
            if r is not None:
                routing.append(r)
        self.aux_loss = (moe_aux_loss(routing, self.cfg.num_experts, *self._aux).to(x.device) if routing
                         else torch.zeros((), device=x.device))
        return self.norm(x[:, 0])


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: Literal["last", "mean"]) -> torch.Tensor:
    """(B, T, d) hidden states, (B, T) 1/0 mask (right padding) -> (B, d): the last real
    token's state, or the mean over real tokens."""
    m = mask.to(hidden.dtype)
    if how == "mean":
        return (hidden * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp_min(1)
    last = (m.sum(1).long() - 1).clamp_min(0)
    return hidden[torch.arange(len(hidden), device=hidden.device), last]


class TextEncoder(nn.Module):
    """The language model's backbone (`AutoGLMBackbone`) + pooling: (input_ids, attention_mask)
    (B, T) right-padded -> (B, hidden_size). `aux_loss`: the MoE auxiliary loss of the last call."""

    def __init__(self, backbone: nn.Module, pooling: Literal["last", "mean"] = "last") -> None:
        super().__init__()
        if pooling not in ("last", "mean"):
            raise ValueError(f"pooling must be 'last' or 'mean', got {pooling!r}")
        self.backbone = backbone
        self.pooling = pooling
        self.dim = backbone.config.hidden_size
        self.aux_loss = torch.zeros(())

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        from ..model import build_metadata

        pos, meta = build_metadata(input_ids, attention_mask, 0)
        out = self.backbone(input_ids, pos, meta)
        c = self.backbone.config
        self.aux_loss = (moe_aux_loss(out.routing, c.num_experts, c.router_aux_loss_coef,
                                      c.router_z_loss_coef).to(input_ids.device) if out.routing
                         else torch.zeros((), device=input_ids.device))
        return pool(out.last_hidden_state, attention_mask, self.pooling)
