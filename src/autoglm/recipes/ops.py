"""The operations recipes: `autoglm ops forecast INPUT` and `autoglm ops canary`.

Reads a load series (a Prometheus `/api/v1/query_range` export, or `autoglm ops scrape`'s
JSON lines of the server's own `/metrics`), puts it on its step grid (short gaps
interpolated with a warning, long ones refused), fits Holt-Winters with the seasonal period
given or detected, forecasts `horizon_minutes` ahead and recommends a replica count from the
per-replica capacity (given, or the serving benchmark's tokens/s at a TPOT target) with
hysteresis. The forecast is graded on the end of the history (MAPE at the horizon against the
naive last-value and seasonal forecasts); with fewer than 12 points the advice is reactive
only, with a warning. It only advises (a shadow mode): nothing is scaled.

`canary_step` compares the stable and the canary version's /metrics over one window (error
rate, latency p99) and promotes the canary to the next traffic weight, holds, or rolls it
back to 0, optionally writing the canary overlay's weights.yaml (`autoglm.ops.canary`); the
weight it starts from is the one that file applies, unless given.

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
           "read_weights", "canary_step"]

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
    backtest_points: int = setting(48, "forecasts graded at the end of the history (MAPE at the horizon against "
                                       "the naive last-value and seasonal forecasts); 0 = no grading")
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
        if self.backtest_points < 0:
            raise ValueError(f"backtest_points must be >= 0 (0: no grading), got {self.backtest_points}")
        if self.period is not None and self.period < 2:
            raise ValueError(f"period must be >= 2 steps (or none: detected), got {self.period}")
        if self.current_replicas is not None and self.current_replicas < 0:
            raise ValueError(f"current_replicas must be >= 0, got {self.current_replicas}")


def load_series(cfg: ForecastConfig):
    """(the load Series on its regular grid, warnings)."""
    from ..ops.series import (read_prometheus_range, read_scrapes, regular_grid, scrape_rates, select,
                              select_warnings, MetricsError)

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
    warnings = select_warnings(series) + warnings
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


def _min_history(model) -> int:
    """Points a forecast's history needs under `model` (Holt-Winters' heuristic start: two
    seasons and 10 points)."""
    from ..ops.forecast import MIN_POINTS

    return max(MIN_POINTS, 2 * model.period + 10) if model.period else MIN_POINTS


def _backtest(model, y, horizon: int, points: int, warnings: list[str]) -> dict[str, Any] | None:
    """Grade the forecast on the end of the history: at each of the last `points` origins o
    (with y[o + horizon] known), the forecast of y[o + horizon] from y[:o + 1] against the
    naive forecasts (the last value; the value one season before). The parameters are those
    fitted on the whole series; the states are re-run from each origin's history."""
    from ..ops.forecast import mape, naive_last, naive_seasonal, rolling_forecast

    if points == 0:
        return None
    first = max(_min_history(model) - 1, len(y) - horizon - points)
    origins = list(range(first, len(y) - horizon))
    if not origins:
        warnings.append(f"the forecast is not graded: {len(y)} points leave no origin with {horizon} step(s) of "
                        "known future after the history the model needs; export a longer range")
        return None
    actual = y[[o + horizon for o in origins]]
    if not (actual != 0).any():
        warnings.append("the forecast is not graded: the load was 0 at every graded point (MAPE is undefined)")
        return None
    preds = {"model": rolling_forecast(model, y, origins, horizon),
             "naive_last": [naive_last(y, o, horizon) for o in origins]}
    if model.period:
        preds["naive_seasonal"] = [naive_seasonal(y, o, horizon, model.period) for o in origins]
    errors = {k: round(mape(actual, v), 2) for k, v in preds.items()}
    if errors["model"] > errors["naive_last"]:
        warnings.append(f"over the last {len(origins)} point(s) the forecast's MAPE at +{horizon} step(s) "
                        f"({errors['model']}%) is worse than the last value's ({errors['naive_last']}%); the advice "
                        "still takes max(reactive, predicted), but check --period and the history")
    return {"origins": len(origins), "horizon_steps": horizon, "mape_pct": errors}


