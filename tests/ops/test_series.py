"""Metrics parsing: Prometheus range exports and /metrics scrapes, checked against values
computed by hand; malformed input and gaps give errors or warnings that say what to do."""

import json

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest

from autoglm.ops.series import (MetricsError, Series, parse_prometheus_range, read_prometheus_range, read_scrapes,
                                regular_grid, scrape_rates, select, select_warnings)


def export(*series):
    return {"status": "success", "data": {"resultType": "matrix", "result": [
        {"metric": m, "values": [[t, str(v)] for t, v in pts]} for m, pts in series]}}


def test_parse_and_select_sums_matching_series():
    doc = export(({"__name__": "rate", "pod": "a", "job": "autoglm"}, [(0, 1), (60, 2), (120, 3)]),
                 ({"__name__": "rate", "pod": "b", "job": "autoglm"}, [(0, 10), (60, "NaN"), (120, 30)]),
                 ({"__name__": "rate", "pod": "c", "job": "other"}, [(0, 100), (60, 100), (120, 100)]))
    series = parse_prometheus_range(doc)
    assert [s.labels["pod"] for s in series] == ["a", "b", "c"]
    total = select(series, {"job": "autoglm"})
    assert total.times.tolist() == [0, 60, 120]
    assert total.values[0] == 11 and np.isnan(total.values[1]) and total.values[2] == 33  # NaN stays missing
    assert select(series, {"pod": "c"}).values.tolist() == [100, 100, 100]
    with pytest.raises(MetricsError, match="no series has the labels"):
        select(series, {"job": "nope"})
    assert select_warnings(total) == []


def test_select_counts_a_series_only_within_its_span():
    """PromQL's sum: a pod that appears late or goes away adds nothing outside its own span;
    a point missing inside a series' span stays missing."""
    doc = export(({"pod": "a"}, [(0, 1), (60, 2), (120, 3), (180, 4)]),
                 ({"pod": "b"}, [(60, 10), (180, 30)]),  # created at 60; no point at 120: a gap
                 ({"pod": "c"}, [(0, 100), (60, 100)]))  # removed after 60
    total = select(parse_prometheus_range(doc), {})
    assert total.times.tolist() == [0, 60, 120, 180]
    assert total.values[[0, 1, 3]].tolist() == [101, 112, 34] and np.isnan(total.values[2])
    (w,) = select_warnings(total)
    assert "2 series start after or end before the range" in w and 'pod="b"' in w


@pytest.mark.parametrize("doc, message", [
    ([1, 2], "expected the JSON object"),
    ({"status": "error", "error": "bad query"}, "status is 'error' \\(bad query\\)"),
    ({"status": "success", "data": {"resultType": "vector", "result": []}}, "expected 'matrix'"),
    ({"status": "success", "data": {"resultType": "matrix", "result": []}}, "holds no series"),
    ({"status": "success", "data": {"resultType": "matrix", "result": [{"values": [[0, "x"]]}]}},
     "values\\[0\\] = \\[0, 'x'\\] is not a \\[unix time"),
    (export(({}, [(60, 1), (0, 2)])), "not strictly increasing"),
])
def test_malformed_exports_are_named(doc, message):
    with pytest.raises(MetricsError, match=message):
        parse_prometheus_range(doc)


def test_file_that_is_not_json(tmp_path):
    p = tmp_path / "x.json"
    p.write_text("{not json")
    with pytest.raises(MetricsError, match="not valid JSON"):
        read_prometheus_range(p)


