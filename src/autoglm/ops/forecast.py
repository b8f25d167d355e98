"""Load forecasting with statsmodels' Holt-Winters exponential smoothing.

`detect_period` finds the seasonal period from the autocorrelation function; `fit` estimates
the smoothing parameters of an additive Holt-Winters model (damped additive trend, additive
season) and falls back, with a warning, to Holt's damped-trend model when the history holds
fewer than two seasons; `forecast` runs a fitted model's filter over a (longer) history with
its parameters kept, so a rolling evaluation re-estimates nothing per step. `mape` and the
two naive baselines (last value; the value one season ago) grade the forecast.

Example (a pure daily pattern of 5-minute steps is forecast almost exactly):
    >>> import numpy as np
    >>> t = np.arange(288 * 4)
    >>> y = 100 + 50 * np.sin(2 * np.pi * t / 288)
    >>> detect_period(y, min_period=12, max_period=600)
    288
    >>> model, warnings = fit(y, period=288)
    >>> model.kind, warnings
    ('holt-winters', [])
    >>> ahead = forecast(model, y, horizon=3)
    >>> truth = 100 + 50 * np.sin(2 * np.pi * np.arange(len(y), len(y) + 3) / 288)
    >>> bool(np.abs(ahead - truth).max() < 1.0)
    True
"""

from __future__ import annotations

import logging
import warnings as pywarnings
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

__all__ = ["Model", "detect_period", "fit", "forecast", "rolling_forecast", "mape", "naive_last", "naive_seasonal", "MIN_POINTS"]

log = logging.getLogger(__name__)

MIN_POINTS = 12  # below this no model's parameters mean anything


@dataclass
class Model:
    """A fitted exponential-smoothing model: its kind, season and smoothing parameters."""

    kind: Literal["holt-winters", "holt"]
    period: int | None
    params: dict[str, float] = field(default_factory=dict)
    damped: bool = True

    def describe(self) -> str:
        p = ", ".join(f"{k.replace('smoothing_', '')} {v:.3f}" for k, v in self.params.items())
        season = f"period {self.period} steps" if self.period else "no season"
        return f"{self.kind} ({'damped ' if self.damped else ''}additive trend, {season}; {p})"


def _check(values: np.ndarray, what: str = "series") -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"the {what} must be one-dimensional, got shape {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError(f"the {what} has NaN or infinite values; put it on a regular grid first "
                         "(autoglm.ops.series.regular_grid fills short gaps, refuses long ones)")
    if len(values) < MIN_POINTS:
        raise ValueError(f"the {what} has {len(values)} points; forecasting needs at least {MIN_POINTS}")
    return values


def detect_period(values, min_period: int = 2, max_period: int | None = None, min_acf: float = 0.3) -> int | None:
    """The seasonal period, or None. Coarse: the lag in [min_period, max_period] (at most a
    third of the series) with the highest local peak of the autocorrelation, at least
    `min_acf`. Fine: within 5% of it, the lag L with the smallest mean |y[t] - y[t - L]|
    (the autocorrelation of a drifting series decays with the lag, which pulls its peak a
    little short of the true period; the seasonal difference has no such pull)."""
    from statsmodels.tsa.stattools import acf

    values = _check(values)
    top = len(values) // 3 if max_period is None else min(max_period, len(values) // 3)
    if top <= min_period:
        return None
    r = acf(values - values.mean(), nlags=top + 1, fft=True)
    best, best_r = None, min_acf
    for lag in range(max(min_period, 1), top + 1):
        if r[lag] > best_r and r[lag] >= r[lag - 1] and r[lag] >= r[lag + 1]:
            best, best_r = lag, r[lag]
    if best is None:
        return None
    span = max(1, round(0.05 * best))
    cands = range(max(min_period, best - span), min(top, best + span) + 1)
    return min(cands, key=lambda lag: float(np.mean(np.abs(values[lag:] - values[:-lag]))))


