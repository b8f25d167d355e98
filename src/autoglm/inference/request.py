"""Plain data objects the engine's parts pass around: sampling parameters, requests, outputs.

A `Request` carries its whole token history (`prompt_ids + output_ids`) and how many of
those tokens already have K/V in the paged cache (`num_computed_tokens`). There is no
separate prefill/decode phase: every step the scheduler lets `num_computed_tokens` catch
up with `num_tokens` under a token budget (vLLM v1 style). Preemption sets
`num_computed_tokens` back to 0, so the request is recomputed from its tokens later.
"""

from __future__ import annotations

import enum
import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["SamplingParams", "Request", "RequestStatus", "RequestOutput", "FinishReason", "TokenLogprob",
           "EngineCoreOutput", "InvalidRequestError", "MAX_LOGPROBS"]

_ids = itertools.count()
MAX_LOGPROBS = 20
# temperatures below this sample as greedy (their limit): a float32 division by them overflows
# (vLLM's _SAMPLING_EPS)
GREEDY_BELOW = 1e-5
SEED_RANGE = (-2**63, 2**64 - 1)  # what torch.Generator.manual_seed takes


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop.

    temperature 0 means greedy (argmax), and so does any temperature below 1e-5 (its limit;
    vLLM does the same); top_k 0, top_p 1.0 and min_p 0 disable those
    filters. The logits are adjusted first, in this order (OpenAI's and vLLM's semantics):
    `logit_bias` (token id -> value added), repetition_penalty > 1 (CTRL rule on tokens of
    the prompt or output: positive logits divided, negative multiplied), then
    `frequency_penalty` * count and `presence_penalty` * (count > 0) subtracted for tokens
    already *generated*. `seed` makes sampling reproducible per request, whatever else is in
    the batch. max_tokens None: until the model's context is full (the engine resolves it
    when the request is added); 0: no token is generated, the request only scores its prompt
    (needs `prompt_logprobs`). `prompt_logprobs`: report each prompt token's log-probability
    under the model (all but the first) and this many top alternatives, computed in the
    prefill the request runs anyway.
    """

    max_tokens: int | None = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # report each new token's log-probability and this many top alternatives
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (all but the first)
    # self-speculative decoding: tokens drafted from the engine's exit layer per step, verified by
    # the full model (greedy output unchanged, sampled output distributed as the full model's);
    # None = the engine's default (EngineConfig.speculative_tokens), 0 = off
    speculative_tokens: int | None = None
    # image-conditioned generation: (P, d) embeddings that take the place of the prompt's first P
    # token embeddings in the prefill (copied to `Request.prefix_embeds`); not compared or shown
    prefix_embeds: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        floats = {"temperature": self.temperature, "top_p": self.top_p, "min_p": self.min_p,
                  "repetition_penalty": self.repetition_penalty, "presence_penalty": self.presence_penalty,
                  "frequency_penalty": self.frequency_penalty}
        for name, v in floats.items():
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        checks = [
            (self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 0),
             f"max_tokens must be an integer >= 0, got {self.max_tokens!r}"),
            (self.max_tokens != 0 or self.prompt_logprobs is not None,
             "max_tokens 0 generates nothing; it only makes sense with prompt_logprobs (scoring the prompt)"),
            (self.temperature >= 0, f"temperature must be >= 0 (0 = greedy), got {self.temperature}"),
            (isinstance(self.top_k, int) and self.top_k >= 0, f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}"),
            (0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}"),
            (0.01 <= self.repetition_penalty <= 100.0,
             f"repetition_penalty must be in [0.01, 100] (1 = off, above 1 penalises), got {self.repetition_penalty}"),
            (-2.0 <= self.presence_penalty <= 2.0, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2.0 <= self.frequency_penalty <= 2.0,
             f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1] (0 = off), got {self.min_p}"),
            (all(isinstance(k, int) and -100.0 <= v <= 100.0 for k, v in self.logit_bias.items()),
             "logit_bias maps token ids (integers) to values in [-100, 100]"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
            (self.seed is None or (isinstance(self.seed, int) and not isinstance(self.seed, bool)
                                   and SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]),
             f"seed must be an integer in [-2**63, 2**64 - 1], got {self.seed!r}"),
            (self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_LOGPROBS),
             f"logprobs must be an integer in [0, {MAX_LOGPROBS}] (top alternatives per token), got {self.logprobs!r}"),
            (self.prompt_logprobs is None or (isinstance(self.prompt_logprobs, int)
                                              and 0 <= self.prompt_logprobs <= MAX_LOGPROBS),
             f"prompt_logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.prompt_logprobs!r}"),
            (self.speculative_tokens is None or (isinstance(self.speculative_tokens, int)
                                                 and not isinstance(self.speculative_tokens, bool)
                                                 and self.speculative_tokens >= 0),
             f"speculative_tokens must be an integer >= 0 (0 = off), got {self.speculative_tokens!r}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def adjusts_logits(self) -> bool:
        """True when the logits are changed before the pick (bias or a penalty)."""
        return bool(self.logit_bias) or self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 \
            or self.frequency_penalty != 0.0


class InvalidRequestError(ValueError):
    """A request the engine cannot serve. `param` names the input at fault ("prompt",
    "max_tokens", "model", ...) and `code` the kind of problem, so an API can say which field
    to change (the OpenAI server answers 400 with both)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.code = param, code


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_tokens or the model's context
    ABORT = "abort"  # cancelled by the caller (e.g. a client disconnect)


