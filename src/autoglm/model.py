"""The Open-AutoGLM backbone: embeddings -> blocks -> final norm. Pure compute.

No loss, no sampling, no cache policy: the caller passes positions / attention metadata
and (optionally) a KV cache object with the HF `Cache.update(k, v, layer_idx)` method.
The HF wrapper (`autoglm.hf`) adds the LM head, losses and `generate()`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import OpenAutoGLMConfig
from .modules import AttentionMetadata, DecoderBlock, LearnedPositionEmbedding, RMSNorm, RouterOutput

__all__ = ["AutoGLMBackbone", "BackboneOutput", "build_metadata"]


@dataclass
class BackboneOutput:
    last_hidden_state: torch.Tensor  # (B, T, d), after the final norm
    routing: list[RouterOutput] = field(default_factory=list)  # one per MoE layer
    hidden_states: list[torch.Tensor] | None = None  # input of each block + final (before norm)


def build_metadata(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   past_len: int) -> tuple[torch.Tensor, AttentionMetadata]:
    """Positions and attention metadata for a forward over `input_ids` after `past_len` cached tokens.

    attention_mask: (B, past_len + T) with 0 for padding (HF convention), or None.
    Unpadded input takes the fast contiguous path; padded input gets per-row positions
    (position = number of real tokens before it) and a key-validity mask.
    """
    B, T = input_ids.shape
    device = input_ids.device
    if attention_mask is None or bool(attention_mask.all()):
        pos = torch.arange(past_len, past_len + T, device=device)[None].expand(B, -1)
        return pos, AttentionMetadata(q_offset=past_len)
    if attention_mask.shape[1] != past_len + T:
        raise ValueError(f"attention_mask has length {attention_mask.shape[1]} but the cache holds "
                         f"{past_len} tokens and the input {T}; pass the mask of the whole sequence")
    valid = attention_mask.bool()
    k_pos = (valid.long().cumsum(-1) - 1).clamp_min(0)  # (B, past + T)
    q_pos = k_pos[:, past_len:]
    return q_pos, AttentionMetadata(q_offset=past_len, q_pos=q_pos, k_pos=k_pos, k_valid=valid)


class AutoGLMBackbone(nn.Module):
    def __init__(self, config: OpenAutoGLMConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_positions = None
        if config.position == "absolute":
            self.embed_positions = LearnedPositionEmbedding(config.max_position_embeddings, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(DecoderBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gradient_checkpointing = config.gradient_checkpointing_layers

    def forward(self, input_ids: torch.Tensor | None, position_ids: torch.Tensor, meta: AttentionMetadata,
                cache=None, output_hidden_states: bool = False,
                inputs_embeds: torch.Tensor | None = None) -> BackboneOutput:
        """`inputs_embeds` (B, T, d), instead of `input_ids`: token embeddings computed by the
        caller (soft prompts, image prefixes); the position embedding is added to them as to
        the model's own."""
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, d)
        if self.embed_positions is not None:
            x = x + self.embed_positions(position_ids)
        x = self.dropout(x)
        routing: list[RouterOutput] = []
        hidden: list[torch.Tensor] | None = [] if output_hidden_states else None
        for layer in self.layers:
            if hidden is not None:
                hidden.append(x)
            if self.gradient_checkpointing and self.training and cache is None:
                x, r = checkpoint(layer, x, meta, None, use_reentrant=False)
            else:
                x, r = layer(x, meta, cache)
            if r is not None:
                routing.append(r)
        if hidden is not None:
            hidden.append(x)
        return BackboneOutput(self.norm(x), routing, hidden)

    def extend_context(self, new_len: int) -> None:
        """Allow sequences of `new_len` tokens. Relative bias: nothing to change (every distance
        a query sees is inside the window); absolute table: interpolated (see modules.position)."""
        if new_len < self.config.max_position_embeddings:
            raise ValueError(f"new context length {new_len} is shorter than the current "
                             f"{self.config.max_position_embeddings}; extend_context only grows it")
        if self.embed_positions is not None:
            self.embed_positions.resize(new_len)
        self.config.max_position_embeddings = new_len
