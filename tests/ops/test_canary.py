"""Canary promotion from the server's own metrics (autoglm.inference.server.ServerMetrics, the
registry /metrics serves): error rate and p99 against values computed from the raw
observations, the promote / hold / rollback rule, and the weights file the canary overlay
renders."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from prometheus_client import generate_latest
from typer.testing import CliRunner

from autoglm.cli import app
from autoglm.inference.server import ServerMetrics
from autoglm.ops.canary import WindowStats, decide, histogram_quantile, window_stats
from autoglm.ops.series import MetricsError

ROOT = Path(__file__).resolve().parents[2]


def scrapes(latencies, finished, aborted=0, rejected=0, warmup=50):
    """Two scrapes of one server: after `warmup` requests, and after the window's traffic."""
    m = ServerMetrics()
    for _ in range(warmup):
        m.requests.labels("finished").inc()
        m.e2e.observe(10.0)  # before the window: must not count
    first = (0.0, generate_latest(m.registry).decode())
    m.requests.labels("finished").inc(finished)
    m.requests.labels("aborted").inc(aborted)
    m.requests.labels("rejected").inc(rejected)
    for x in latencies:
        m.e2e.observe(float(x))
    return [first, (60.0, generate_latest(m.registry).decode())]


def write(tmp_path, name, scr):
    p = tmp_path / name
    p.write_text("".join(json.dumps({"time": t, "text": x}) + "\n" for t, x in scr))
    return p


def test_histogram_quantile_against_the_samples():
    rng = np.random.default_rng(0)
    lat = rng.uniform(0, 1, 5000)
    s = window_stats(scrapes(lat, finished=5000))
    assert s.requests == 5000 and s.errors == 0
    true = float(np.quantile(lat, 0.99))
    assert 0.5 < s.p99_s <= 1.0  # in the bucket that holds the true quantile (0.5, 1]
    assert abs(s.p99_s - true) < 0.02  # uniform inside a bucket: interpolation is near exact
    assert histogram_quantile(0.99, [(1.0, 0.0), (float("inf"), 10.0)]) == 1.0  # beyond the last bound
    assert np.isnan(histogram_quantile(0.5, [(1.0, 0.0), (float("inf"), 0.0)]))


def test_errors_count_aborted_and_rejected():
    s = window_stats(scrapes([0.1] * 200, finished=190, aborted=6, rejected=4))
    assert (s.requests, s.errors) == (200, 10) and s.error_rate == pytest.approx(0.05)


def test_decide():
    stable = WindowStats(requests=1000, errors=5, p99_s=1.0)
    good = WindowStats(requests=200, errors=1, p99_s=1.1)
    assert (decide(stable, good, 10).action, decide(stable, good, 10).canary_weight) == ("promote", 25)
    assert decide(stable, good, 50).canary_weight == 100
    assert decide(stable, WindowStats(50, 0, 1.0), 10).action == "hold"
    bad_errors = decide(stable, WindowStats(200, 10, 1.0), 25)
    assert (bad_errors.action, bad_errors.canary_weight) == ("rollback", 0) and "error rate 5.00%" in bad_errors.reason
    slow = decide(stable, WindowStats(200, 1, 1.5), 25)
    assert slow.action == "rollback" and "p99" in slow.reason
    with pytest.raises(ValueError, match="percentage"):
        decide(stable, good, 120)


def test_cli_writes_weights_the_overlay_renders(tmp_path):
    rng = np.random.default_rng(1)
    stable = write(tmp_path, "stable.jsonl", scrapes(rng.uniform(0, 1, 900), finished=900, aborted=3))
    canary = write(tmp_path, "canary.jsonl", scrapes(rng.uniform(0, 1, 150), finished=150))
    k8s = tmp_path / "k8s"
    shutil.copytree(ROOT / "deploy" / "k8s", k8s)
    weights = k8s / "overlays" / "canary" / "weights.yaml"
    r = CliRunner().invoke(app, ["ops", "canary", "--stable", str(stable), "--canary", str(canary),
                                 "--canary-weight", "10", "--weights-file", str(weights)])
    assert r.exit_code == 0, r.output
    assert "promote: canary weight 25%" in " ".join(r.output.split())
    kubectl = Path(sys.executable).parent / "kubectl"
    out = subprocess.run([str(kubectl if kubectl.exists() else "kubectl"), "kustomize", str(k8s / "overlays/canary")],
                         capture_output=True, text=True, check=True).stdout
    (vs,) = [d for d in yaml.safe_load_all(out) if d and d["kind"] == "VirtualService"]
    assert [r["weight"] for r in vs["spec"]["http"][0]["route"]] == [75, 25]
    slow = write(tmp_path, "slow.jsonl", scrapes(rng.uniform(4, 9, 150), finished=150))
    r = CliRunner().invoke(app, ["ops", "canary", "--stable", str(stable), "--canary", str(slow),
                                 "--canary-weight", "25"])
    assert r.exit_code == 0 and "rollback: canary weight 0%" in " ".join(r.output.split())
    r = CliRunner().invoke(app, ["ops", "canary", "--stable", str(stable), "--canary", str(tmp_path / "none.jsonl")])
    assert r.exit_code == 2 and "error:" in r.output


def test_a_canary_that_served_nothing_is_never_promoted():
    """No request in the window is no evidence: hold, whatever min_requests says (its error
    rate and p99 are undefined, and NaN compares false against every threshold)."""
    idle = window_stats(scrapes([], finished=0))
    assert idle.requests == 0 and np.isnan(idle.error_rate)
    d = decide(WindowStats(1000, 0, 1.0), idle, 25, min_requests=0)
    assert (d.action, d.canary_weight) == ("hold", 25) and "served 0 requests" in d.reason


