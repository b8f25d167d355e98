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
