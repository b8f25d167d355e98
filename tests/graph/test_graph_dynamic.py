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
        rows.append(f"n{a},n{b},{int(t) + 1704067200}")  # epoch seconds from 2024-01-01
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
    # the unparsable time is quarantined with its reason; a pair seen again at another time is kept (the
    # duplicate key includes the time)
    assert res["data"]["clean"]["quarantined"] == {"bad_timestamp": 1}
    assert res["data"]["clean"]["kept"] + sum(res["data"]["clean"]["quarantined"].values()) == len(rows) - 1
    assert "not-a-time" in (tmp_path / "m" / "clean" / "quarantine.csv").read_text()
    assert {"auc", "ap"} <= set(res["dynamic"]) and {"auc", "ap"} <= set(res["static"])
    assert len(res["snapshots"]) == 6 and "temporal link prediction" in r.output
    r = CliRunner().invoke(app, ["graph", "pretrain", "--dynamic", "--out", str(tmp_path / "g"),
                                 "--dynamic-hidden-dim", "8", "--dynamic-epochs", "2", "--no-compare-static"])
    assert r.exit_code == 0, r.output
    assert "static" not in json.loads((tmp_path / "g" / "dynamic.json").read_text())


def _edge_csv(path, g, prefix="n", rows=None):
    """One direction of g's edges as a CSV of epoch seconds from 2024-01-01; returns the row count."""
    half = g.edge_index.shape[1] // 2
    lines = [f"{prefix}{a},{prefix}{b},{int(t) + 1704067200}"
             for (a, b), t in zip(g.edge_index[:, :half].t().tolist(), g.edge_time[:half].tolist())][:rows]
    path.write_text("source,target,timestamp\n" + "\n".join(lines) + "\n")
    return len(lines)


def _dyn(*args):
    return CliRunner().invoke(app, ["graph", "pretrain", "--dynamic", "--dynamic-hidden-dim", "8", "--dynamic-epochs",
                                    "2", "--num-snapshots", "6", *map(str, args)])