def forecast_load(cfg: ForecastConfig) -> dict[str, Any]:
    """Run the recipe: the forecast, the replica recommendation and every warning (a dict,
    also written to `cfg.out` when set)."""
    from ..atomic import atomic_write_text
    from ..ops.forecast import MIN_POINTS, detect_period, fit, forecast
    from ..ops.replicas import ReplicaPolicy, plan_replicas
    from ..ops.series import iso

    capacity, capacity_source = resolve_capacity(cfg)
    p = cfg.policy
    series, warnings = load_series(cfg)
    y = series.values
    if len(y) < 2:
        raise ValueError(f"{series.name}: {len(y)} known point(s); even the reactive advice needs a step (2 points): "
                         "export a longer range")
    step = float(series.times[1] - series.times[0])
    horizon = max(1, math.ceil(cfg.horizon_minutes * 60 / step - 1e-9))
    window = max(1, math.ceil(p.scale_down_window_minutes * 60 / step - 1e-9))
    policy = ReplicaPolicy(capacity, p.target_utilization, p.min_replicas, p.max_replicas, window)
    model, path, quality = None, None, None
    if len(y) < MIN_POINTS:
        warnings.append(f"{len(y)} points are too few for a forecast (at least {MIN_POINTS}): the advice is reactive "
                        "only (from the observed load); export a longer range for a predictive one")
        plan = plan_replicas(y[-window:], None, policy)
    else:
        period = cfg.period
        if cfg.seasonal and period is None:
            lo, hi = (max(2, round(m * 60 / step)) for m in (cfg.min_period_minutes, cfg.max_period_minutes))
            period = detect_period(y, lo, hi)
            if period is None:
                warnings.append(f"no seasonal period between {cfg.min_period_minutes:g} and "
                                f"{cfg.max_period_minutes:g} min found in {len(y)} points ({len(y) * step / 3600:.1f} "
                                "h); give --period, or export at least two seasons")
        model, fit_warnings = fit(y, period if cfg.seasonal else None)
        if not cfg.seasonal:  # asked for: no news
            fit_warnings = [w for w in fit_warnings if not w.startswith("no seasonal period given")]
        warnings += fit_warnings
        # the forecast at each of the last `window` origins, so the hysteresis sees the recent past
        origins = list(range(max(len(y) - window, _min_history(model) - 1), len(y)))
        ahead = {o: forecast(model, y[:o + 1], horizon) for o in origins}
        plan = plan_replicas(y[origins[0]:], [ahead[o][-1] for o in origins], policy)
        path = ahead[len(y) - 1]
        quality = _backtest(model, y, horizon, cfg.backtest_points, warnings)
    final = plan[-1]
    peak = max(float(path.max()) if path is not None else 0.0, float(y[-1]))
    if policy.unclipped(peak) > p.max_replicas:
        warnings.append(f"the load needs {policy.unclipped(peak)} replicas, more than max_replicas ({p.max_replicas}); "
                        "the recommendation is capped")
    t_last = float(series.times[-1])
    out = {
        "series": series.name, "points": len(y), "step_s": step, "from": iso(series.times[0]), "to": iso(t_last),
        "load_unit": cfg.load_unit, "model": model.describe() if model else "none (too few points: reactive only)",
        "period_steps": model.period if model else None, "horizon_steps": horizon, "last_load": float(y[-1]),
        "forecast": [] if path is None else [{"time": iso(t_last + (i + 1) * step), "load": float(v)}
                                             for i, v in enumerate(path)],
        "quality": quality,
        "capacity_per_replica": capacity, "capacity_source": capacity_source,
        "replicas_reactive": policy.needed(float(y[-1])),
        "replicas_predicted": None if path is None else policy.needed(float(path[-1])),
        "replicas_recommended": final, "current_replicas": cfg.current_replicas,
        "scale_down_window_steps": window, "warnings": warnings, "mode": "advice only (nothing is scaled)",
    }
    if cfg.out is not None:
        from ..settings import to_dict

        atomic_write_text(cfg.out, json.dumps({**out, "config": to_dict(cfg)}, indent=2, default=str) + "\n")
    return out


@dataclass
class CanaryConfig:
    stable: tuple[Path, ...] = setting((), "scrapes of the stable version's /metrics over the window (autoglm ops "
                                           "scrape; JSON lines), one file per pod: the pods' windows are summed",
                                       required=True)
    canary: tuple[Path, ...] = setting((), "scrapes of the canary's /metrics over the same window, one file per pod",
                                       required=True)
    canary_weight: int | None = setting(None, "the canary's share of the traffic now (percent); none = read from "
                                              "--weights-file (the weights applied), else 10")
    steps: tuple[int, ...] = setting((10, 25, 50, 100), "the promotion steps (percent), ending at 100")
    max_error_increase: float = setting(0.01, "roll back when the canary's error rate exceeds the stable one by this")
    max_p99_ratio: float = setting(1.2, "roll back when the canary's p99 latency exceeds the stable one times this")
    min_requests: int = setting(100, "hold until the canary has served this many requests in the window")
    weights_file: Path | None = setting(None, "write the decided weights here (the canary overlay's weights.yaml)")

    def __post_init__(self) -> None:
        if self.canary_weight is not None and not 0 <= self.canary_weight <= 100:
            raise ValueError(f"canary_weight is a percentage, got {self.canary_weight}")
        if not self.max_p99_ratio >= 1:
            raise ValueError(f"max_p99_ratio must be >= 1, got {self.max_p99_ratio}")
        if not 0 <= self.max_error_increase <= 1:
            raise ValueError(f"max_error_increase is a share of requests in [0, 1] (0.01 = 1 point), got "
                             f"{self.max_error_increase}")
        if self.min_requests < 1:
            raise ValueError(f"min_requests must be >= 1 (a canary that served nothing proves nothing), got "
                             f"{self.min_requests}")
        steps = list(self.steps)
        if not steps or steps != sorted(set(steps)) or steps[0] <= 0 or steps[-1] != 100:
            raise ValueError(f"steps must be increasing percentages in (0, 100] ending at 100, got {self.steps}")


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


