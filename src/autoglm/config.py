"""Model configuration: one config class, validated, with named presets.

`OpenAutoGLMConfig` is a `transformers.PretrainedConfig`, so a saved model directory
loads with plain `AutoConfig` / `AutoModelForCausalLM` after `import autoglm`. Every
field carries a one-line *why*; derived fields and validation happen in `__init__`
(litgpt's `__post_init__` pattern), and presets are loaded with
`OpenAutoGLMConfig.from_name(name, **overrides)`.

Example:
    >>> cfg = OpenAutoGLMConfig.from_name("tiny")
    >>> cfg.attention, cfg.num_experts, cfg.num_experts_per_tok
    ('sparse', 4, 2)
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

__all__ = ["OpenAutoGLMConfig", "PRESETS", "preset_names"]

_ATTENTION_KINDS = ("sparse", "dense")
_ATTN_IMPLS = ("auto", "chunked", "flex", "dense")
_MOE_DISPATCH = ("auto", "grouped", "sorted", "dense", "gather")


class OpenAutoGLMConfig(PretrainedConfig):
    model_type = "open_autoglm"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 8192,  # byte-level BPE vocabulary; must match the tokenizer
        hidden_size: int = 256,  # residual stream width d
        num_hidden_layers: int = 6,  # transformer blocks
        num_attention_heads: int = 8,  # query heads; must divide hidden_size
        num_key_value_heads: int | None = None,  # < heads gives grouped-query attention (smaller KV cache)
        max_position_embeddings: int = 1024,  # longest supported sequence (the trained length until extend_context)
        position: str | None = None,  # "rope" (learnable-frequency rotary), "relative" (learned windowed bias; sparse only) or "absolute" (learned table); None = by attention
        rope_theta: float = 10000.0,  # initial rotary base
        attention: str = "sparse",  # "sparse" = local window + global tokens, "dense" = full causal
        window_size: int = 128,  # local window W: a query sees the W most recent keys (itself included)
        num_global_tokens: int = 4,  # the first G positions are visible to every later token
        attn_impl: str = "auto",  # "chunked" (fast on CPU), "flex" (FlexAttention block mask), "dense"; auto picks by device
        attn_chunk_size: int = 0,  # query chunk of the chunked path; 0 = window_size
        intermediate_size: int = 1408,  # hidden width of the dense SwiGLU FFN
        num_experts: int = 0,  # experts per MoE layer; 0 = dense FFN everywhere
        num_experts_per_tok: int = 2,  # experts each token is routed to
        expert_intermediate_size: int = 352,  # hidden width of one SwiGLU expert
        moe_every: int = 1,  # MoE on every Nth layer (layer i is MoE when (i + 1) % N == 0)
        moe_dispatch: str = "auto",  # "auto" picks per call: "gather" for a few tokens, "grouped" (grouped GEMMs, no host sync) otherwise; "sorted" loops over experts; "dense" is the static, exportable path; "gather" reads only the chosen experts (few-token decode, CUDA graphs)
        router_aux_loss_coef: float = 0.01,  # weight of the Switch load-balancing loss
        router_z_loss_coef: float = 0.001,  # weight of the router z-loss (keeps router logits small)
        rms_norm_eps: float = 1e-5,
        initializer_range: float = 0.02,
        dropout: float = 0.0,  # residual/embedding dropout; 0 for pre-training at this scale
        tie_word_embeddings: bool = True,  # share the input embedding and the LM head
        gradient_checkpointing_layers: bool = False,  # recompute block activations in backward
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.position = position or ("rope" if attention == "sparse" else "absolute")
        self.rope_theta = rope_theta
        self.attention = attention
        self.window_size = window_size
        self.num_global_tokens = num_global_tokens
        self.attn_impl = attn_impl
        self.attn_chunk_size = attn_chunk_size
        self.intermediate_size = intermediate_size
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.expert_intermediate_size = expert_intermediate_size
        self.moe_every = moe_every
        self.moe_dispatch = moe_dispatch
        self.router_aux_loss_coef = router_aux_loss_coef
        self.router_z_loss_coef = router_z_loss_coef
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.dropout = dropout
        self.gradient_checkpointing_layers = gradient_checkpointing_layers
        kwargs.setdefault("eos_token_id", 0)
        kwargs.setdefault("pad_token_id", 1)
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        self.validate_fields()

    # ------------------------------------------------------------------ derived
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def is_moe_layer(self, layer_idx: int) -> bool:
        return self.num_experts > 0 and (layer_idx + 1) % self.moe_every == 0

    # --------------------------------------------------------------- validation
    def validate_fields(self) -> None:
        """Raise ValueError naming the bad field and the fix."""

        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(msg)

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "max_position_embeddings", "intermediate_size"):
            v = getattr(self, name)
            need(isinstance(v, int) and v > 0, f"{name} must be a positive integer, got {v!r}")
        need(self.attention in _ATTENTION_KINDS,
             f"attention must be one of {_ATTENTION_KINDS}, got {self.attention!r}")
        need(self.position in ("rope", "relative", "absolute"),
             f"position must be 'rope', 'relative' or 'absolute', got {self.position!r}")
        need(self.position == "absolute" or self.attention == "sparse",
             "position='relative' needs attention='sparse' (its bias covers window distances only); "
             "use position='absolute' with dense attention")
        need(self.attn_impl in _ATTN_IMPLS, f"attn_impl must be one of {_ATTN_IMPLS}, got {self.attn_impl!r}")
        need(self.moe_dispatch in _MOE_DISPATCH,
             f"moe_dispatch must be one of {_MOE_DISPATCH}, got {self.moe_dispatch!r}")
        need(self.hidden_size % self.num_attention_heads == 0,
             f"num_attention_heads ({self.num_attention_heads}) must divide hidden_size "
             f"({self.hidden_size}); pick a head count that divides the width, e.g. "
             f"{_divisor_near(self.hidden_size, self.num_attention_heads)}")
        need(self.num_key_value_heads > 0 and self.num_attention_heads % self.num_key_value_heads == 0,
             f"num_key_value_heads ({self.num_key_value_heads}) must divide num_attention_heads "
             f"({self.num_attention_heads})")
        need(self.head_dim % 2 == 0, f"head_dim ({self.head_dim}) must be even")
        if self.attention == "sparse":
            need(self.window_size >= 1, f"window_size must be >= 1, got {self.window_size}")
            need(self.window_size <= self.max_position_embeddings,
                 f"window_size ({self.window_size}) must be <= max_position_embeddings "
                 f"({self.max_position_embeddings}); lower window_size or raise max_position_embeddings")
            need(0 <= self.num_global_tokens <= self.max_position_embeddings,
                 f"num_global_tokens ({self.num_global_tokens}) must be between 0 and "
                 f"max_position_embeddings ({self.max_position_embeddings})")
        need(self.attn_chunk_size >= 0, f"attn_chunk_size must be >= 0, got {self.attn_chunk_size}")
        need(self.num_experts >= 0, f"num_experts must be >= 0, got {self.num_experts}")
        if self.num_experts > 0:
            need(1 <= self.num_experts_per_tok <= self.num_experts,
                 f"num_experts_per_tok ({self.num_experts_per_tok}) must be between 1 and num_experts ({self.num_experts}); "
                 f"lower num_experts_per_tok or add experts")
            need(self.expert_intermediate_size > 0,
                 f"expert_intermediate_size must be positive, got {self.expert_intermediate_size}")
            need(self.moe_every >= 1, f"moe_every must be >= 1, got {self.moe_every}")
        need(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")

    # ------------------------------------------------------------------ presets
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "OpenAutoGLMConfig":
        """Build a named preset (see `PRESETS`), with field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(preset_names())}")
        fields = {**PRESETS[name], **overrides}
        return cls(**fields)