def _files(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_cli_pretrain_refuses_an_out_holding_a_run_and_overwrite_leaves_one_run(tmp_path):
    from autoglm.graph.experiment import load_ssl_model
    from autoglm.rundir import RunDir

    g = evolving_graph(num_nodes=60, num_snapshots=6, p_in=0.2, p_out=0.01, seed=0)
    _edge_csv(tmp_path / "e.csv", g)
    out = tmp_path / "m"
    static = ["graph", "pretrain", "--out", str(out), "--epochs", "1", "--hidden-dim", "8"]
    assert CliRunner().invoke(app, static).exit_code == 0
    before = _files(out)
    for r in (_dyn("--data", tmp_path / "e.csv", "--out", out), CliRunner().invoke(app, static)):
        assert r.exit_code == 2 and "already holds a graph run" in r.output and "--overwrite" in r.output, r.output
    assert _files(out) == before  # refused before anything was cleaned, trained or written
    r = _dyn("--data", tmp_path / "e.csv", "--out", out, "--overwrite")
    assert r.exit_code == 0, r.output
    names = set(_files(out))
    assert {"model.safetensors", "states.safetensors", "dynamic.json", "run.json", "clean/graph.duckdb"} <= names
    assert not {"embeddings.safetensors", "graph_ssl_config.json"} & names  # the static run's files are gone
    assert RunDir.detect(out) is None and json.loads((out / "run.json").read_text())["recipe"].endswith("dynamic")
    r = CliRunner().invoke(app, static + ["--overwrite"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "embeddings.safetensors", "graph_ssl_config.json",
                                                      "model.safetensors", "run.json"]
    assert RunDir.detect(out) == "graph" and load_ssl_model(out).encoder is not None
    assert "overwrite: false" in (out / "config.yaml").read_text()  # re-running the saved config refuses, too
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no scratch folder left


def test_cli_pretrain_dynamic_cleans_each_file_afresh_and_atomically(tmp_path):
    """A second file is not added to the first one's rows; an edited file is no 'incremental
    sync'; a run that fails leaves the earlier run, OUT/clean included, as it was."""
    out = tmp_path / "m"
    g = evolving_graph(num_nodes=60, num_snapshots=6, p_in=0.2, p_out=0.01, seed=0)
    rows_a = _edge_csv(tmp_path / "a.csv", g, prefix="a")
    r = _dyn("--data", tmp_path / "a.csv", "--out", out)
    assert r.exit_code == 0, r.output
    assert json.loads((out / "dynamic.json").read_text())["data"]["clean"]["kept"] == rows_a
    h = evolving_graph(num_nodes=50, num_snapshots=6, p_in=0.25, p_out=0.01, seed=1)
    rows_b = _edge_csv(tmp_path / "b.csv", h, prefix="b")
    r = _dyn("--data", tmp_path / "b.csv", "--out", out, "--overwrite")
    assert r.exit_code == 0, r.output
    res = json.loads((out / "dynamic.json").read_text())
    assert res["data"]["clean"]["kept"] == rows_b != rows_a and res["data"]["source"] == str(tmp_path / "b.csv")
    assert list(json.loads((out / "clean" / "manifest.json").read_text())["files"]) == [str(tmp_path / "b.csv")]
    names = (out / "clean" / "nodes.csv").read_text().split()[1:]
    assert names and all(n.split(",")[1].startswith("b") for n in names)  # none of a.csv's nodes
    assert res["nodes"] == len(names) == len({n for e in (tmp_path / "b.csv").read_text().split()[1:]
                                               for n in e.split(",")[:2]})
    text = (tmp_path / "b.csv").read_text().replace("\nb", "\nbx", 1)  # an edit, not an append
    (tmp_path / "b.csv").write_text(text)
    r = _dyn("--data", tmp_path / "b.csv", "--out", out, "--overwrite")
    assert r.exit_code == 0 and "incremental" not in r.output, r.output
    before = _files(out)
    (tmp_path / "bad.csv").write_text("source,target,timestamp\na,b,yesterday\nb,c,today\nc,d,2024-01-01\n")
    r = _dyn("--data", tmp_path / "bad.csv", "--out", out, "--overwrite")
    assert r.exit_code == 2 and _files(out) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_cli_pretrain_dynamic_keeps_repeated_interactions_and_its_errors_name_graph_clean(tmp_path):
    days = [f"2024-01-{d:02d}T10:00:00Z" for d in range(1, 11)]
    pairs = [(f"n{i}", f"n{(i * 7 + 3) % 100}") for i in range(100)]  # no self-loop: 6i = 97 (mod 100) has no i
    # day d holds the first 10 + 9 d pairs: 9 new ones, and every earlier one again
    rows = [f"{a},{b},{t}" for d, t in enumerate(days) for i, (a, b) in enumerate(pairs) if i < 10 + 9 * d]
    (tmp_path / "e.csv").write_text("source,target,timestamp\n" + "\n".join(rows) + "\n")
    r = _dyn("--data", tmp_path / "e.csv", "--out", tmp_path / "m", "--num-snapshots", "10", "--test-snapshots", "3")
    assert r.exit_code == 0, r.output
    clean = json.loads((tmp_path / "m" / "dynamic.json").read_text())["data"]["clean"]
    assert clean == {"kept": len(rows), "quarantined": {}, "quarantine_file": str(tmp_path / "m/clean/quarantine.csv")}
    (tmp_path / "bad.csv").write_text("source,target,timestamp\na,b,yesterday\nb,c,today\nc,d,2024-01-01\n")
    r = _dyn("--data", tmp_path / "bad.csv", "--out", tmp_path / "x")
    msg = " ".join(r.output.split())
    assert r.exit_code == 2 and "2 of 3 rows (67%) were quarantined" in msg
    assert "--allow-partial" not in msg and "--max-quarantine" not in msg  # graph pretrain has neither
    assert f"autoglm graph clean --out DIR --edges {tmp_path / 'bad.csv'}" in msg and "--data DIR" in msg
    (tmp_path / "cols.csv").write_text("user,item,ts\na,b,2024-01-01\n")
    r = _dyn("--data", tmp_path / "cols.csv", "--out", tmp_path / "x")
    msg = " ".join(r.output.split())
    assert r.exit_code == 2 and "--source-col NAME (options of `autoglm graph clean`, not of `graph pretrain`" in msg


def test_mostly_empty_windows_and_too_few_held_out_edges_are_refused(tmp_path, caplog):
    """--window 60 on daily data: thousands of empty windows were one warning each and the run
    reported AUC 1.0 on a couple of edges. Now: one summary line, and a refusal naming --window;
    an AUC over fewer than MIN_TEST_POSITIVES new edges is refused too."""
    import logging

    from autoglm.graph.dynamic import MIN_TEST_POSITIVES
    from autoglm.recipes.graph_ssl import GraphPretrainConfig, pretrain_dynamic
    from autoglm.settings import load_config

    g = evolving_graph(num_nodes=60, num_snapshots=6, p_in=0.2, p_out=0.01, seed=0)
    g.edge_time = g.edge_time + 1704067200
    cfg = load_config(GraphPretrainConfig, overrides={"out": str(tmp_path / "w"), "dynamic.enabled": True,
                                                      "dynamic.window": 60, "dynamic.epochs": 1})
    _, skipped = snapshot_edges(g, window=60)
    with caplog.at_level(logging.WARNING), pytest.raises(ValueError, match=r"snapshot windows \(--window 60 s\) hold "
                                                                          r"no edge.*use a larger --window"):
        pretrain_dynamic(cfg, data=g)
    logged = [r.getMessage() for r in caplog.records if "empty snapshot window" in r.getMessage()]
    assert len(logged) == 1 and f"dropped {len(skipped)} empty" in logged[0] and len(skipped) > 1000
    assert not (tmp_path / "w").exists()
    snaps, _ = snapshot_edges(g, num_snapshots=6)
    snaps[-2], snaps[-1] = snaps[-2][:, :4], snaps[-1][:, :4]  # the held-out snapshots: a handful of edges
    held = sum(f.shape[1] for f in new_edges(snaps, 60)[-2:])
    assert held < MIN_TEST_POSITIVES == 20
    enc = EncoderConfig(hidden_dim=8, num_layers=1)
    with pytest.raises(ValueError, match=rf"hold {held} edge\(s\) seen for the first time; an AUC / AP needs at "
                                         rf"least 20.*--window.*--test-snapshots"):
        train_temporal(g.x, snaps, enc, carry=True, epochs=1)
    res = train_temporal(g.x, snaps, enc, carry=True, epochs=1, min_test_positives=held)
    assert res["test"]["positives"] == held


def test_cli_missing_data_file_says_it_does_not_exist(tmp_path):
    for dynamic in (["--dynamic"], []):
        r = CliRunner().invoke(app, ["graph", "pretrain", *dynamic, "--data", str(tmp_path / "nope.csv"),
                                     "--out", str(tmp_path / "m")])
        assert r.exit_code == 2 and f"{tmp_path / 'nope.csv'}: no such file or folder" in " ".join(r.output.split())
    (tmp_path / "e.csv").write_text("source,target\n0,1\n")
    r = CliRunner().invoke(app, ["graph", "pretrain", "--data", str(tmp_path / "e.csv"), "--out", str(tmp_path / "m")])
    assert r.exit_code == 2 and "is a file; pre-training reads a folder written by `autoglm graph clean`" in \
        " ".join(r.output.split())
    r = CliRunner().invoke(app, ["graph", "pretrain", "--data", "sbn", "--out", str(tmp_path / "m")])
    assert r.exit_code == 2 and "unknown graph source 'sbn'" in r.output
    assert not (tmp_path / "m").exists()
