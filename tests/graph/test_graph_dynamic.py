"""Dynamic graphs: snapshots from edge_time (windows, empty windows, missing times), new-edge
targets against a naive set computation, the state-carrying encoder against a manual loop,
AUC / AP against a pairwise count, and `autoglm graph pretrain --dynamic` end to end (the
generated evolving graph and a CSV of timestamped edges through `graph clean`)."""

import json

import pytest
import torch
from torch_geometric.data import Data
from typer.testing import CliRunner

from autoglm.cli import app
from autoglm.graph.config import EncoderConfig
from autoglm.graph.dynamic import (TemporalLinkModel, _metrics, evolving_graph, new_edges, snapshot_edges,
                                   train_temporal)
from autoglm.graph.encoder import GraphEncoder

DAY = 86400.0


def _timed(times):
    n = 4
    ei = torch.tensor([[0, 1, 2, 3, 0, 1][:len(times)], [1, 2, 3, 0, 2, 3][:len(times)]])
    return Data(x=torch.eye(n), edge_index=ei, edge_time=torch.tensor(times, dtype=torch.float64), num_nodes=n)


def test_windows_by_length_and_by_count_and_empty_windows_reported():
    g = _timed([0.0, 0.5 * DAY, 1.2 * DAY, 3.5 * DAY])  # nothing in day 2
    snaps, skipped = snapshot_edges(g, window=DAY)
    assert [s.t().tolist() for s in snaps] == [[[0, 1], [1, 2]], [[2, 3]], [[3, 0]]]
    assert [s["window"] for s in skipped] == [2] and "no edge" in skipped[0]["reason"]
    assert sum(s.shape[1] for s in snaps) == 4  # nothing lost
    snaps, skipped = snapshot_edges(g, num_snapshots=2)
    assert [s.shape[1] for s in snaps] == [3, 1] and skipped == []
    with pytest.raises(ValueError, match="exactly one of num_snapshots"):
        snapshot_edges(g, num_snapshots=2, window=DAY)


def test_missing_times_are_an_error_or_static_on_request():
    g = _timed([0.0, float("nan"), DAY, 2 * DAY])
    with pytest.raises(ValueError, match="1 of 4 edges have no time.*--untimed static"):
        snapshot_edges(g, num_snapshots=2)
    snaps, _ = snapshot_edges(g, num_snapshots=2, untimed="static")
    assert all((s == torch.tensor([[1], [2]])).all(0).any() for s in snaps)  # the untimed edge is everywhere
    with pytest.raises(ValueError, match="no edge has a time"):
        snapshot_edges(_timed([float("nan")] * 3), num_snapshots=2, untimed="static")


def test_new_edges_match_a_naive_set_difference():
    g = evolving_graph(num_nodes=40, num_snapshots=4, p_in=0.2, p_out=0.02, seed=1)
    snaps, _ = snapshot_edges(g, num_snapshots=4)
    seen = set()
    for ei, fresh in zip(snaps, new_edges(snaps, 40)):
        pairs = {(min(a, b), max(a, b)) for a, b in ei.t().tolist() if a != b}
        assert {tuple(p) for p in fresh.t().tolist()} == pairs - seen
        seen |= pairs


def test_state_carrying_model_equals_a_manual_loop():
    torch.manual_seed(0)
    enc = EncoderConfig(hidden_dim=8, num_layers=2)
    model = TemporalLinkModel(5, enc, carry=True, normalize_state=True)
    x = torch.randn(6, 5)
    snaps = [torch.tensor([[0, 1], [1, 2]]), torch.tensor([[3, 4], [4, 5]]), torch.tensor([[5], [0]])]
    got = model.states(x, snaps)
    state, want = None, []
    for ei in snaps:
        if state is not None:
            state = (state - state.mean(-1, keepdim=True)) / (state.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()
        state = model.encoder(x, ei, state=state)
        want.append(state)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    static = TemporalLinkModel(5, enc, carry=False)
    static.load_state_dict(model.state_dict())
    torch.testing.assert_close(static.states(x, snaps)[1], model.encoder(x, snaps[1]))
    assert isinstance(model.encoder, GraphEncoder)


def test_metrics_against_pairwise_counts():
    pos, neg = torch.tensor([0.9, 0.4, 0.7]), torch.tensor([0.1, 0.5, 0.8, 0.2])
    m = _metrics(pos, neg)
    wins = sum(float(p > q) for p in pos for q in neg)
    assert m["auc"] == pytest.approx(wins / 12)
    # AP by hand: ranking 0.9+ 0.8- 0.7+ 0.5- 0.4+ ...: precisions at the positives 1, 2/3, 3/5
    assert m["ap"] == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)


