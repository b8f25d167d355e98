"""Helpers shared by the inference tests."""

import torch

from autoglm import OpenAutoGLMConfig
from autoglm.hf import OpenAutoGLMForCausalLM


def make_model(preset="tiny", seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = OpenAutoGLMConfig.from_name(preset, initializer_range=0.2, **overrides)
    return OpenAutoGLMForCausalLM(cfg).eval()


def prompts(n, lo, hi, vocab=512, seed=0):
    """n random prompts of lengths in [lo, hi) (token ids >= 2: no EOS/pad)."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [torch.randint(2, vocab, (L,), generator=g).tolist() for L in lens]
