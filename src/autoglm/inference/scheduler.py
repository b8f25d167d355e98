"""Continuous-batching scheduler: who runs this step and with how many tokens.

Every step, under a token budget (`max_num_batched_tokens`) and a cap on running requests
(`max_num_seqs`):

1. running requests first, in arrival order: each gets min(tokens it still lacks K/V for,
   budget left) - one token for a decoding request, a chunk for one still in prefill;
2. if the KV-cache manager cannot give a running request its slots, the most recently
   admitted running request is preempted (its blocks freed, `num_computed_tokens` reset
   to 0, put back at the head of the queue to be recomputed later);
3. then waiting requests are admitted while budget, sequence slots and blocks last.

Prefill chunks and decode tokens therefore share one batch. The scheduler talks to the
KV-cache manager only through `allocate_slots` / `free_out_of_window` / `free`.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from .kv_cache_manager import KVCacheManager
from .request import FinishReason, Request, RequestStatus

__all__ = ["Scheduler", "SchedulerOutput", "ScheduledRequest"]


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int  # K/V to compute this step: positions [num_computed, num_computed + n)

    @property
    def samples(self) -> bool:
        """True when this step reaches the end of the request's tokens, so a new token is sampled."""
        return self.request.num_computed_tokens + self.num_new_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int = 64, max_num_batched_tokens: int = 512) -> None:
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError(f"max_num_seqs ({max_num_seqs}) and max_num_batched_tokens "
                             f"({max_num_batched_tokens}) must be >= 1")
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

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
            while self.kv.allocate_slots(req.request_id, req.num_computed_tokens + n) is None:
                victim = self.running.pop()  # latest admitted; never one already scheduled (index < i)
                self._preempt(victim)
                out.preempted.append(victim.request_id)
                if victim is req:
                    break
            if req.status == RequestStatus.PREEMPTED:
                break
            out.scheduled.append(ScheduledRequest(req, n))
            budget -= n
            i += 1
        if out.preempted:  # memory is short: do not admit anyone new this step
            return out
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if self.kv.allocate_slots(req.request_id, req.num_computed_tokens + n) is None:
                break
            self.waiting.popleft()
            if req.scheduled_time is None:
                req.scheduled_time = time.perf_counter()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.scheduled.append(ScheduledRequest(req, n))
            budget -= n
        return out

    def finish(self, req: Request, reason: FinishReason, stop_reason: str | int | None = None) -> None:
        """Remove a request (finished or aborted) and give its blocks back."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.kv.free(req.request_id)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        req.stop_reason = stop_reason