def test_short_gaps_are_interpolated_with_a_warning_long_ones_refused():
    t = [0, 300, 600, 1500, 1800, 2100]  # 600 -> 1500: two missing steps
    v = [10.0, 20.0, 30.0, 60.0, 70.0, 80.0]
    s = Series("load", t, v)
    g, warns = regular_grid(s, max_gap=2)
    assert g.times.tolist() == list(range(0, 2101, 300))
    assert g.values.tolist() == [10, 20, 30, 40, 50, 60, 70, 80]  # linear, not zero
    assert len(warns) == 1 and "2 missing point(s)" in warns[0] and "not zero" in warns[0]
    with pytest.raises(MetricsError, match="a gap of 2 steps \\(10 min\\) from 1970-01-01T00:15:00Z"):
        regular_grid(s, max_gap=1)
    nan_inside = Series("load", [0, 60, 120], [1.0, float("nan"), 3.0])
    assert regular_grid(nan_inside)[0].values.tolist() == [1, 2, 3]
    # missing at the edges: dropped with a warning (the last known state is kept), never zeros
    nan = float("nan")
    g, warns = regular_grid(Series("load", [0, 60, 120, 180, 240], [nan, 1.0, 2.0, nan, nan]))
    assert g.times.tolist() == [60, 120] and g.values.tolist() == [1, 2]
    assert "the first 1 point(s) are missing" in warns[0]
    assert "the last 2 point(s) are missing (from 1970-01-01T00:03:00Z)" in warns[1] and "last known state" in warns[1]
    with pytest.raises(MetricsError, match="every value is missing"):
        regular_grid(Series("load", [0, 60], [float("nan")] * 2))


def _scrape(reg, t):
    return {"time": t, "text": generate_latest(reg).decode()}


def test_scrape_rates_from_the_servers_own_counters(tmp_path):
    reg = CollectorRegistry()
    c = Counter("autoglm_generation_tokens", "Tokens generated", registry=reg)
    req = Counter("autoglm_requests", "Requests by outcome", ["outcome"], registry=reg)
    lines = []
    for t, inc in [(0, 0), (15, 300), (30, 150), (45, 600)]:
        c.inc(inc)
        req.labels("finished").inc(inc // 100)
        lines.append(_scrape(reg, t))
    # a restart: the counter starts again from zero, then 90 tokens
    reg2 = CollectorRegistry()
    Counter("autoglm_generation_tokens", "Tokens generated", registry=reg2).inc(90)
    lines.append(_scrape(reg2, 60))
    path = tmp_path / "scrapes.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    s = scrape_rates(read_scrapes(path), "autoglm_generation_tokens_total")
    assert s.times.tolist() == [15, 30, 45, 60]
    assert s.values.tolist() == [20.0, 10.0, 40.0, 6.0]  # 300/15, 150/15, 600/15, 90/15 (after the reset)
    r = scrape_rates(read_scrapes(path)[:4], "autoglm_requests_total", outcome="finished")
    assert r.values.tolist() == pytest.approx([3 / 15, 1 / 15, 6 / 15])  # 3, 1, 6 requests in 15 s
    with pytest.raises(MetricsError, match="no sample named 'autoglm_nope_total'"):
        scrape_rates(read_scrapes(path), "autoglm_nope_total")
    path.write_text('{"time": 1}\n')
    with pytest.raises(MetricsError, match=":1: expected a JSON object with 'time'"):
        read_scrapes(path)


def test_a_coarser_step_averages_the_points_within_each_step():
    """15 s points on a 60 s grid: each cell is the mean of its known points (NaN left out);
    a cell with none is a gap like any other, interpolated when short."""
    t = np.arange(0, 16 * 15, 15.0)  # 16 points: 4 cells of 4
    v = np.arange(16, dtype=float)
    v[5] = np.nan
    v[8:12] = np.nan  # cell 2 has no known point
    g, warns = regular_grid(Series("load", t, v), step=60)
    want = [np.mean([0, 1, 2, 3]), np.mean([4, 6, 7]), None, np.mean([12, 13, 14, 15])]
    want[2] = (want[1] + want[3]) / 2  # the empty cell: interpolated, not zero
    assert g.times.tolist() == [0, 60, 120, 180]
    np.testing.assert_allclose(g.values, want)
    assert "1 missing point(s)" in warns[0]
    with pytest.raises(MetricsError, match="several points fall on one 20 s grid step"):
        regular_grid(Series("load", t, np.arange(16.0)), step=20)
