"""Holt-Winters forecasting against a hand-written recursion, period detection on traces
with a known period, the fallbacks and errors of short or broken series."""

import numpy as np
import pytest

from autoglm.ops.forecast import Model, detect_period, fit, forecast, mape, naive_last, naive_seasonal, rolling_forecast
from autoglm.ops.trace import diurnal_trace


def holt_winters_loop(y, alpha, beta, gamma, phi, level, trend, season, h):
    """Additive damped-trend Holt-Winters (Hyndman & Athanasopoulos, FPP 7.3), one step at a
    time: s[t] is the seasonal term of y[t]; s[t + m] is written after y[t] is seen."""
    m = len(season)
    s = list(season)
    for t, yt in enumerate(y):
        new_level = alpha * (yt - s[t]) + (1 - alpha) * (level + phi * trend)
        s.append(gamma * (yt - level - phi * trend) + (1 - gamma) * s[t])
        trend = beta * (new_level - level) + (1 - beta) * phi * trend
        level = new_level
    n = len(y)
    assert h <= m
    return np.array([level + sum(phi ** i for i in range(1, k + 1)) * trend + s[n + k - 1] for k in range(1, h + 1)])


def test_forecast_matches_the_recursion_by_hand():
    from statsmodels.tsa.holtwinters import ExponentialSmoothing

    tr = diurnal_trace(days=3, step_s=1800, seed=1)  # period 48
    y = tr.values
    params = {"smoothing_level": 0.4, "smoothing_trend": 0.1, "smoothing_seasonal": 0.2, "damping_trend": 0.9}
    model = Model("holt-winters", 48, params, damped=True)
    got = forecast(model, y, horizon=5)
    # the initial states statsmodels' heuristic start gives; the recursion after them is ours
    res = ExponentialSmoothing(y, trend="add", damped_trend=True, seasonal="add", seasonal_periods=48,
                               initialization_method="heuristic").fit(optimized=False, **params)
    want = holt_winters_loop(y, 0.4, 0.1, 0.2, 0.9, res.params["initial_level"], res.params["initial_trend"],
                             res.params["initial_seasons"], 5)
    np.testing.assert_allclose(got, np.clip(want, 0, None), rtol=1e-9)
    np.testing.assert_allclose(rolling_forecast(model, y, [100, 120], 3),
                               [forecast(model, y[:101], 3)[-1], forecast(model, y[:121], 3)[-1]])


@pytest.mark.parametrize("seed", [0, 1])
def test_detect_period_finds_the_day(seed):
    tr = diurnal_trace(days=6, step_s=900, seed=seed)  # 96 steps a day
    assert detect_period(tr.values, min_period=4, max_period=400) == 96
    white = np.random.default_rng(seed).normal(100, 1, 400)
    assert detect_period(white, min_period=4, max_period=150) is None


def test_fit_estimates_a_season_and_forecasts_better_than_naive():
    tr = diurnal_trace(days=8, step_s=1800, seed=2)
    y = tr.values
    model, warns = fit(y[:48 * 7], 48)
    assert model.kind == "holt-winters" and warns == []
    origins = list(range(48 * 7, 48 * 8 - 1))
    hw = rolling_forecast(model, y, origins, 1)
    seasonal = [naive_seasonal(y, o, 1, 48) for o in origins]
    truth = y[[o + 1 for o in origins]]
    assert mape(truth, hw) < mape(truth, seasonal)


def test_short_series_falls_back_with_a_warning_and_too_short_is_an_error():
    y = diurnal_trace(days=1, step_s=1800).values  # 48 points: fewer than two seasons of 48
    model, warns = fit(y, 48)
    assert model.kind == "holt" and model.period is None
    assert "fewer than two seasons of 48" in warns[0] and "at least 106 steps" in warns[0]
    assert len(forecast(model, y, 3)) == 3
    with pytest.raises(ValueError, match="has 5 points; forecasting needs at least 12"):
        fit(y[:5], None)
    with pytest.raises(ValueError, match="NaN or infinite"):
        fit(np.r_[y[:20], np.nan], None)
    with pytest.raises(ValueError, match="period must be >= 2"):
        fit(y, 1)


def test_mape_and_naive_forecasts():
    assert mape([100, 200, 0], [110, 150, 5]) == pytest.approx((10 + 25) / 2)
    with pytest.raises(ValueError, match="every actual value is 0"):
        mape([0, 0], [1, 1])
    y = np.arange(10.0)
    assert naive_last(y, 5, 3) == 5.0 and naive_seasonal(y, 5, 3, 4) == 4.0
    with pytest.raises(ValueError, match="full season"):
        naive_seasonal(y, 1, 1, 4)
