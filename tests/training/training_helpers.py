"""Shared helpers for the training tests (imported by name; not a conftest so it cannot
clash with tests/conftest.py): a tiny model factory and batch callables over a
token array made here (no corpus, no autoglm.data)."""

import numpy as np
import torch

from autoglm import OpenAutoGLMConfig, OpenAutoGLMForCausalLM

VOCAB = 512  # the tiny preset's vocabulary


def make_model(seed: int = 0, preset: str = "tiny", **overrides) -> OpenAutoGLMForCausalLM:
    torch.manual_seed(seed)
    return OpenAutoGLMForCausalLM(OpenAutoGLMConfig.from_name(preset, **overrides))


def windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.from_numpy(tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64))  # (B, T+1)
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()


def batch_fn(tokens: np.ndarray, batch_size: int, seq_len: int, seed: int = 0):
    """Micro-batch i is a pure function of (seed, i), like autoglm.data.sample_batch."""

    def train_batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([seed, i])
        return windows(tokens, rng.integers(0, len(tokens) - seq_len - 1, size=batch_size), seq_len)

    return train_batch


def eval_fn(tokens: np.ndarray, batch_size: int, seq_len: int, n_batches: int = 2):
    def batches():
        for b in range(n_batches):
            starts = (np.arange(batch_size) + b * batch_size) * seq_len
            yield windows(tokens, starts, seq_len)

    return batches


def pattern_tokens() -> np.ndarray:
    """A learnable stream: one random 23-token phrase repeated."""
    phrase = np.random.default_rng(0).integers(2, VOCAB, size=23)
    return np.tile(phrase, 100)


def random_tokens(n: int = 4000) -> np.ndarray:
    return np.random.default_rng(1).integers(0, VOCAB, size=n)
