"""Export-friendly forward: explicit past K/V in, present K/V out, no Python-side data checks.

`ExportDecoder` wraps a loaded `OpenAutoGLMForCausalLM` and runs its own backbone
(`AutoGLMBackbone.forward`, the same blocks, norms, rotary, attention kernels and LM
head as eager inference) with three changes that make the graph static and traceable:

* positions always come from the attention mask (the "per-row positions" path of
  `model.build_metadata`): `k_pos = cumsum(mask) - 1`, so there is no `mask.all()` branch
  to bake in. The decode graph runs the dense masked kernel (`attend_dense`: a few new
  queries against the cache); the prefill graph of a sparse model runs the windowed kernel
  (`export.attention.WindowedPrefill`, O(T * (W + C + G)) instead of a (T, T) mask) unless
  `prefill_attention="dense"`;
* the KV cache is a small object with the HF `Cache.update` method that concatenates the
  graph's `past_key_values` inputs with the new keys/values and records them as outputs;
* every MoE layer uses the static `dense` dispatch (every expert on every token, a dense
  (N, E) combine matrix with zeros off the top-k), so no expert is dropped because the
  dummy input did not route to it and no `nonzero`/`bincount` appears in the graph.

The wrapper never changes the wrapped model: the export switches the MoE dispatch only
inside `modules.moe.moe_dispatch(model, "dense")`, restored afterwards. The absolute
position table skips its data-dependent range check by itself while torch.export traces;
out-of-range positions fail in ONNX Runtime's Gather, and `OrtCausalLM.generate` checks
the context up front.
"""

from __future__ import annotations

import torch
from torch import nn

from ..modules import AttentionMetadata
from .attention import DEFAULT_EXPORT_CHUNK, WindowedPrefill

__all__ = ["ExportDecoder", "PREFILL_ATTENTION", "past_names", "present_names"]


PREFILL_ATTENTION = ("windowed", "dense")


def past_names(num_layers: int) -> list[str]:
    """Input names of the cache, Optimum style: past_key_values.{i}.key / .value."""
    return [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def present_names(num_layers: int) -> list[str]:
    """Output names of the updated cache: present.{i}.key / .value."""
    return [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


class _GraphCache:
    """HF-`Cache`-shaped object: `update(k, v, layer)` returns past ++ new and keeps it."""

    def __init__(self, past: list[torch.Tensor] | None) -> None:
        self.past = past
        self.present: list[torch.Tensor] = []

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.past is not None:
            k = torch.cat([self.past[2 * layer_idx], k], dim=2)  # (B, Hkv, P + T, D)
            v = torch.cat([self.past[2 * layer_idx + 1], v], dim=2)
        self.present += [k, v]
        return k, v


class ExportDecoder(nn.Module):
    """forward(input_ids, attention_mask, *past) -> (logits, *present).

    input_ids:      (B, T) int64, the new tokens.
    attention_mask: (B, P + T) int64, 1 for real tokens and 0 for padding, over the cached
                    tokens and the new ones (left padding is supported: a token's position
                    is the number of real tokens before it).
    past:           2 * L tensors (B, Hkv, P, D) -- key and value per layer -- or none
                    (the prefill graph; with windowed attention each row's real tokens must
                    be contiguous, i.e. left or right padding).
    logits:         (B, T, V) float32.
    present:        2 * L tensors (B, Hkv, P + T, D).
    """

    def __init__(self, model: nn.Module, prefill_attention: str = "windowed",
                 chunk: int = DEFAULT_EXPORT_CHUNK) -> None:
        super().__init__()
        if prefill_attention not in PREFILL_ATTENTION:
            raise ValueError(f"prefill_attention must be one of {PREFILL_ATTENTION}, got {prefill_attention!r}")
        self.model = model
        self.num_layers = model.config.num_hidden_layers
        self.prefill_attention, self.chunk = prefill_attention, chunk

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        T = input_ids.shape[1]
        valid = attention_mask.bool()  # (B, P + T)
        k_pos = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)  # (B, P + T)
        q_pos = k_pos[:, k_pos.shape[1] - T:]  # (B, T)
        meta = AttentionMetadata(q_offset=0, q_pos=q_pos, k_pos=k_pos, k_valid=valid)
        cfg = self.model.config
        if not past and self.prefill_attention == "windowed" and cfg.attention == "sparse":
            # one mask / index layout for every layer (see export.attention)
            meta.kernel = WindowedPrefill(attention_mask, cfg.window_size, cfg.num_global_tokens, self.chunk)
        cache = _GraphCache(list(past) if past else None)
        out = self.model.model(input_ids, q_pos, meta, cache)
        logits = self.model.lm_head(out.last_hidden_state).float()  # (B, T, V)
        return (logits, *cache.present)
