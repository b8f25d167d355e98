"""The baselines the decode and serving benchmarks compare with: transformers' own Llama and
Mixtral built at our model's size (random weights, no download), and HF `generate()` at its
best setting (static cache + `torch.compile` of the forward).

Imported by benchmarks/decode.py and benchmarks/serving.py (run as scripts, so this module
imports as `baselines`).
"""

from __future__ import annotations

import copy

import torch

__all__ = ["llama_like", "mixtral_like", "hf_generate", "compiled_copy", "num_params"]


def llama_like(mc, max_len: int | None = None):
    """transformers' Llama with our model's width, depth, heads and vocabulary; the dense MLP as wide
    as all our experts together (the same total parameters)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    inter = mc.num_experts * mc.expert_intermediate_size if mc.num_experts else mc.intermediate_size
    cfg = LlamaConfig(vocab_size=mc.vocab_size, hidden_size=mc.hidden_size, num_hidden_layers=mc.num_hidden_layers,
                      num_attention_heads=mc.num_attention_heads, num_key_value_heads=mc.num_key_value_heads,
                      intermediate_size=inter, max_position_embeddings=max_len or mc.max_position_embeddings,
                      tie_word_embeddings=True, initializer_range=0.1)
    return LlamaForCausalLM(cfg).eval()


def mixtral_like(mc, max_len: int | None = None):
    """transformers' Mixtral with our model's width, depth, heads, vocabulary, experts (count, width,
    top-k): the same total and active parameters up to norms and the router. A dense preset
    gets 4 experts a quarter as wide as its MLP (same total)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    n_exp = mc.num_experts or 4
    top_k = mc.num_experts_per_tok if mc.num_experts else 2
    inter = mc.expert_intermediate_size if mc.num_experts else mc.intermediate_size // 4
    cfg = MixtralConfig(vocab_size=mc.vocab_size, hidden_size=mc.hidden_size, num_hidden_layers=mc.num_hidden_layers,
                        num_attention_heads=mc.num_attention_heads, num_key_value_heads=mc.num_key_value_heads,
                        intermediate_size=inter, num_local_experts=n_exp, num_experts_per_tok=top_k,
                        max_position_embeddings=max_len or mc.max_position_embeddings, tie_word_embeddings=True,
                        initializer_range=0.1, sliding_window=None)
    return MixtralForCausalLM(cfg).eval()


def num_params(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "adapters" not in n)


def hf_generate(model, ids: torch.Tensor, n: int, mask: torch.Tensor | None = None, static: bool = False,
                pad_id: int = 0, logits_processor=None) -> torch.Tensor:
    """Greedy `generate()` of exactly n new tokens (EOS ignored); `static`: a static KV cache."""
    kw = {"cache_implementation": "static"} if static else {}
    if logits_processor is not None:
        kw["logits_processor"] = logits_processor
    with torch.inference_mode():
        return model.generate(ids, attention_mask=mask if mask is not None else torch.ones_like(ids),
                              max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                              pad_token_id=pad_id, **kw)


def compiled_copy(model, device: torch.device):
    """A copy of `model` whose forward is `torch.compile`d (CUDA graphs too on a GPU: mode
    "reduce-overhead"), for `generate(..., cache_implementation="static")`: HF's fastest
    documented setting. generate's own automatic compile is turned off, so it is compiled once."""
    m = copy.deepcopy(model)
    m.generation_config.disable_compile = True
    m.forward = torch.compile(m.forward, mode="reduce-overhead" if device.type == "cuda" else None, dynamic=False)
    return m