def test_carrying_state_beats_the_static_encoder_on_the_evolving_graph():
    g = evolving_graph(num_nodes=200, num_snapshots=8, num_blocks=4, p_in=0.06, p_out=0.002, seed=3)
    snaps, _ = snapshot_edges(g, num_snapshots=8)
    enc = EncoderConfig(hidden_dim=32, num_layers=2)
    dyn = train_temporal(g.x, snaps, enc, carry=True, epochs=40, seed=0, device="cpu")
    sta = train_temporal(g.x, snaps, enc, carry=False, epochs=40, seed=0, device="cpu")
    assert dyn["test"]["auc"] > sta["test"]["auc"] and dyn["test"]["auc"] > 0.6, (dyn["test"], sta["test"])
    with pytest.raises(ValueError, match="needs at least test_snapshots"):
        train_temporal(g.x, snaps[:3], enc, carry=True, epochs=1, test_snapshots=2)


def test_cli_pretrain_dynamic_on_a_csv_with_bad_timestamps(tmp_path):
    g = evolving_graph(num_nodes=60, num_snapshots=6, p_in=0.2, p_out=0.01, seed=0)
    rows = ["source,target,timestamp"]
    half = g.edge_index.shape[1] // 2
    for (a, b), t in zip(g.edge_index[:, :half].t().tolist(), g.edge_time[:half].tolist()):
        rows.append(f"n{a},n{b},{int(t)}")
    rows += ["n1,n2,not-a-time", "n3,n4,"]  # one unparsable (quarantined), one missing (an error by default)
    (tmp_path / "e.csv").write_text("\n".join(rows) + "\n")
    def run(*a):
        return CliRunner().invoke(app, ["graph", "pretrain", "--dynamic", "--data", str(tmp_path / "e.csv"),
                                        "--dynamic-hidden-dim", "8", "--dynamic-epochs", "3", "--num-snapshots", "6",
                                        *map(str, a)])
    r = run("--out", tmp_path / "bad")
    assert r.exit_code == 2 and "have no time" in r.output and "--untimed static" in r.output
    r = run("--out", tmp_path / "m", "--untimed", "static")
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "m" / "dynamic.json").read_text())
    # the unparsable time is quarantined with its reason; so is a pair seen again later (graph clean keys
    # duplicates on the endpoints, not the time: a repeat is not a new edge for the task anyway)
    assert res["data"]["clean"]["quarantined"]["bad_timestamp"] == 1
    assert set(res["data"]["clean"]["quarantined"]) <= {"bad_timestamp", "duplicate"}
    assert res["data"]["clean"]["kept"] + sum(res["data"]["clean"]["quarantined"].values()) == len(rows) - 1
    assert "not-a-time" in (tmp_path / "m" / "clean" / "quarantine.csv").read_text()
    assert {"auc", "ap"} <= set(res["dynamic"]) and {"auc", "ap"} <= set(res["static"])
    assert len(res["snapshots"]) == 6 and "temporal link prediction" in r.output
    r = CliRunner().invoke(app, ["graph", "pretrain", "--dynamic", "--out", str(tmp_path / "g"),
                                 "--dynamic-hidden-dim", "8", "--dynamic-epochs", "2", "--no-compare-static"])
    assert r.exit_code == 0, r.output
    assert "static" not in json.loads((tmp_path / "g" / "dynamic.json").read_text())
