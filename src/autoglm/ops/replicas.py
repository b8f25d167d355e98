"""Replica counts from load: the per-replica capacity measured by the serving benchmark, a
target utilisation, and hysteresis so that a forecast's wiggle does not flap the fleet.

The rule (what predictive autoscalers such as Crane and KEDA's predictive scalers do):

    needed(load)  = ceil(load / (capacity * target_utilization)), within [min, max]
    desired_t     = max(needed(observed load_t), needed(forecast load_t+h))   prediction only adds
    replicas_t    = max(desired over the last `scale_down_window` steps)      scale up at once,
                                                                              down only after a calm window

`min_replicas` is at least 1: a live service never gets 0 (scale to zero is the Knative
variant's business, with its own cold-start budget).

Example (capacity 100 tokens/s at 80% target: 80 tokens/s per replica):
    >>> policy = ReplicaPolicy(capacity=100.0, scale_down_window=3)
    >>> policy.needed(0.0), policy.needed(80.0), policy.needed(81.0)
    (1, 1, 2)
    >>> plan_replicas([100, 100, 100, 100, 100, 10, 10, 10, 10], [100, 100, 300, 300, 100, 10, 10, 10, 10], policy)
    [2, 2, 4, 4, 4, 4, 2, 1, 1]
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ReplicaPolicy", "plan_replicas", "capacity_from_serving"]


@dataclass(frozen=True)
class ReplicaPolicy:
    """capacity: the load one replica serves at the latency target (in the load's unit, e.g.
    output tokens/s); target_utilization: the share of it to plan for (headroom for noise);
    scale_down_window: steps a lower count must hold before replicas are removed."""

    capacity: float
    target_utilization: float = 0.8
    min_replicas: int = 1
    max_replicas: int = 100
    scale_down_window: int = 3

    def __post_init__(self) -> None:
        if not (isinstance(self.capacity, (int, float)) and math.isfinite(self.capacity) and self.capacity > 0):
            raise ValueError(f"capacity per replica must be a finite number > 0 (load units one replica serves at "
                             f"the latency target), got {self.capacity!r}; measure it with benchmarks/serving.py")
        if not 0 < self.target_utilization <= 1:
            raise ValueError(f"target_utilization must be in (0, 1], got {self.target_utilization}")
        if self.min_replicas < 1:
            raise ValueError(f"min_replicas must be >= 1 for a live service, got {self.min_replicas}; scale to zero "
                             "is the Knative variant's (deploy/overlays/knative), not a recommendation")
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) must be >= min_replicas ({self.min_replicas})")
        if self.scale_down_window < 1:
            raise ValueError(f"scale_down_window must be >= 1 step, got {self.scale_down_window}")

    def needed(self, load: float) -> int:
        """Replicas that serve `load` at the target utilisation, clipped to [min, max]."""
        if not math.isfinite(load) or load < 0:
            raise ValueError(f"load must be a finite number >= 0, got {load!r}")
        n = math.ceil(load / (self.capacity * self.target_utilization) - 1e-9)
        return int(min(max(n, self.min_replicas), self.max_replicas))

    def unclipped(self, load: float) -> int:
        """Replicas `load` would need without the max_replicas cap (to warn when it binds)."""
        return max(math.ceil(load / (self.capacity * self.target_utilization) - 1e-9), self.min_replicas)


def plan_replicas(observed, predicted, policy: ReplicaPolicy) -> list[int]:
    """Replicas at each step from the observed load and the load forecast for the step the
    new replicas would be ready (None entries: no forecast, reactive only)."""
    observed = list(observed)
    predicted = list(predicted) if predicted is not None else [None] * len(observed)
    if len(predicted) != len(observed):
        raise ValueError(f"observed ({len(observed)}) and predicted ({len(predicted)}) must have one value per step")
    desired = [max(policy.needed(float(o)), policy.needed(float(p)) if p is not None else 0)
               for o, p in zip(observed, predicted)]
    w = policy.scale_down_window
    return [max(desired[max(0, t - w + 1):t + 1]) for t in range(len(desired))]


def capacity_from_serving(path: str | Path, tpot_target_ms: float,
                          system: str = "HTTP (autoglm serve, streaming)") -> tuple[float, dict[str, Any]]:
    """The highest output tokens/s of `system` in the serving benchmark's results (JSON) among
    its concurrency levels whose TPOT p50 meets `tpot_target_ms`; (capacity, the row used)."""
    path = Path(path)
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))["rows"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ValueError(f"{path}: not the serving benchmark's results (a JSON object with 'rows'); run "
                         "benchmarks/serving.py") from None
    mine = [r for r in rows if r.get("system") == system]
    if not mine:
        raise ValueError(f"{path}: no rows of system {system!r}; it has {sorted({r.get('system') for r in rows})}")
    ok = [r for r in mine if r.get("tpot_p50_ms") is not None and r["tpot_p50_ms"] <= tpot_target_ms]
    if not ok:
        best = min(r["tpot_p50_ms"] for r in mine)
        raise ValueError(f"{path}: no concurrency of {system!r} meets a TPOT p50 of {tpot_target_ms} ms (the best is "
                         f"{best} ms); relax the latency target or measure a faster configuration")
    row = max(ok, key=lambda r: r["out_tok_s"])
    return float(row["out_tok_s"]), row