def _divisor_near(n: int, k: int) -> int:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return min(divisors, key=lambda d: abs(d - k))


# Dense "standard" baselines (GPT-2/Llama style: full causal attention, learned absolute
# positions, dense SwiGLU) have the same total parameter count as their sparse MoE twin:
# the dense FFN is num_experts * expert_intermediate_size wide, minus what the absolute
# position table adds, so only the router and the relative bias (< 0.1%) differ.
_TINY = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, window_size=32,
             num_global_tokens=4, num_experts=4, num_experts_per_tok=2, expert_intermediate_size=128,
             intermediate_size=512)
_SMALL = dict(vocab_size=8192, hidden_size=256, num_hidden_layers=6, num_attention_heads=8,
              max_position_embeddings=1024, window_size=128, num_global_tokens=4,
              num_experts=4, num_experts_per_tok=2, expert_intermediate_size=352, intermediate_size=1408)
_BASE = dict(vocab_size=32000, hidden_size=1024, num_hidden_layers=16, num_attention_heads=16,
             max_position_embeddings=2048, window_size=256, num_global_tokens=8,
             num_experts=8, num_experts_per_tok=2, expert_intermediate_size=688, intermediate_size=5504)


def _dense(preset: dict) -> dict:
    d, layers = preset["hidden_size"], preset["num_hidden_layers"]
    table_as_ffn = round(preset["max_position_embeddings"] * d / (3 * d * layers))
    return {**preset, "attention": "dense", "position": "absolute", "num_experts": 0,
            "intermediate_size": preset["num_experts"] * preset["expert_intermediate_size"] - table_as_ffn}


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": _TINY,
    "small": _SMALL,
    "base": _BASE,
    "standard-tiny": _dense(_TINY),
    "standard-small": _dense(_SMALL),
    "standard-base": _dense(_BASE),
}


def preset_names() -> list[str]:
    return list(PRESETS)