@dataclass
class Request:
    """One generation request. Token ids are plain Python ints."""

    prompt_ids: list[int]
    params: SamplingParams
    request_id: str = ""
    lora: str | None = None  # name of the LoRA adapter this request runs with (None = the base model)
    output_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    # early exit: the oldest position whose upper layers are still deferred (see runner); the KV
    # manager keeps the keys that position will read. None when nothing is deferred
    deferred_from: int | None = None
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    num_preemptions: int = 0
    arrival_time: float = field(default_factory=time.perf_counter)
    scheduled_time: float | None = None  # first time the scheduler admitted it (queue time = this - arrival)
    first_token_time: float | None = None
    token_times: list[float] = field(default_factory=list)
    exit_layers: list[int] = field(default_factory=list)  # layer each output token left at (early exit)
    # prompt_logprobs: entry i scores prompt token i + 1 (filled chunk by chunk during the prefill)
    prompt_logprobs: list["TokenLogprob"] = field(default_factory=list)
    # image-conditioned generation: (P, d) embeddings that replace the embedded prompt tokens at
    # positions 0..P-1 (placeholders) during the prefill; see autoglm.multimodal.projector
    prefix_embeds: "torch.Tensor | None" = None  # noqa: F821 (annotation only)

    def __post_init__(self) -> None:
        if not self.request_id:
            self.request_id = f"req-{next(_ids)}"
        if self.prefix_embeds is None:
            self.prefix_embeds = self.params.prefix_embeds
        if not self.prompt_ids:
            raise ValueError("prompt is empty; give at least one token")

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.status == RequestStatus.FINISHED


@dataclass
class TokenLogprob:
    """Log-probability of a generated token under the model's distribution (log-softmax of the
    raw logits, before temperature / penalties / filters, as vLLM reports by default) and the
    top alternatives, most likely first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class RequestOutput:
    """What one engine step reports for one request (streamed to the caller)."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    queue_time: float | None = None  # seconds from arrival to first admission; set on the first output only
    logprobs: list[TokenLogprob] | None = None  # one per new token when SamplingParams.logprobs is set
    # SamplingParams.prompt_logprobs: one per prompt token but the first, on the request's first output
    prompt_logprobs: list[TokenLogprob] | None = None


@dataclass
class EngineCoreOutput:
    """What the engine core reports for one request after a step: the sampled tokens (ids
    only; text is the output processor's job) and, when it finished, why."""

    request_id: str
    new_token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    queue_time: float | None = None  # set on the request's first output
    prompt_logprobs: list[TokenLogprob] | None = None  # set on the request's first output when asked for

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
