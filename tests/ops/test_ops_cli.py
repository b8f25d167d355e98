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


def test_forecast_quality_is_graded_against_naive_baselines(tmp_path, trace):
    """The plan reports MAPE at the horizon over the last origins, for the model and for the
    naive forecasts, recomputed here from the series itself."""
    from autoglm.ops.forecast import fit, forecast as forecast_from

    src = write(tmp_path, to_prometheus(trace))
    out = tmp_path / "plan.json"
    code, text = run(src, "--capacity", 200, "--horizon-minutes", 120, "--backtest-points", 10, "--out", out)
    assert code == 0, text
    plan = json.loads(out.read_text())
    q = plan["quality"]
    y, h, m = trace.values, 2, 24  # hourly steps: 120 min is 2 steps ahead; a daily season
    assert q["origins"] == 10 and q["horizon_steps"] == h
    origins = range(len(y) - h - 10, len(y) - h)
    actual = np.array([y[o + h] for o in origins])
    ref = lambda pred: round(float(np.mean(np.abs((actual - np.array(pred)) / actual)) * 100), 2)
    assert q["mape_pct"]["naive_last"] == ref([y[o] for o in origins])
    assert q["mape_pct"]["naive_seasonal"] == ref([y[o + h - m] for o in origins])
    # the model's forecasts from each origin's history (forecast() is checked against a
    # hand-written Holt-Winters recursion in test_forecast.py)
    model, _ = fit(y, m)
    assert q["mape_pct"]["model"] == ref([forecast_from(model, y[:o + 1], h)[-1] for o in origins])
    assert "MAPE at +2 step(s), last 10 points" in text and "last value" in text


def test_too_few_points_give_reactive_advice_with_a_warning(tmp_path):
    """Fewer points than any model needs: the advice is the reactive one, said so, never 0."""
    doc = to_prometheus(diurnal_trace(days=1, step_s=HOUR, seed=2))
    doc["data"]["result"][0]["values"] = doc["data"]["result"][0]["values"][-5:]
    out = tmp_path / "plan.json"
    code, text = run(write(tmp_path, doc), "--capacity", 100, "--out", out)
    assert code == 0, text
    plan = json.loads(out.read_text())
    last = float(doc["data"]["result"][0]["values"][-1][1])
    assert plan["replicas_predicted"] is None and plan["forecast"] == [] and plan["quality"] is None
    assert plan["replicas_recommended"] == plan["replicas_reactive"] == max(1, int(np.ceil(last / 80 - 1e-9)))
    assert "5 points are too few for a forecast (at least 12): the advice is reactive only" in text


def test_a_metric_that_stops_keeps_its_last_known_state(tmp_path, trace):
    """NaN at the end of the export (the metric stopped): not zero load; the advice is made
    from the last known point, with a warning naming when the data stopped."""
    doc = to_prometheus(trace)
    vals = doc["data"]["result"][0]["values"]
    for pair in vals[-3:]:
        pair[1] = "NaN"
    out = tmp_path / "plan.json"
    code, text = run(write(tmp_path, doc), "--capacity", 200, "--backtest-points", 0, "--out", out)
    assert code == 0, text
    plan = json.loads(out.read_text())
    assert plan["points"] == len(vals) - 3 and plan["last_load"] == float(vals[-4][1])
    assert plan["replicas_reactive"] == max(1, int(np.ceil(float(vals[-4][1]) / 160 - 1e-9)))
    assert any("the last 3 point(s) are missing" in w and "last known state" in w for w in plan["warnings"])


def test_per_pod_series_that_come_and_go_are_summed_as_promql_does(tmp_path, trace):
    """--match over per-pod series: a pod removed (or added) during the range counts 0
    outside its own span, as sum() in PromQL; the total is the sum of the pods that exist."""
    n = len(trace.values)
    times = trace.times
    half = trace.values / 2
    pods = {"a": range(0, n), "b": range(0, n - 24), "c": range(n - 24, n)}  # b scaled down, c replaced it
    result = [{"metric": {"__name__": "rate", "job": "autoglm", "pod": p},
               "values": [[float(times[i]), f"{half[i]:.6g}"] for i in idx]} for p, idx in pods.items()]
    doc = {"status": "success", "data": {"resultType": "matrix", "result": result}}
    out = tmp_path / "plan.json"
    code, text = run(write(tmp_path, doc), "--match", "job=autoglm", "--capacity", 200, "--backtest-points", 0,
                     "--out", out)
    assert code == 0, text
    plan = json.loads(out.read_text())
    assert plan["points"] == n and plan["last_load"] == pytest.approx(2 * float(f"{half[-1]:.6g}"))
    assert any("2 series start after or end before the range" in w for w in plan["warnings"])


def test_scrape_appends_whole_scrapes_and_refuses_what_is_not_metrics(tmp_path):
    """`ops scrape` against a local HTTP server: two /metrics bodies become two JSON lines that
    read back unchanged; an HTML page, a bad URL or a missing folder is an error and writes nothing."""
    import http.server
    import threading

    from autoglm.ops.series import read_scrapes

    bodies = {"/metrics": b"# TYPE autoglm_requests_total counter\nautoglm_requests_total{outcome=\"finished\"} 3.0\n",
              "/": b"<html><body>dashboard</body></html>"}
    calls = {"/flaky": 0}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/flaky":  # the second of three scrapes fails
                calls["/flaky"] += 1
                if calls["/flaky"] == 2:
                    self.send_error(503)
                    return
            body = bodies.get(self.path, bodies["/metrics"])
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        out = tmp_path / "m.jsonl"
        r = CliRunner().invoke(app, ["ops", "scrape", f"{base}/metrics", "--out", str(out), "--count", "2",
                                     "--interval", "0.1"])
        assert r.exit_code == 0, r.output
        got = read_scrapes(out)
        assert [text for _, text in got] == [bodies["/metrics"].decode()] * 2 and got[0][0] < got[1][0]
        flaky = tmp_path / "f.jsonl"
        r = CliRunner().invoke(app, ["ops", "scrape", f"{base}/flaky", "--out", str(flaky), "--count", "3",
                                     "--interval", "0.1"])
        text = " ".join(r.output.split())
        assert r.exit_code == 0 and "scrape 2 of 3 failed" in text and "2 scrape(s) appended" in text, text
        assert len(read_scrapes(flaky)) == 2  # the failure is a gap, not a zero and not the end
        html = tmp_path / "h.jsonl"
        r = CliRunner().invoke(app, ["ops", "scrape", f"{base}/", "--out", str(html)])
        assert r.exit_code == 2 and "not Prometheus text exposition" in r.output and not html.exists()
    finally:
        srv.shutdown()
    r = CliRunner().invoke(app, ["ops", "scrape", "localhost:8000/metrics", "--out", str(tmp_path / "x.jsonl")])
    assert r.exit_code == 2 and "is not an http(s) URL" in r.output
    r = CliRunner().invoke(app, ["ops", "scrape", f"{base}/metrics", "--out", str(tmp_path / "no" / "x.jsonl")])
    assert r.exit_code == 2 and "does not exist; create it first" in " ".join(r.output.split())


def test_no_seasonal_is_a_choice_not_a_warning(tmp_path, trace):
    out = tmp_path / "plan.json"
    code, text = run(write(tmp_path, to_prometheus(trace)), "--capacity", 200, "--no-seasonal", "--backtest-points", 0,
                     "--out", out)
    assert code == 0, text
    plan = json.loads(out.read_text())
    assert plan["model"].startswith("holt ") and plan["period_steps"] is None and plan["warnings"] == []
