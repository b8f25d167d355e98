"""Training throughput: model FLOPs per token and model-FLOPs utilisation (MFU).

MFU (PaLM, appendix B) is the FLOPs the *model* needs per second at the measured token
rate, over the hardware's peak: recomputation (activation checkpointing) and padding do
not count. Per token, a forward costs 2 FLOPs per multiply-add of

* every matmul weight a token actually uses: attention projections, the FFN (for an MoE
  layer the router plus the `k` experts the token is sent to, not all of them) and the
  LM head; embeddings are a lookup and cost nothing;
* attention itself: QK^T and AV, 2 * 2 * heads * head_dim per key the query sees. Under
  sparse attention a query sees at most `window` recent keys plus the `num_global` first
  ones; under dense causal attention all earlier ones, (T + 1) / 2 on average.

Training (forward + backward) is 3x the forward. Configs are read by attribute, so the same
count covers Open-AutoGLM configs and transformers' Llama / Mixtral configs.

The peak is the datasheet's dense bf16 (or fp32) figure for known GPUs; elsewhere (CPUs,
unknown GPUs) it is measured: the FLOP rate of one large matmul on the device, in the
precision of the run, which is the ceiling a matmul-bound model could reach there.

Example:
    >>> from autoglm import OpenAutoGLMConfig
    >>> cfg = OpenAutoGLMConfig.from_name("small")
    >>> f = model_flops_per_token(cfg, seq_len=512)
    >>> round(f["train"] / 1e6, 1), round(f["attention_share"], 3)
    (43.6, 0.049)
    >>> mean_keys_per_query(4, window=None, num_global=0)  # (1 + 2 + 3 + 4) / 4
    2.5
"""

from __future__ import annotations

import logging
import time
from functools import lru_cache
from typing import Any

import torch

__all__ = ["mean_keys_per_query", "model_flops_per_token", "peak_flops", "mfu"]

log = logging.getLogger(__name__)

# dense (no sparsity) tensor-core peaks from the vendors' datasheets, in TFLOP/s (SXM parts)
_PEAK_TFLOPS = {  # name fragment: (bf16, fp32)
    "H200": (989.0, 67.0), "H100": (989.0, 67.0), "H800": (989.0, 67.0), "GH200": (989.0, 67.0),
    "B200": (2250.0, 80.0), "A100": (312.0, 19.5), "A800": (312.0, 19.5), "L40S": (362.0, 91.6),
    "L4": (121.0, 30.3), "A10G": (70.0, 31.2), "A10": (125.0, 31.2), "RTX 4090": (165.0, 82.6),
}


def mean_keys_per_query(seq_len: int, window: int | None, num_global: int) -> float:
    """Average number of keys a query at positions 0..seq_len-1 attends to (causal), under the
    sparse rule (the `window` most recent keys plus the first `num_global`) or dense (window None)."""
    T = seq_len
    if window is None or window >= T:
        return (T + 1) / 2
    total = 0
    for i in range(T):
        local = min(i + 1, window)
        glob = max(0, min(num_global, i - window + 1))  # global keys older than the window
        total += local + glob
    return total / T


def _get(cfg: Any, *names: str, default: Any = None) -> Any:
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def model_flops_per_token(cfg: Any, seq_len: int) -> dict[str, float]:
    """FLOPs per token of a decoder-only LM config at `seq_len`: forward, train (3x forward),
    the attention part of the forward, and its share. Works for Open-AutoGLM configs and for
    transformers' Llama / Mixtral configs."""
    d = cfg.hidden_size
    L = cfg.num_hidden_layers
    H = cfg.num_attention_heads
    Hkv = _get(cfg, "num_key_value_heads", default=H)
    hd = _get(cfg, "head_dim", default=d // H) or d // H
    V = cfg.vocab_size
    sparse = getattr(cfg, "attention", "dense") == "sparse"
    window = _get(cfg, "window_size") if sparse else _get(cfg, "sliding_window")
    keys = mean_keys_per_query(seq_len, window, _get(cfg, "num_global_tokens", default=0) if sparse else 0)
    E = _get(cfg, "num_experts", "num_local_experts", default=0)
    k = _get(cfg, "num_experts_per_tok", default=1)
    proj = 2 * d * hd * (2 * H + 2 * Hkv)  # q, o and k, v
    attn = 4 * H * hd * keys  # QK^T and AV
    ffn = 0.0
    for i in range(L):
        moe = E > 0 and (cfg.is_moe_layer(i) if hasattr(cfg, "is_moe_layer") else True)
        if moe:
            h = _get(cfg, "expert_intermediate_size", "intermediate_size")
            ffn += 2 * d * E + k * 6 * d * h  # router + k SwiGLU experts
        else:
            ffn += 6 * d * cfg.intermediate_size  # SwiGLU: gate, up, down
    forward = L * (proj + attn) + ffn + 2 * d * V
    return {"forward": forward, "train": 3 * forward, "attention": L * attn, "attention_share": L * attn / forward,
            "keys_per_query": keys}


@lru_cache(maxsize=8)
def _measured_peak(device: str, dtype: torch.dtype, threads: int) -> float:
    # CPU: 512 (fp32 runs near its peak there; a CPU without native bf16 takes ~1 s per call)
    n = 512 if device == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    a @ b
    sync()
    best = float("inf")
    for _ in range(3 if device == "cpu" else 5):
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def peak_flops(device: torch.device | str, precision: str = "fp32") -> tuple[float, str]:
    """(peak FLOP/s, where the number comes from) for `device` in `precision` ('bf16' or 'fp32')."""
    device = torch.device(device)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for frag, (bf16, fp32) in sorted(_PEAK_TFLOPS.items(), key=lambda kv: -len(kv[0])):
            if frag in name:
                return (bf16 if dtype == torch.bfloat16 else fp32) * 1e12, f"datasheet ({name}, {precision})"
    key = str(device) if device.type != "cuda" else f"cuda:{device.index or 0}"
    flops = _measured_peak(key, dtype, torch.get_num_threads())
    return flops, f"measured: one large {precision} matmul on {key} ({torch.get_num_threads()} threads)"


def mfu(tokens_per_s: float, flops_per_token: float, peak: float) -> float:
    """Model-FLOPs utilisation: the FLOP rate the model needs at `tokens_per_s`, over `peak`."""
    return tokens_per_s * flops_per_token / peak