def read_weights(path: Path) -> tuple[int, int]:
    """(stable, canary) percentages of a weights.yaml (the canary overlay's JSON patch)."""
    import yaml

    try:
        ops = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        found = {op["path"]: op["value"] for op in ops if isinstance(op, dict) and op.get("op") == "replace"}
        stable, canary = (found[f"/spec/http/0/route/{i}/weight"] for i in (0, 1))
    except (yaml.YAMLError, TypeError, KeyError):
        raise ValueError(f"{path}: not the canary overlay's weights file (JSON-patch replace ops on "
                         "/spec/http/0/route/0/weight and /1/weight); start from deploy/k8s/overlays/canary/"
                         "weights.yaml") from None
    if not (isinstance(stable, int) and isinstance(canary, int) and stable + canary == 100 and 0 <= canary <= 100):
        raise ValueError(f"{path}: the weights must be whole percentages that add up to 100, got stable {stable!r} "
                         f"and canary {canary!r}")
    return stable, canary


def canary_step(cfg: CanaryConfig) -> dict[str, Any]:
    """Compare the two versions' windows; promote, hold or roll back (and write the weights)."""
    from ..atomic import atomic_write_text
    from ..ops.canary import decide, window_stats
    from ..ops.series import MetricsError, read_scrapes

    for name in ("stable", "canary"):
        paths = [Path(p).resolve() for p in getattr(cfg, name)]
        if len(set(paths)) != len(paths):
            raise ValueError(f"--{name} names a file twice ({', '.join(map(str, getattr(cfg, name)))}); give each "
                             "pod's scrapes once")
        for path in map(Path, getattr(cfg, name)):
            if not path.is_file():
                raise FileNotFoundError(f"--{name} {path} does not exist; collect the {name} version's /metrics over "
                                        f"the window with: autoglm ops scrape http://<{name} pod>:8000/metrics --out "
                                        f"{path} --interval 60 --count 16")
    weight = cfg.canary_weight
    if cfg.weights_file is not None and Path(cfg.weights_file).exists():
        applied = read_weights(cfg.weights_file)[1]
        if weight is not None and weight != applied:
            raise ValueError(f"--canary-weight {weight} but {cfg.weights_file} routes {applied}% to the canary; drop "
                             "--canary-weight to use the file's weight, or correct the file")
        weight = applied
    weight = 10 if weight is None else weight
    windows = {}
    for name in ("stable", "canary"):
        pods = []
        for path in getattr(cfg, name):
            try:
                pods.append(read_scrapes(path))
                window_stats(pods[-1])  # checked pod by pod, so an error names its file
            except MetricsError as e:
                msg = str(e) if str(e).startswith(str(path)) else f"{path}: {e}"
                raise MetricsError(f"--{name} {msg}") from None
        try:
            windows[name] = window_stats(*pods)
        except MetricsError as e:
            raise MetricsError(f"--{name}: {e}") from None
    stable, canary = windows["stable"], windows["canary"]
    d = decide(stable, canary, weight, cfg.steps, cfg.max_error_increase, cfg.max_p99_ratio, cfg.min_requests)
    out = {"action": d.action, "previous_canary_weight": weight, "canary_weight": d.canary_weight,
           "stable_weight": 100 - d.canary_weight,
           "reason": d.reason,
           "stable": {"requests": stable.requests, "error_rate": stable.error_rate, "p99_s": stable.p99_s},
           "canary": {"requests": canary.requests, "error_rate": canary.error_rate, "p99_s": canary.p99_s}}
    if cfg.weights_file is not None:
        atomic_write_text(cfg.weights_file, WEIGHTS_YAML.format(
            steps=", ".join(map(str, cfg.steps)), reason=f"{d.action} ({d.reason})", stable=100 - d.canary_weight,
            canary=d.canary_weight))
    return out
