"""Replica advice against brute force: the smallest count that serves the load, the
scale-down window simulated step by step, and the inputs that must be refused."""

import json
import math

import numpy as np
import pytest

from autoglm.ops.replicas import ReplicaPolicy, capacity_from_serving, plan_replicas


def brute_needed(load, cap, util, lo, hi):
    n = lo
    while n < hi and n * cap * util < load - 1e-9:
        n += 1
    return n


def test_needed_is_the_smallest_count_that_serves_the_load():
    rng = np.random.default_rng(0)
    policy = ReplicaPolicy(capacity=228.2, target_utilization=0.75, min_replicas=2, max_replicas=40)
    for load in np.r_[0.0, rng.uniform(0, 12000, 300), 228.2 * 0.75 * 3]:
        assert policy.needed(float(load)) == brute_needed(load, 228.2, 0.75, 2, 40)


def test_plan_scales_up_at_once_and_down_after_the_window():
    policy = ReplicaPolicy(capacity=10.0, target_utilization=1.0, scale_down_window=4)
    rng = np.random.default_rng(1)
    observed = rng.uniform(0, 100, 200)
    predicted = rng.uniform(0, 100, 200)
    got = plan_replicas(observed, predicted, policy)
    current, calm = 1, []  # a step-by-step controller: up at once, down to the window's highest
    for o, p in zip(observed, predicted):
        desired = max(math.ceil(o / 10), math.ceil(p / 10), 1)
        calm = (calm + [desired])[-4:]
        current = desired if desired > current else max(calm)
        assert current >= 1
    want = []
    calm = []
    for o, p in zip(observed, predicted):
        calm = (calm + [max(math.ceil(o / 10), math.ceil(p / 10), 1)])[-4:]
        want.append(max(calm))
    assert got == want
    assert plan_replicas(observed, None, policy) == plan_replicas(observed, [0] * 200, policy)  # reactive only
    assert all(g >= r for g, r in zip(got, plan_replicas(observed, None, policy)))  # prediction only adds


@pytest.mark.parametrize("kwargs, message", [
    ({"capacity": 0.0}, "capacity per replica must be a finite number > 0"),
    ({"capacity": -5.0}, "capacity per replica must be a finite number > 0"),
    ({"capacity": float("nan")}, "capacity per replica must be a finite number > 0"),
    ({"capacity": float("inf")}, "capacity per replica must be a finite number > 0"),
    ({"capacity": "fast"}, "capacity per replica must be a finite number > 0"),
    ({"capacity": 10.0, "min_replicas": 0}, "min_replicas must be >= 1 for a live service"),
    ({"capacity": 10.0, "target_utilization": 1.5}, "target_utilization must be in"),
    ({"capacity": 10.0, "min_replicas": 5, "max_replicas": 2}, "max_replicas \\(2\\) must be >= min_replicas"),
])
def test_impossible_policies_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ReplicaPolicy(**kwargs)


def test_load_must_be_a_number():
    policy = ReplicaPolicy(capacity=10.0)
    for bad in (float("nan"), -1.0, float("inf")):
        with pytest.raises(ValueError, match="load must be a finite number >= 0"):
            policy.needed(bad)


def test_capacity_from_the_serving_benchmark(tmp_path):
    rows = [{"system": "HTTP (autoglm serve, streaming)", "concurrency": c, "out_tok_s": tok, "tpot_p50_ms": tpot}
            for c, tok, tpot in [(1, 45.8, 21.4), (16, 228.2, 64.0), (64, 382.2, 150.6)]]
    rows.append({"system": "engine (LLMEngine.generate)", "concurrency": 64, "out_tok_s": 999.0, "tpot_p50_ms": 10})
    p = tmp_path / "serving.json"
    p.write_text(json.dumps({"rows": rows}))
    assert capacity_from_serving(p, 100)[0] == 228.2  # 64 streams miss the target
    assert capacity_from_serving(p, 200)[0] == 382.2
    with pytest.raises(ValueError, match="no concurrency .* meets a TPOT p50 of 10 ms \\(the best is 21.4 ms\\)"):
        capacity_from_serving(p, 10)
    p.write_text("[]")
    with pytest.raises(ValueError, match="not the serving benchmark's results"):
        capacity_from_serving(p, 100)
