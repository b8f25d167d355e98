"""Canary promotion and rollback from the servers' own `/metrics`.

Each version's window is two or more scrapes of each of its pods' `/metrics` (`autoglm ops
scrape`, one file per pod): the counters' and histograms' increase between a pod's first and
last scrape, summed over the version's pods, is what the version served in the window. From it:

- error rate = (aborted + rejected requests) / all requests (`autoglm_requests_total` by
  outcome: a request the engine failed or the client dropped, one refused with 429/503);
- latency p99 = the 0.99 quantile of `autoglm_e2e_request_latency_seconds`, interpolated
  within its buckets as Prometheus' `histogram_quantile` does.

The rule: too few canary requests -> hold (wait for more traffic); a canary error rate
above the stable one by more than `max_error_increase`, or a p99 above `max_p99_ratio` times
the stable one -> roll back (weight 0); otherwise promote to the next weight step.

Example (buckets: 0.1 s holds 50 requests, 0.5 s 90, +Inf 100):
    >>> histogram_quantile(0.5, [(0.1, 50.0), (0.5, 90.0), (float("inf"), 100.0)])
    0.1
    >>> round(histogram_quantile(0.7, [(0.1, 50.0), (0.5, 90.0), (float("inf"), 100.0)]), 3)
    0.3
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from .series import MetricsError, _samples

__all__ = ["histogram_quantile", "WindowStats", "window_stats", "Decision", "decide"]

REQUESTS = "autoglm_requests_total"
E2E = "autoglm_e2e_request_latency_seconds"


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """The q-quantile of a cumulative histogram [(upper bound, count <= bound)], +Inf last,
    linearly interpolated inside the bucket it falls in (the lowest bucket from 0); a
    quantile in the +Inf bucket is the highest finite bound (Prometheus' convention)."""
    if not 0 <= q <= 1:
        raise ValueError(f"quantile must be in [0, 1], got {q}")
    buckets = sorted(buckets)
    if not buckets or not math.isinf(buckets[-1][0]):
        raise MetricsError("a histogram needs its +Inf bucket")
    total = buckets[-1][1]
    if total <= 0:
        return math.nan
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return prev_bound
            if count == prev_count:
                return bound
            return prev_bound + (bound - prev_bound) * (rank - prev_count) / (count - prev_count)
        prev_bound, prev_count = bound, count
    return prev_bound


@dataclass
class WindowStats:
    requests: float
    errors: float
    p99_s: float

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else math.nan


def _pod_window(scrapes: list[tuple[float, str]]) -> tuple[dict[str, float], dict[float, float]]:
    """One pod's increase over its window: requests by outcome, and the e2e histogram's
    cumulative bucket counts by upper bound."""
    if len(scrapes) < 2:
        raise MetricsError(f"{len(scrapes)} scrape(s); a window needs a first and a last one")
    first, last = _samples(scrapes[0][1]), _samples(scrapes[-1][1])

    def delta(name: str, **labels: str) -> float:
        def total(samples):
            return sum(v for (n, lab), v in samples.items()
                       if n == name and all(dict(lab).get(k) == x for k, x in labels.items()))
        d = total(last) - total(first)
        if d < 0:
            raise MetricsError(f"{name} went down between the first and the last scrape: a restart, or scrapes of "
                               "different pods (a Service URL); scrape one pod's /metrics over a window without a "
                               "restart")
        return d

    if not any(n == REQUESTS for n, _ in last):
        raise MetricsError(f"no {REQUESTS} in the scrapes; are these the server's /metrics?")
    by_outcome = {o: delta(REQUESTS, outcome=o) for o in ("finished", "aborted", "rejected")}
    les = {dict(lab)["le"] for n, lab in last if n == E2E + "_bucket"}  # as the server wrote them
    return by_outcome, {float(le): delta(E2E + "_bucket", le=le) for le in les}


def window_stats(scrapes: list[tuple[float, str]], *more_pods: list[tuple[float, str]]) -> WindowStats:
    """What a version served over the window: each pod's increase between its own first and
    last scrape, summed over the pods (one scrapes list per pod); the p99 of the summed
    histogram, as `histogram_quantile(0.99, sum by (le) (increase(...)))` gives."""
    outcomes: dict[str, float] = {}
    buckets: dict[float, float] = {}
    for pod in (scrapes, *more_pods):
        by_outcome, pod_buckets = _pod_window(pod)
        for k, v in by_outcome.items():
            outcomes[k] = outcomes.get(k, 0.0) + v
        if buckets and pod_buckets and set(pod_buckets) != set(buckets):
            raise MetricsError(f"the pods' {E2E} buckets differ ({sorted(buckets)} and {sorted(pod_buckets)}); "
                               "compare pods of one server version")
        for le, v in pod_buckets.items():
            buckets[le] = buckets.get(le, 0.0) + v
    p99 = histogram_quantile(0.99, list(buckets.items())) if buckets else math.nan
    return WindowStats(sum(outcomes.values()), outcomes["aborted"] + outcomes["rejected"], p99)


@dataclass
class Decision:
    action: Literal["promote", "hold", "rollback"]
    canary_weight: int
    reason: str


def decide(stable: WindowStats, canary: WindowStats, current_weight: int,
           steps: tuple[int, ...] = (10, 25, 50, 100), max_error_increase: float = 0.01,
           max_p99_ratio: float = 1.2, min_requests: int = 100) -> Decision:
    """The next canary weight (percent of traffic) from the two versions' windows."""
    if not 0 <= current_weight <= 100:
        raise ValueError(f"the canary weight is a percentage, got {current_weight}")
    if list(steps) != sorted(steps) or not steps or steps[-1] != 100:
        raise ValueError(f"steps must increase and end at 100, got {steps}")
    if canary.requests < max(min_requests, 1):  # no request, no evidence: never promote on nothing
        return Decision("hold", current_weight, f"the canary served {canary.requests:.0f} requests, fewer than "
                                                f"{max(min_requests, 1)}: wait for more traffic")
    if canary.error_rate > (stable.error_rate if stable.requests else 0.0) + max_error_increase:
        return Decision("rollback", 0, f"canary error rate {canary.error_rate:.2%} > stable "
                                       f"{stable.error_rate:.2%} + {max_error_increase:.2%}")
    if math.isfinite(stable.p99_s) and math.isfinite(canary.p99_s) and canary.p99_s > max_p99_ratio * stable.p99_s:
        return Decision("rollback", 0, f"canary latency p99 {canary.p99_s:.3g} s > {max_p99_ratio:g} x stable "
                                       f"{stable.p99_s:.3g} s")
    nxt = next((s for s in steps if s > current_weight), 100)
    return Decision("promote", nxt, f"error rate {canary.error_rate:.2%} (stable {stable.error_rate:.2%}), p99 "
                                    f"{canary.p99_s:.3g} s (stable {stable.p99_s:.3g} s)")
