"""Synthetic load traces for evaluating the forecaster: a daily (diurnal) pattern with a
weekly dip, day-to-day amplitude drift, autocorrelated multiplicative noise, and promotion
bursts that ramp up over tens of minutes (a campaign spreading), hold, then decay.

`to_prometheus` writes a trace as the JSON `/api/v1/query_range` returns, so the CLI and the
benchmark read it through the same parser as a real export.

Example:
    >>> tr = diurnal_trace(days=2, step_s=300, seed=0)
    >>> len(tr.values), tr.step_s, bool((tr.values > 0).all())
    (576, 300, True)
    >>> tr = diurnal_trace(days=2, step_s=300, bursts=[Burst(start_min=1800, ramp_min=30, hold_min=60, factor=3.0)])
    >>> bool(tr.values[1800 // 5 + 6 + 3] > 2 * tr.base[1800 // 5 + 6 + 3])
    True
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Burst", "Trace", "diurnal_trace", "to_prometheus"]


@dataclass(frozen=True)
class Burst:
    """A promotion: from `start_min` (minutes since the trace's start) the load multiplier
    rises linearly to `factor` over `ramp_min`, holds `hold_min`, then decays over `ramp_min`."""

    start_min: float
    ramp_min: float = 30.0
    hold_min: float = 60.0
    factor: float = 3.0

    def multiplier(self, minutes: np.ndarray) -> np.ndarray:
        up = np.clip((minutes - self.start_min) / self.ramp_min, 0, 1)
        down = np.clip((minutes - self.start_min - self.ramp_min - self.hold_min) / self.ramp_min, 0, 1)
        return 1 + (self.factor - 1) * (up - down)


@dataclass
class Trace:
    step_s: int
    start: float  # unix seconds of the first point
    values: np.ndarray  # the load (e.g. output tokens/s)
    base: np.ndarray  # the same without bursts
    bursts: list[Burst] = field(default_factory=list)

    @property
    def times(self) -> np.ndarray:
        return self.start + self.step_s * np.arange(len(self.values))


def diurnal_trace(days: int = 8, step_s: int = 300, peak: float = 1000.0, trough: float = 150.0,
                  bursts: list[Burst] | None = None, noise: float = 0.06, seed: int = 0,
                  start: float = 1_796_083_200.0) -> Trace:
    """`days` of load at `step_s` spacing: a smooth daily curve between `trough` (about 04:00)
    and `peak` (about 15:00, with an evening shoulder), weekends at 70%, each day's amplitude
    drifting a few percent, AR(1) multiplicative noise of std `noise`, then the bursts.
    `start`: 2026-12-01T00:00Z by default (a Tuesday)."""
    rng = np.random.default_rng(seed)
    n = int(days * 86400 / step_s)
    minutes = np.arange(n) * step_s / 60
    hour = (minutes / 60) % 24
    shape = 0.5 - 0.5 * np.cos(2 * np.pi * (hour - 4) / 24)  # 0 at 04:00, 1 at 16:00
    shape = np.clip(shape + 0.25 * np.exp(-((hour - 20.5) ** 2) / 2.0), 0, None)  # the evening shoulder
    shape /= shape.max()
    day = (minutes // 1440).astype(int)
    weekday = (day + 1) % 7  # 2026-12-01 is a Tuesday (0 = Monday)
    weekend = np.where(weekday >= 5, 0.7, 1.0)
    drift = np.exp(rng.normal(0, 0.04, day.max() + 1))[day]
    base = (trough + (peak - trough) * shape) * weekend * drift
    eps = np.zeros(n)
    phi = 0.8
    shocks = rng.normal(0, noise * np.sqrt(1 - phi ** 2), n)
    for i in range(1, n):  # AR(1): noise that persists for a few steps, as real traffic does
        eps[i] = phi * eps[i - 1] + shocks[i]
    base = base * np.exp(eps)
    mult = np.ones(n)
    for b in bursts or []:
        mult *= b.multiplier(minutes)
    return Trace(step_s, start, base * mult, base, list(bursts or []))


def to_prometheus(trace: Trace, metric: dict[str, str] | None = None, drop: slice | None = None) -> dict[str, Any]:
    """The trace as a `/api/v1/query_range` answer; `drop`: indices left out (a scrape gap)."""
    keep = np.ones(len(trace.values), dtype=bool)
    if drop is not None:
        keep[drop] = False
    values = [[float(t), f"{v:.6g}"] for t, v, k in zip(trace.times, trace.values, keep) if k]
    return {"status": "success", "data": {"resultType": "matrix", "result": [
        {"metric": metric or {"__name__": "autoglm:generation_tokens:rate1m", "job": "autoglm"}, "values": values}]}}
