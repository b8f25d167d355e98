"""One pre-norm transformer block: x + attn(norm(x)), then x + ffn(norm(x))."""

from __future__ import annotations

import torch
from torch import nn

from .attention import AttentionMetadata, CausalSelfAttention
from .ffn import SwiGLU
from .moe import MoEFeedForward, RouterOutput
from .norm import RMSNorm

__all__ = ["DecoderBlock"]


class DecoderBlock(nn.Module):
    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        d = config.hidden_size
        self.input_layernorm = RMSNorm(d, eps=config.rms_norm_eps)
        self.self_attn = CausalSelfAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(d, eps=config.rms_norm_eps)
        self.is_moe = config.is_moe_layer(layer_idx)
        if self.is_moe:
            self.mlp = MoEFeedForward(d, config.expert_intermediate_size, config.num_experts,
                                      config.num_experts_per_tok, config.moe_dispatch)
        else:
            self.mlp = SwiGLU(d, config.intermediate_size)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata, cache=None) -> tuple[torch.Tensor, RouterOutput | None]:
        x = x + self.dropout(self.self_attn(self.input_layernorm(x), meta, cache))
        h = self.post_attention_layernorm(x)
        routing = None
        if self.is_moe:
            h, routing = self.mlp(h)
        else:
            h = self.mlp(h)
        return x + self.dropout(h), routing
