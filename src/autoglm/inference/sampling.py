"""Sampling as small pure functions over one request's logits (V,).

The order matches HF `generate`: repetition penalty, temperature, top-k, top-p, then a
multinomial draw (or argmax for greedy).

Example:
    >>> import torch
    >>> logits = torch.tensor([1.0, 3.0, 2.0])
    >>> int(sample_token(logits, SamplingParams(temperature=0), [], None))
    1
"""

from __future__ import annotations

import torch

from .request import SamplingParams, TokenLogprob

__all__ = ["apply_repetition_penalty", "top_k_filter", "top_p_filter", "sample_token", "sample_tokens",
           "token_logprob"]


def apply_repetition_penalty(logits: torch.Tensor, seen: list[int], penalty: float) -> torch.Tensor:
    """logits (V,); tokens in `seen` get positive logits divided and negative ones multiplied by `penalty`."""
    if penalty == 1.0 or not seen:
        return logits
    idx = torch.tensor(sorted(set(seen)), device=logits.device)
    score = logits[idx]
    logits = logits.clone()
    logits[idx] = torch.where(score > 0, score / penalty, score * penalty)
    return logits


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits (ties at the k-th value kept), others -inf. k=0: unchanged."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of tokens whose probability sums to >= p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    drop = cum - sorted_logits.softmax(-1) >= p  # tokens whose predecessors already reach p
    drop[0] = False
    mask = torch.zeros_like(drop).scatter(0, order, drop)
    return logits.masked_fill(mask, float("-inf"))


def sample_token(logits: torch.Tensor, params: SamplingParams, seen: list[int],
                 generator: torch.Generator | None) -> int:
    """Pick the next token from logits (V,) of one request."""
    logits = apply_repetition_penalty(logits.float(), seen, params.repetition_penalty)
    if params.greedy:
        return int(logits.argmax())
    logits = top_p_filter(top_k_filter(logits / params.temperature, params.top_k), params.top_p)
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def sample_tokens(logits: torch.Tensor, params: list[SamplingParams], seen: list[list[int]],
                  generators: list[torch.Generator | None]) -> list[int]:
    """One token per row of logits (R, V); row i follows params[i]. Plain greedy rows (no
    repetition penalty) share one argmax, the rest go through `sample_token` one by one."""
    plain = [i for i, p in enumerate(params) if p.greedy and p.repetition_penalty == 1.0]
    out = [0] * len(params)
    if plain:
        picks = logits if len(plain) == len(params) else logits[plain]
        for i, t in zip(plain, picks.argmax(-1).tolist()):
            out[i] = t
    if len(plain) < len(params):
        done = set(plain)
        for i, p in enumerate(params):
            if i not in done:
                out[i] = sample_token(logits[i], p, seen[i], generators[i])
    return out


def token_logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """Log-probability of `token` under softmax(logits (V,)) and the `top` most likely tokens."""
    lp = logits.float().log_softmax(-1)
    alts = []
    if top:
        v, i = lp.topk(top)
        alts = list(zip(i.tolist(), v.tolist()))
    return TokenLogprob(token, float(lp[token]), alts)