@pytest.mark.parametrize("args, message", [
    (["--min-requests", "0"], "min_requests must be >= 1"),
    (["--max-error-increase", "-0.5"], "max_error_increase is a share of requests in [0, 1]"),
    (["--steps", "0,50,100"], "steps must be increasing percentages in (0, 100] ending at 100"),
    (["--steps", "10,10,100"], "steps must be increasing percentages"),
    (["--canary-weight", "101"], "canary_weight is a percentage"),
])
def test_cli_refuses_rules_that_make_no_sense(tmp_path, args, message):
    s = write(tmp_path, "s.jsonl", scrapes([0.1] * 200, finished=200))
    r = CliRunner().invoke(app, ["ops", "canary", "--stable", str(s), "--canary", str(s), *args])
    assert r.exit_code == 2 and message in " ".join(r.output.split()), r.output


def test_cli_names_the_missing_scrapes_file(tmp_path):
    s = write(tmp_path, "s.jsonl", scrapes([0.1] * 200, finished=200))
    weights = tmp_path / "weights.yaml"
    r = CliRunner().invoke(app, ["ops", "canary", "--stable", str(s), "--canary", str(tmp_path / "c.jsonl"),
                                 "--weights-file", str(weights)])
    out = " ".join(r.output.split())
    assert r.exit_code == 2 and f"--canary {tmp_path / 'c.jsonl'} does not exist" in out and "autoglm ops scrape" in out
    assert not weights.exists()  # nothing decided, nothing written
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    r = CliRunner().invoke(app, ["ops", "canary", "--stable", str(empty), "--canary", str(s)])
    assert r.exit_code == 2 and f"--stable {empty}: 0 scrape(s); a window needs a first and a last one" in " ".join(
        r.output.split())


def test_the_weights_file_is_the_current_weight(tmp_path):
    """Without --canary-weight the step starts from the weights the file applies, so repeated
    steps walk 10 -> 25 -> 50 instead of promoting to 25 again and again; a --canary-weight
    that contradicts the file, or a file that is not the overlay's patch, is an error."""
    rng = np.random.default_rng(2)
    s = write(tmp_path, "s.jsonl", scrapes(rng.uniform(0, 1, 900), finished=900))
    c = write(tmp_path, "c.jsonl", scrapes(rng.uniform(0, 1, 300), finished=300))
    weights = tmp_path / "weights.yaml"
    shutil.copy(ROOT / "deploy/k8s/overlays/canary/weights.yaml", weights)  # 90 / 10
    seen = []
    for _ in range(3):
        r = CliRunner().invoke(app, ["ops", "canary", "--stable", str(s), "--canary", str(c), "--weights-file",
                                     str(weights)])
        assert r.exit_code == 0, r.output
        ops = yaml.safe_load(weights.read_text())
        seen.append([op["value"] for op in ops])
    assert seen == [[75, 25], [50, 50], [0, 100]]
    r = CliRunner().invoke(app, ["ops", "canary", "--stable", str(s), "--canary", str(c), "--canary-weight", "10",
                                 "--weights-file", str(weights)])
    out = " ".join(r.output.split())
    assert r.exit_code == 2 and "--canary-weight 10 but" in out and "routes 100% to the canary" in out
    weights.write_text("- op: replace\n  path: /spec/http/0/route/0/weight\n  value: 80\n")
    r = CliRunner().invoke(app, ["ops", "canary", "--stable", str(s), "--canary", str(c), "--weights-file",
                                 str(weights)])
    assert r.exit_code == 2 and "not the canary overlay's weights file" in " ".join(r.output.split())


def test_a_counter_that_went_down_names_the_likely_causes():
    """Two different pods (a Service URL) or a restart inside the window: the increase is not
    what the version served, and the error says what to scrape instead."""
    busy, quiet = scrapes([0.1] * 500, finished=500), scrapes([0.1] * 10, finished=10)
    with pytest.raises(MetricsError, match="went down between the first and the last scrape: a restart, or scrapes of "
                                        "different pods"):
        window_stats([busy[1], (120.0, quiet[1][1])])


def test_a_version_with_several_pods_is_the_sum_of_its_pods(tmp_path):
    """Two pods' windows (one scrapes file each) give what one server that saw all their
    requests would report: counts add, and the p99 is that of the summed histogram."""
    rng = np.random.default_rng(3)
    a, b = rng.uniform(0, 1, 300), rng.uniform(0.5, 3, 100)
    pod_a = scrapes(a, finished=298, aborted=2)
    pod_b = scrapes(b, finished=97, rejected=3, warmup=500)
    both = window_stats(pod_a, pod_b)
    pooled = window_stats(scrapes(np.concatenate([a, b]), finished=395, aborted=2, rejected=3))
    assert (both.requests, both.errors) == (400, 5) and both.p99_s == pytest.approx(pooled.p99_s)
    assert both.p99_s > window_stats(pod_a).p99_s  # the slow pod counts
    files = [write(tmp_path, f"{n}.jsonl", s) for n, s in (("a", pod_a), ("b", pod_b))]
    canary = write(tmp_path, "c.jsonl", scrapes(rng.uniform(0, 1, 200), finished=200))
    r = CliRunner().invoke(app, ["ops", "canary", "--stable", f"{files[0]},{files[1]}", "--canary", str(canary),
                                 "--canary-weight", "10"])
    assert r.exit_code == 0 and "stable: 400 requests, error rate 1.25%" in r.output, r.output


def test_one_pod_file_given_twice_is_refused(tmp_path):
    s = write(tmp_path, "s.jsonl", scrapes([0.1] * 200, finished=200))
    r = CliRunner().invoke(app, ["ops", "canary", "--stable", f"{s},{s}", "--canary", str(s)])
    assert r.exit_code == 2 and "--stable names a file twice" in " ".join(r.output.split())
