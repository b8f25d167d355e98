"""The operations recipes: `autoglm ops forecast INPUT` and `autoglm ops canary`.

Reads a load series (a Prometheus `/api/v1/query_range` export, or `autoglm ops scrape`'s
JSON lines of the server's own `/metrics`), puts it on its step grid (short gaps
interpolated with a warning, long ones refused), fits Holt-Winters with the seasonal period
given or detected, forecasts `horizon_minutes` ahead and recommends a replica count from the
per-replica capacity (given, or the serving benchmark's tokens/s at a TPOT target) with
hysteresis. It only advises (a shadow mode): nothing is scaled.

`canary_step` compares the stable and the canary version's /metrics over one window (error
rate, latency p99) and promotes the canary to the next traffic weight, holds, or rolls it
back to 0, optionally writing the canary overlay's weights.yaml (`autoglm.ops.canary`).

Example:
    >>> from autoglm.settings import load_config
    >>> cfg = load_config(ForecastConfig, overrides={"input": "load.json", "capacity": "200",
    ...                                              "horizon_minutes": "15"})
    >>> cfg.period, cfg.max_gap, cfg.policy.min_replicas
    (None, 5, 1)
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..settings import section, setting

__all__ = ["ForecastConfig", "PolicyConfig", "load_series", "resolve_capacity", "forecast_load", "CanaryConfig",
           "canary_step"]

log = logging.getLogger(__name__)


@dataclass
class PolicyConfig:
    target_utilization: float = setting(0.8, "share of a replica's capacity to plan for (headroom for noise)")
    min_replicas: int = setting(1, "floor of the recommendation (>= 1: a live service never gets 0)")
    max_replicas: int = setting(100, "ceiling of the recommendation (a warning says when it binds)")
    scale_down_window_minutes: float = setting(15.0, "a lower count must hold this long before replicas are "
                                                     "removed (hysteresis); scale-up is immediate")


@dataclass
class ForecastConfig:
    input: Path | None = setting(None, "Prometheus /api/v1/query_range JSON export, or JSON lines of /metrics "
                                       "scrapes (autoglm ops scrape)", argument=True, required=True)
    format: Literal["auto", "prometheus", "scrapes"] = setting("auto", "input format; auto: by the file's first "
                                                                        "line")
    match: list[str] = setting([], "LABEL=VALUE a Prometheus series must have (repeatable); the matching series "
                                   "are summed")
    counter: str = setting("autoglm_generation_tokens_total", "scrapes: the counter whose rate is the load")
    load_unit: Literal["tokens/s", "requests/s"] = setting("tokens/s", "unit of the load series")
    step_s: float | None = setting(None, "grid step in seconds; none = the series' own (median spacing)")
    max_gap: int = setting(5, "longest gap (in steps) that is interpolated; a longer gap is an error, never zeros")
    horizon_minutes: float = setting(15.0, "how far ahead to forecast (cover the pod start-up time)")
    period: int | None = setting(None, "seasonal period in steps; none = detected from the autocorrelation")
    seasonal: bool = setting(True, "fit a season (Holt-Winters); false = Holt's trend model only")
    min_period_minutes: float = setting(60.0, "shortest seasonal period the detection considers")
    max_period_minutes: float = setting(7 * 24 * 60.0, "longest seasonal period the detection considers")
    capacity: float | None = setting(None, "load one replica serves at the latency target, in the load's unit; "
                                           "none = from --serving-results")
    serving_results: Path | None = setting(None, "benchmarks/serving.py results JSON: capacity = the best output "
                                                 "tokens/s whose TPOT p50 meets --tpot-target-ms")
    tpot_target_ms: float = setting(100.0, "latency target (time per output token, p50) for --serving-results")
    tokens_per_request: float | None = setting(None, "output tokens per request, to use a tokens/s capacity with a "
                                                     "requests/s load")
    current_replicas: int | None = setting(None, "replicas running now (only to word the advice)")
    out: Path | None = setting(None, "write the forecast and recommendation as JSON here (atomically)")
    policy: PolicyConfig = section(PolicyConfig, "replica policy")

    def __post_init__(self) -> None:
        if not self.horizon_minutes > 0:
            raise ValueError(f"horizon_minutes must be > 0, got {self.horizon_minutes}")
        if self.max_gap < 0:
            raise ValueError(f"max_gap must be >= 0 steps, got {self.max_gap}")
        if self.capacity is not None and not (math.isfinite(self.capacity) and self.capacity > 0):
            raise ValueError(f"capacity must be a finite number > 0 (load one replica serves), got {self.capacity}")
        if self.tokens_per_request is not None and not self.tokens_per_request > 0:
            raise ValueError(f"tokens_per_request must be > 0, got {self.tokens_per_request}")
        if self.step_s is not None and not self.step_s > 0:
            raise ValueError(f"step_s must be > 0 seconds, got {self.step_s}")


def load_series(cfg: ForecastConfig):
    """(the load Series on its regular grid, warnings)."""
    from ..ops.series import (read_prometheus_range, read_scrapes, regular_grid, scrape_rates, select,
                              MetricsError)

    path = Path(cfg.input)
    if not path.is_file():
        raise FileNotFoundError(f"metrics file {path} does not exist")
    fmt = cfg.format
    if fmt == "auto":
        with path.open(encoding="utf-8") as f:
            head = f.read(4096).lstrip()
        fmt = "scrapes" if head.startswith("{") and '"text"' in head.split("\n", 1)[0] else "prometheus"
    if fmt == "scrapes":
        if cfg.match:
            raise ValueError("--match selects Prometheus series; for scrapes choose the load with --counter")
        series = scrape_rates(read_scrapes(path), cfg.counter)
    else:
        match = {}
        for m in cfg.match:
            k, sep, v = m.partition("=")
            if not sep or not k.strip():
                raise ValueError(f"--match {m!r}: expected LABEL=VALUE")
            match[k.strip()] = v.strip()
        series = select(read_prometheus_range(path), match)
    grid, warnings = regular_grid(series, cfg.step_s, cfg.max_gap)
    if (grid.values < 0).any():
        raise MetricsError(f"{grid.name}: negative load values; export a rate (e.g. rate(...[1m])), not a delta")
    return grid, warnings  # the caller shows them (the CLI prints each as "warning: ...")


def resolve_capacity(cfg: ForecastConfig) -> tuple[float, str]:
    """(per-replica capacity in the load's unit, where it came from)."""
    from ..ops.replicas import capacity_from_serving

    if cfg.capacity is not None:
        return float(cfg.capacity), "--capacity"
    if cfg.serving_results is None:
        raise ValueError("give the per-replica capacity: --capacity (in the load's unit) or --serving-results "
                         "docs/results/serving.json with --tpot-target-ms")
    tok_s, row = capacity_from_serving(cfg.serving_results, cfg.tpot_target_ms)
    source = (f"{cfg.serving_results}: {row['system']} at concurrency {row['concurrency']}, {tok_s} output tokens/s, "
              f"TPOT p50 {row['tpot_p50_ms']} ms <= {cfg.tpot_target_ms} ms")
    if cfg.load_unit == "tokens/s":
        return tok_s, source
    if cfg.tokens_per_request is None:
        raise ValueError("the load is in requests/s and the capacity in tokens/s: give --tokens-per-request")
    return tok_s / cfg.tokens_per_request, source + f" / {cfg.tokens_per_request} tokens per request"


def forecast_load(cfg: ForecastConfig) -> dict[str, Any]:
    """Run the recipe: the forecast, the replica recommendation and every warning (a dict,
    also written to `cfg.out` when set)."""
    from ..atomic import atomic_write_text
    from ..ops.forecast import detect_period, fit, forecast
    from ..ops.replicas import ReplicaPolicy, plan_replicas
    from ..ops.series import iso

    capacity, capacity_source = resolve_capacity(cfg)
    p = cfg.policy
    series, warnings = load_series(cfg)
    step = float(series.times[1] - series.times[0])
    horizon = max(1, math.ceil(cfg.horizon_minutes * 60 / step - 1e-9))
    window = max(1, math.ceil(p.scale_down_window_minutes * 60 / step - 1e-9))
    policy = ReplicaPolicy(capacity, p.target_utilization, p.min_replicas, p.max_replicas, window)
    y = series.values
    period = cfg.period
    if cfg.seasonal and period is None:
        lo, hi = (max(2, round(m * 60 / step)) for m in (cfg.min_period_minutes, cfg.max_period_minutes))
        period = detect_period(y, lo, hi)
        if period is None:
            warnings.append(f"no seasonal period between {cfg.min_period_minutes:g} and {cfg.max_period_minutes:g} "
                            f"min found in {len(y)} points ({len(y) * step / 3600:.1f} h); give --period, or export "
                            "at least two seasons")
    model, fit_warnings = fit(y, period if cfg.seasonal else None)
    warnings += fit_warnings
    # the forecast at each of the last `window` origins, so the hysteresis sees the recent past
    origins = list(range(max(len(y) - window, model.period or 0, 12), len(y)))
    ahead = {o: forecast(model, y[:o + 1], horizon) for o in origins}
    plan = plan_replicas(y[origins[0]:], [ahead[o][-1] for o in origins], policy)
    final = plan[-1]
    path = ahead[len(y) - 1]
    peak = float(path.max())
    if policy.unclipped(max(peak, float(y[-1]))) > p.max_replicas:
        warnings.append(f"the load needs {policy.unclipped(max(peak, float(y[-1])))} replicas, more than "
                        f"max_replicas ({p.max_replicas}); the recommendation is capped")
    t_last = float(series.times[-1])
    out = {
        "series": series.name, "points": len(y), "step_s": step, "from": iso(series.times[0]), "to": iso(t_last),
        "load_unit": cfg.load_unit, "model": model.describe(), "period_steps": model.period,
        "horizon_steps": horizon, "last_load": float(y[-1]),
        "forecast": [{"time": iso(t_last + (i + 1) * step), "load": float(v)} for i, v in enumerate(path)],
        "capacity_per_replica": capacity, "capacity_source": capacity_source,
        "replicas_reactive": policy.needed(float(y[-1])), "replicas_predicted": policy.needed(float(path[-1])),
        "replicas_recommended": final, "current_replicas": cfg.current_replicas,
        "scale_down_window_steps": window, "warnings": warnings, "mode": "advice only (nothing is scaled)",
    }
    if cfg.out is not None:
        from ..settings import to_dict

        atomic_write_text(cfg.out, json.dumps({**out, "config": to_dict(cfg)}, indent=2, default=str) + "\n")
    return out


@dataclass
class CanaryConfig:
    stable: Path | None = setting(None, "scrapes of the stable version's /metrics over the window (autoglm ops "
                                        "scrape; JSON lines)", required=True)
    canary: Path | None = setting(None, "scrapes of the canary's /metrics over the same window", required=True)
    canary_weight: int = setting(10, "the canary's share of the traffic now (percent)")
    steps: tuple[int, ...] = setting((10, 25, 50, 100), "the promotion steps (percent), ending at 100")
    max_error_increase: float = setting(0.01, "roll back when the canary's error rate exceeds the stable one by this")
    max_p99_ratio: float = setting(1.2, "roll back when the canary's p99 latency exceeds the stable one times this")
    min_requests: int = setting(100, "hold until the canary has served this many requests in the window")
    weights_file: Path | None = setting(None, "write the decided weights here (the canary overlay's weights.yaml)")

    def __post_init__(self) -> None:
        if not 0 <= self.canary_weight <= 100:
            raise ValueError(f"canary_weight is a percentage, got {self.canary_weight}")
        if not self.max_p99_ratio >= 1:
            raise ValueError(f"max_p99_ratio must be >= 1, got {self.max_p99_ratio}")


WEIGHTS_YAML = """\
# The traffic split (percent; the two must add up to 100). Promotion steps: {steps}.
# Written by `autoglm ops canary`: {reason}
- op: replace
  path: /spec/http/0/route/0/weight
  value: {stable}   # stable
- op: replace
  path: /spec/http/0/route/1/weight
  value: {canary}   # canary
"""


def canary_step(cfg: CanaryConfig) -> dict[str, Any]:
    """Compare the two versions' windows; promote, hold or roll back (and write the weights)."""
    from ..atomic import atomic_write_text
    from ..ops.canary import decide, window_stats
    from ..ops.series import read_scrapes

    stable, canary = window_stats(read_scrapes(cfg.stable)), window_stats(read_scrapes(cfg.canary))
    d = decide(stable, canary, cfg.canary_weight, cfg.steps, cfg.max_error_increase, cfg.max_p99_ratio,
               cfg.min_requests)
    out = {"action": d.action, "canary_weight": d.canary_weight, "stable_weight": 100 - d.canary_weight,
           "reason": d.reason,
           "stable": {"requests": stable.requests, "error_rate": stable.error_rate, "p99_s": stable.p99_s},
           "canary": {"requests": canary.requests, "error_rate": canary.error_rate, "p99_s": canary.p99_s}}
    if cfg.weights_file is not None:
        atomic_write_text(cfg.weights_file, WEIGHTS_YAML.format(
            steps=", ".join(map(str, cfg.steps)), reason=f"{d.action} ({d.reason})", stable=100 - d.canary_weight,
            canary=d.canary_weight))
    return out
