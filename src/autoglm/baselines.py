"""transformers' own Llama and Mixtral built at the size of an Open-AutoGLM MoE config: the
models a user would otherwise pick, as rows of `autoglm compare` and of the benchmarks.

The twins share the config's width, depth, heads, key/value heads, vocabulary, RMSNorm epsilon
and tied embeddings. `hf-llama` is dense, its SwiGLU as wide as all experts together (the
same total parameters); `hf-mixtral` has the same experts, top-k and load-balancing weight.
Both start from random weights (transformers' own initialisation) and use RoPE, so any
`max_len` works.

Example:
    >>> from autoglm import OpenAutoGLMConfig
    >>> twins = transformers_twins(OpenAutoGLMConfig.from_name("tiny"), max_len=256)
    >>> sorted(twins), twins["hf-mixtral"][1].num_local_experts
    (['hf-llama', 'hf-mixtral'], 4)
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["TRANSFORMERS_BASELINES", "transformers_twins", "build_baseline", "baseline_objective",
           "parameter_counts"]

TRANSFORMERS_BASELINES = ("hf-llama", "hf-mixtral")


def transformers_twins(cfg: Any, max_len: int | None = None) -> dict[str, tuple[type, Any]]:
    """{"hf-llama": (LlamaForCausalLM, LlamaConfig), "hf-mixtral": (MixtralForCausalLM,
    MixtralConfig)} at the total size of `cfg` (an `OpenAutoGLMConfig` with experts)."""
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    if not getattr(cfg, "num_experts", 0):
        raise ValueError("transformers' twins are sized from a Mixture-of-Experts config (the dense Llama's "
                         "FFN is as wide as all experts together); this config has no experts, e.g. use the "
                         "`small` preset rather than `standard-small`")
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
                  num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
                  max_position_embeddings=max(max_len or 0, cfg.max_position_embeddings), tie_word_embeddings=True,
                  rms_norm_eps=cfg.rms_norm_eps, use_cache=False)
    llama = LlamaConfig(intermediate_size=cfg.num_experts * cfg.expert_intermediate_size, **common)
    mixtral = MixtralConfig(intermediate_size=cfg.expert_intermediate_size, num_local_experts=cfg.num_experts,
                            num_experts_per_tok=cfg.num_experts_per_tok, sliding_window=None,
                            router_aux_loss_coef=cfg.router_aux_loss_coef, output_router_logits=True, **common)
    return {"hf-llama": (LlamaForCausalLM, llama), "hf-mixtral": (MixtralForCausalLM, mixtral)}


def build_baseline(name: str, cfg: Any, max_len: int | None = None) -> nn.Module:
    """A freshly initialised `name` (one of TRANSFORMERS_BASELINES) at the size of `cfg`."""
    twins = transformers_twins(cfg, max_len)
    if name not in twins:
        raise ValueError(f"unknown baseline {name!r}; choose one of {', '.join(TRANSFORMERS_BASELINES)}")
    cls, config = twins[name]
    return cls(config)


def baseline_objective(model: nn.Module):
    """The training objective of a causal LM: next-token loss plus its MoE load-balancing loss,
    weighted by the model's own coefficient where transformers returns it unweighted (Mixtral)."""
    from .training import CausalLMObjective

    coef = getattr(model.config, "router_aux_loss_coef", None)
    unweighted = getattr(model.config, "model_type", "") == "mixtral"
    return CausalLMObjective(aux_weight=coef if unweighted and coef is not None else 1.0)


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """{"total", "active"} parameters (active: per token, counting top-k of the experts)."""
    if hasattr(model, "num_parameters_summary"):
        return model.num_parameters_summary()
    total = sum(p.numel() for p in model.parameters())
    c = model.config
    E = getattr(c, "num_local_experts", 0)
    if not E:
        return {"total": total, "active": total}
    per_expert = 3 * c.hidden_size * c.intermediate_size
    return {"total": total, "active": total - c.num_hidden_layers * (E - c.num_experts_per_tok) * per_expert}