def _model(values: np.ndarray, kind: str, period: int | None, damped: bool):
    from statsmodels.tsa.holtwinters import ExponentialSmoothing

    if kind == "holt-winters":
        return ExponentialSmoothing(values, trend="add", damped_trend=damped, seasonal="add",
                                    seasonal_periods=period, initialization_method="heuristic")
    return ExponentialSmoothing(values, trend="add", damped_trend=damped, initialization_method="estimated")


def fit(values, period: int | None, damped: bool = True) -> tuple[Model, list[str]]:
    """Estimate a model on `values`; (model, warnings). Holt-Winters needs two full seasons
    (and statsmodels' heuristic start, 10 points more); with fewer, or no period, Holt's
    damped-trend model is fitted instead and a warning says so."""
    values = _check(values)
    warns: list[str] = []
    kind = "holt-winters"
    if period is None:
        kind = "holt"
        warns.append("no seasonal period given or detected: fitting Holt's trend model without a season")
    elif period < 2:
        raise ValueError(f"the seasonal period must be >= 2 steps, got {period}")
    elif len(values) < 2 * period + 10:
        kind = "holt"
        warns.append(f"the series has {len(values)} points, fewer than two seasons of {period} (+10) that "
                     "Holt-Winters needs: falling back to Holt's trend model without a season; export a "
                     f"longer range (at least {2 * period + 10} steps) for a seasonal forecast")
    with pywarnings.catch_warnings():
        pywarnings.simplefilter("ignore")  # statsmodels' convergence chatter; the result is checked below
        res = _model(values, kind, period, damped).fit()
    names = ["smoothing_level", "smoothing_trend"] + (["smoothing_seasonal"] if kind == "holt-winters" else [])
    names += ["damping_trend"] if damped else []
    params = {k: float(res.params[k]) for k in names}
    if not all(np.isfinite(v) for v in params.values()):
        raise ValueError(f"the {kind} fit did not converge (parameters {params}); check the series for outliers")
    for w in warns:
        log.debug(w)  # returned to the caller, who shows it
    return Model(kind, period if kind == "holt-winters" else None, params, damped), warns


def forecast(model: Model, history, horizon: int) -> np.ndarray:
    """The `horizon` values after `history` under `model`'s parameters (states re-run over
    `history`, nothing re-estimated), clipped at 0 (load is never negative)."""
    history = _check(history, "history")
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1 step, got {horizon}")
    with pywarnings.catch_warnings():
        pywarnings.simplefilter("ignore")
        res = _model(history, model.kind, model.period, model.damped).fit(optimized=False, **model.params)
    return np.clip(np.asarray(res.forecast(horizon), dtype=np.float64), 0.0, None)


def rolling_forecast(model: Model, values, origins, horizon: int, window: int | None = None) -> np.ndarray:
    """For each origin o, the forecast of values[o + horizon] made from values[:o + 1] (its
    last `window` points when given: the filter's cost grows with the history), with
    `model`'s parameters. What a forecaster running every step would have said."""
    values = _check(values)
    out = []
    for o in origins:
        lo = 0 if window is None else max(0, o + 1 - window)
        out.append(forecast(model, values[lo:o + 1], horizon)[-1])
    return np.asarray(out)


def mape(actual, predicted) -> float:
    """Mean absolute percentage error (%), over the points whose actual value is not 0."""
    a, p = np.asarray(actual, dtype=np.float64), np.asarray(predicted, dtype=np.float64)
    keep = a != 0
    if not keep.any():
        raise ValueError("MAPE is undefined: every actual value is 0")
    return float(np.mean(np.abs((a[keep] - p[keep]) / a[keep])) * 100)


def naive_last(values, origin: int, horizon: int) -> float:
    """The naive forecast of values[origin + horizon]: the last value seen, values[origin]."""
    return float(values[origin])


def naive_seasonal(values, origin: int, horizon: int, period: int) -> float:
    """The seasonal-naive forecast of values[origin + horizon]: the value one season before it."""
    if origin + horizon - period < 0:
        raise ValueError(f"seasonal-naive needs a full season ({period} steps) of history before the target")
    return float(values[origin + horizon - period])
