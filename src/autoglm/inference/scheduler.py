"""Continuous-batching scheduler: who runs this step and with how many tokens.

Every step, under a token budget (`max_num_batched_tokens`) and a cap on running requests
(`max_num_seqs`):

1. running requests first, in arrival order: each gets min(tokens it still lacks K/V for,
   budget left) - one token for a decoding request, a chunk for one still in prefill;
2. if the KV-cache manager cannot give a running request its slots, the most recently
   admitted running request is preempted (its blocks freed, `num_computed_tokens` reset
   to 0, put back at the head of the queue to be recomputed later);
3. then waiting requests are admitted while budget, sequence slots and blocks last.

Prefill chunks and decode tokens therefore share one batch. A decoding request that
speculates (`SamplingParams.speculative_tokens`) gets k + 1 slots ahead (k drafts and the
bonus row) and counts k + 1 tokens against the budget (`ScheduledRequest.num_draft` = k;
see `speculative`), k clipped so that k + 1 tokens fit its max_tokens, the model's context
and the budget left; short of blocks it decodes plainly. The scheduler talks to the
KV-cache manager only through `allocate_slots` / `free_out_of_window` / `free` and, with
prefix caching, `match_prefix` (a request being admitted starts past its leading blocks that
are cached, or waits while another request computes its next block) / `cache_computed` (a
request's newly computed full blocks become shareable).

After the runner executed a step, `update_from_output(scheduler_output, runner_output)` is
the one place request state moves on: computed tokens advance, sampled tokens are
appended (1 .. k + 1 of them after a speculative step), and the token-level stop rules (EOS, stop token ids, max_tokens, the model's
context) finish requests and free their blocks. It returns one `EngineCoreOutput` per
request that sampled. Stop *strings* need text, so they are the output processor's; it
finishes such a request through the engine core (`finish`).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from .kv_cache_manager import KVCacheManager
from .request import EngineCoreOutput, FinishReason, Request, RequestStatus

__all__ = ["Scheduler", "SchedulerOutput", "ScheduledRequest"]


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int  # K/V to compute this step: positions [num_computed, num_computed + n)
    num_draft: int = 0  # self-speculative decoding: tokens drafted and verified this step (0 = a plain step)

    @property
    def reaches_end(self) -> bool:
        """True when this step computes the last of the request's tokens."""
        return self.request.num_computed_tokens + self.num_new_tokens == self.request.num_tokens

    @property
    def samples(self) -> bool:
        """True when this step reaches the end of the request's tokens and a new token is sampled
        (not for a prompt-scoring request, max_tokens 0: it ends with its prefill)."""
        return self.reaches_end and self.request.params.max_tokens != 0


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int = 64, max_num_batched_tokens: int = 512,
                 max_model_len: int | None = None, eos_token_id: int | None = None) -> None:
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError(f"max_num_seqs ({max_num_seqs}) and max_num_batched_tokens "
                             f"({max_num_batched_tokens}) must be >= 1")
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.eos_token_id = eos_token_id
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.finished_ids: list[str] = []  # finished since the engine last collected them (`take_finished`)

    def add(self, req: Request) -> None:
        req.status = RequestStatus.WAITING
        self.waiting.append(req)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, req: Request) -> None:
        self.kv.free(req.request_id)
        req.num_computed_tokens = 0
        req.deferred_from = None  # recomputed from scratch: every layer
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            # deferred early-exit tokens still have to read their own windows
            frontier = req.num_computed_tokens if req.deferred_from is None else req.deferred_from
            self.kv.free_out_of_window(req.request_id, frontier)
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            draft = self._num_draft(req, budget) if n == 1 else 0
            # k drafts + the bonus row need k + 1 slots ahead; short of blocks it decodes plainly
            if draft and self.kv.allocate_slots(req.request_id, req.num_computed_tokens + draft + 1) is None:
                draft = 0
            while self.kv.allocate_slots(req.request_id, req.num_computed_tokens + n) is None:
                victim = self.running.pop()  # latest admitted; never one already scheduled (index < i)
                self._preempt(victim)
                out.preempted.append(victim.request_id)
                if victim is req:
                    break
            if req.status == RequestStatus.PREEMPTED:
                break
            out.scheduled.append(ScheduledRequest(req, n, draft))
            budget -= n + draft
            i += 1
        if out.preempted:  # memory is short: do not admit anyone new this step
            return out
        i = 0  # requests before i wait for a prefix block another request is computing
        while i < len(self.waiting) and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[i]
            matched = self.kv.prefix_caching and req.num_computed_tokens == 0
            if matched:
                m = self._match_prefix(req)
                if m is None:  # it takes that block from the cache once computed
                    i += 1
                    continue
                req.num_computed_tokens = m
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if self.kv.allocate_slots(req.request_id, req.num_computed_tokens + n) is None:
                if matched:  # give the matched blocks back; it waits from scratch
                    self.kv.free(req.request_id)
                    req.num_computed_tokens = 0
                break
            del self.waiting[i]
            if req.scheduled_time is None:
                req.scheduled_time = time.perf_counter()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.scheduled.append(ScheduledRequest(req, n))
            budget -= n
        return out

    def _match_prefix(self, req: Request) -> int | None:
        """Tokens of a request about to be admitted that cached blocks already hold (prefix
        caching), or None when its next block is being computed by a running request
        (it waits a step). Its last token is always computed (it gives the logits of the next
        one); a request with image embeddings never shares (its K/V depends on more than the
        ids), and one that scores its prompt shares only what it already scored before a
        preemption."""
        if req.prefix_embeds is not None:
            return 0
        limit = req.num_tokens - 1
        if req.params.prompt_logprobs is not None:
            limit = min(limit, len(req.prompt_logprobs))
        return self.kv.match_prefix(req.request_id, req.all_token_ids, limit, req.lora)

    def _num_draft(self, req: Request, budget: int) -> int:
        """Tokens a decoding request drafts this step: its `speculative_tokens`, clipped so that
        every token the step may emit (k + 1 with the bonus) fits its max_tokens, the model's
        context and the step's budget; 0 (a plain step) when only one token is left."""
        k = req.params.speculative_tokens or 0
        k = min(k, req.params.max_tokens - len(req.output_ids) - 1, budget - 1)
        if self.max_model_len:
            k = min(k, self.max_model_len - req.num_tokens - 1)
        return max(k, 0)

    # -------------------------------------------------------------- updates
    def update_from_output(self, so: SchedulerOutput, runner_output) -> list[EngineCoreOutput]:
        """Advance every scheduled request by the step the runner ran (`runner_output`: a
        `ModelRunnerOutput`, one sampled token per request that samples, in scheduled order);
        finish those that hit a token-level stop. One output per request that sampled, and one
        (without tokens) per prompt-scoring request that finished its prefill."""
        now = time.perf_counter()
        outs, row = [], 0
        scored = runner_output.prompt_logprobs
        for s in so.scheduled:
            req, samples, ends = s.request, s.samples, s.reaches_end  # (read before the tokens count as computed)
            req.num_computed_tokens += s.num_new_tokens
            self._record_blocks(req)
            if req.request_id in scored:
                req.prompt_logprobs += scored[req.request_id]
            if not samples:
                if ends and req.params.max_tokens == 0:  # a prompt-scoring request: done after its prefill
                    self.finish(req, FinishReason.LENGTH)
                    outs.append(EngineCoreOutput(req.request_id, [], None, FinishReason.LENGTH, None,
                                                 req.scheduled_time - req.arrival_time, req.prompt_logprobs))
                continue
            spec = runner_output.speculated.get(req.request_id)
            if spec is None:
                toks, lps = [runner_output.sampled_token_ids[row]], [runner_output.logprobs[row]]
            else:  # a speculative step: 1 .. k tokens, the first one's K/V is computed like a plain step's
                toks, lps = spec.token_ids, spec.logprobs
            row += 1
            first = req.first_token_time is None
            if first:
                req.first_token_time = now
            reason = stop_reason = None
            for k, tok in enumerate(toks):
                if k:  # the previous token's K/V (every layer) came from the verify pass
                    req.num_computed_tokens += 1
                req.output_ids.append(tok)
                req.exit_layers.append(runner_output.exit_layer)
                req.token_times.append(now)
                reason, stop_reason = self._check_stop(req, tok)
                if reason is not None:
                    toks, lps = toks[:k + 1], lps[:k + 1]
                    self.finish(req, reason, stop_reason)
                    break
            if spec is not None and reason is None:  # the verify pass computed the accepted drafts' K/V
                self._record_blocks(req)  # (a finished request recorded its blocks in `finish`)
            prompt_lps = req.prompt_logprobs if first and req.params.prompt_logprobs is not None else None
            outs.append(EngineCoreOutput(req.request_id, list(toks), None if lps[0] is None else list(lps), reason,
                                         stop_reason, req.scheduled_time - req.arrival_time if first else None,
                                         prompt_lps))
        return outs

    def _check_stop(self, req: Request, tok: int) -> tuple[FinishReason | None, int | None]:
        p = req.params
        if tok in p.stop_token_ids:  # stop_reason names the stop token asked for
            return FinishReason.STOP, tok
        if not p.ignore_eos and tok == self.eos_token_id:  # EOS: stop_reason None (OpenAI's / vLLM's shape)
            return FinishReason.STOP, None
        if len(req.output_ids) >= p.max_tokens or (self.max_model_len and req.num_tokens >= self.max_model_len):
            return FinishReason.LENGTH, None
        return None, None

    def _record_blocks(self, req: Request) -> None:
        """Prefix caching: make the request's newly computed full blocks shareable."""
        if self.kv.has_uncached(req.request_id, req.num_computed_tokens):
            self.kv.cache_computed(req.request_id, req.all_token_ids, req.num_computed_tokens)

    def finish(self, req: Request, reason: FinishReason, stop_reason: str | int | None = None) -> None:
        """Remove a request (finished or aborted) and give its blocks back (the full ones it
        computed stay cached for a later request, e.g. the conversation's next turn)."""
        self._record_blocks(req)
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.kv.free(req.request_id)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        req.stop_reason = stop_reason
        self.finished_ids.append(req.request_id)

    def take_finished(self) -> list[str]:
        """Ids of the requests finished since the last call (their per-request state elsewhere can go)."""
        out, self.finished_ids = self.finished_ids, []
        return out
