"""`autoglm ops forecast` end to end on generated exports: the advice, the file it writes,
and every kind of bad input (malformed export, a gap, a series too short for the season,
an impossible capacity) as a clear error or an explicit warning, never 0 replicas."""

import json
import re

import numpy as np
import pytest
from typer.testing import CliRunner

from autoglm.cli import app
from autoglm.ops.trace import Burst, diurnal_trace, to_prometheus

HOUR = 3600


def write(tmp_path, doc, name="load.json"):
    p = tmp_path / name
    p.write_text(json.dumps(doc))
    return p


def run(*args):
    r = CliRunner().invoke(app, ["ops", "forecast", *map(str, args)])
    return r.exit_code, " ".join(r.output.split())


@pytest.fixture(scope="module")
def trace():
    return diurnal_trace(days=8, step_s=HOUR, peak=1000, trough=100, seed=3)


def test_forecast_advises_and_writes_json(tmp_path, trace):
    src = write(tmp_path, to_prometheus(trace))
    out = tmp_path / "plan.json"
    code, text = run(src, "--capacity", 200, "--current-replicas", 2, "--out", out)
    assert code == 0, text
    plan = json.loads(out.read_text())
    assert plan["period_steps"] == 24 and plan["model"].startswith("holt-winters")  # the daily period, detected
    assert plan["step_s"] == HOUR and plan["points"] == len(trace.values) and plan["warnings"] == []
    # the advice follows the rule: max(reactive, predicted) within the window, at least 1
    needed = lambda load: max(1, int(np.ceil(load / (200 * 0.8) - 1e-9)))
    assert plan["replicas_reactive"] == needed(trace.values[-1])
    assert plan["replicas_predicted"] == needed(plan["forecast"][-1]["load"])
    assert plan["replicas_recommended"] >= max(plan["replicas_reactive"], plan["replicas_predicted"]) >= 1
    assert re.search(rf"recommended replicas\W+{plan['replicas_recommended']}\b", text) and "advice only" in text
    assert plan["config"]["capacity"] == 200


def test_bad_inputs_are_named(tmp_path, trace):
    bad = tmp_path / "bad.json"
    bad.write_text('{"status": "success", "data": {"resultType": "vector", "result": []}}')
    code, text = run(bad, "--capacity", 200)
    assert code == 2 and "expected 'matrix'" in text
    gap = write(tmp_path, to_prometheus(trace, drop=slice(100, 110)), "gap.json")
    code, text = run(gap, "--capacity", 200)
    assert code == 2 and "a gap of 10 steps (600 min)" in text and "gaps are not zero load" in text
    for capacity in ("0", "-3", "nan"):
        code, text = run(write(tmp_path, to_prometheus(trace)), "--capacity", capacity)
        assert code == 2 and "capacity must be a finite number > 0" in text, text
    code, text = run(write(tmp_path, to_prometheus(trace)), "--capacity", 200, "--min-replicas", 0)
    assert code == 2 and "min_replicas must be >= 1 for a live service" in text
    code, text = run(write(tmp_path, to_prometheus(trace)))
    assert code == 2 and "give the per-replica capacity" in text


def test_short_series_warns_and_falls_back(tmp_path):
    short = diurnal_trace(days=1.5, step_s=HOUR, seed=4)  # 36 hourly points: less than two days
    src = write(tmp_path, to_prometheus(short))
    out = tmp_path / "plan.json"
    code, text = run(src, "--capacity", 200, "--period", 24, "--out", out)
    assert code == 0, text
    plan = json.loads(out.read_text())
    assert plan["model"].startswith("holt ") and "fewer than two seasons of 24" in plan["warnings"][0]
    assert "warning:" in text and plan["replicas_recommended"] >= 1


def test_short_gap_is_filled_and_reported(tmp_path, trace):
    src = write(tmp_path, to_prometheus(trace, drop=slice(50, 52)))
    out = tmp_path / "plan.json"
    code, text = run(src, "--capacity", 200, "--out", out)
    assert code == 0, text
    assert "2 missing point(s)" in json.loads(out.read_text())["warnings"][0] and "not zero" in text


def test_a_burst_in_progress_raises_the_advice(tmp_path):
    """Prediction only adds capacity: the advice never falls below what the observed load needs."""
    calm = diurnal_trace(days=8, step_s=15 * 60, seed=5)
    n = len(calm.values)
    ramp_start = (n - 3) * 15  # minutes: the last three points ramp up
    burst = diurnal_trace(days=8, step_s=15 * 60, seed=5, bursts=[Burst(start_min=ramp_start, ramp_min=60,
                                                                          hold_min=60, factor=4.0)])
    plans = []
    for name, tr in (("calm", calm), ("burst", burst)):
        out = tmp_path / f"{name}.json"
        code, text = run(write(tmp_path, to_prometheus(tr), f"{name}-load.json"), "--capacity", 100, "--period", 96,
                         "--out", out)
        assert code == 0, text
        plans.append(json.loads(out.read_text()))
    assert plans[1]["last_load"] > 2 * plans[0]["last_load"]
    for p in plans:
        assert p["replicas_recommended"] >= max(p["replicas_reactive"], p["replicas_predicted"])
    assert plans[1]["replicas_recommended"] > plans[0]["replicas_recommended"]
