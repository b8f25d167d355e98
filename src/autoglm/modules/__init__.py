"""Model-agnostic building blocks: norm, position, attention, ffn, moe, block."""

from .attention import AttentionMetadata, CausalSelfAttention, attend, sparse_mask
from .block import DecoderBlock
from .ffn import SwiGLU
from .moe import MoEFeedForward, RouterOutput, route
from .norm import RMSNorm
from .position import LearnedPositionEmbedding, interpolate_table

__all__ = [
    "AttentionMetadata", "CausalSelfAttention", "attend", "sparse_mask", "DecoderBlock", "SwiGLU",
    "MoEFeedForward", "RouterOutput", "route", "RMSNorm", "LearnedPositionEmbedding", "interpolate_table",
]
