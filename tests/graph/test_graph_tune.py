"""`autoglm graph tune`: the search never reads a test label, trial 0 is the base config, the
budget and early stopping end trials, bad input names the problem, the CLI writes its files."""

import json

import pytest
import torch
from typer.testing import CliRunner

from autoglm.cli import app
from autoglm.graph.config import GraphSSLConfig
from autoglm.graph.datasets import sbm_graph
from autoglm.graph.tune import SPACE, TuneBudget, _apply, candidates, check_validation_split, tune_graph
from autoglm.settings import load_config

ONE_PROBE = {"weight_decays": (1e-3,), "standardize": (False,)}
BASE = load_config(GraphSSLConfig, overrides={"encoder.hidden_dim": 16, "optim.epochs": 6, "loss.proj_dim": 8})
SMALL = {"loss.edge_weight": (0.0, 1.0), "optim.epochs": (4, 6)}


@pytest.fixture(scope="module")
def graph():
    return sbm_graph(num_nodes=150, num_blocks=3, num_features=24, p_in=0.08, p_out=0.005, seed=3)


def test_candidates_start_with_the_base_and_are_distinct_valid_settings():
    c = candidates(GraphSSLConfig(), SPACE, 12, seed=0)
    assert c[0] == {} and len(c) == 12
    assert len({repr(sorted(o.items())) for o in c}) == 12
    assert candidates(GraphSSLConfig(), SPACE, 12, seed=0) == c  # seeded: the same order every run
    # a space with one point besides the base cannot give more
    assert len(candidates(GraphSSLConfig(), {"loss.edge_weight": (1.0,)}, 5)) == 2


def test_local_strategy_lists_every_one_dimension_neighbour_of_the_base_first():
    base = GraphSSLConfig()
    c = candidates(base, SPACE, 100, seed=1, strategy="local")
    base_d = base.to_dict()
    # every (dimension, value) that differs from the base, once, as a single change; the edge mask
    # rate is inert while the base's edge term is off (edge_weight 0), so it is not tried alone
    assert base.loss.edge_weight == 0 and base.loss.degree_weight == 0
    expected = {(k, repr(list(v) if isinstance(v, tuple) else v)) for k, vals in SPACE.items() for v in vals
                if base_d[k.split(".")[0]][k.split(".")[1]] != (list(v) if isinstance(v, tuple) else v)
                and k != "loss.edge_mask_rate"}
    n = len(expected)
    assert c[0] == {} and all(len(o) == 1 for o in c[1:n + 1])
    assert {(k, repr(list(v) if isinstance(v, tuple) else v)) for o in c[1:n + 1] for k, v in o.items()} == expected
    assert all(len(o) > 1 for o in c[n + 1:])  # then random draws fill the rest
    assert candidates(base, SPACE, 100, seed=1, strategy="local") == c
    with pytest.raises(ValueError, match="strategy"):
        TuneBudget(strategy="grid")


def test_settings_that_differ_only_in_a_switched_off_term_are_one_candidate():
    base = GraphSSLConfig()  # edge term off
    assert candidates(base, {"loss.edge_mask_rate": (0.15, 0.3, 0.5)}, 10) == [{}]
    got = candidates(base, {"loss.edge_weight": (0.0, 1.0), "loss.edge_mask_rate": (0.15, 0.3)}, 10, strategy="local")
    # edge_weight 1 with either mask rate is new; edge_weight 0 with the other mask rate is the base again
    assert len(got) == 3 and all(o.get("loss.edge_weight", 0.0) == 1.0 for o in got[1:])
    no_views = {"loss.contrastive_weight": (0.0,), "loss.decorrelation_weight": (0.0,),
                "views.aug_p": ((0.3, 0.3), (0.5, 0.5))}
    assert len(candidates(base, no_views, 10)) == 2  # the base, and the one setting without two-view terms
    # the inert values do not change training: the same model either way
    from autoglm.graph.ssl import pretrain_graph

    g = sbm_graph(num_nodes=60, num_blocks=2, num_features=8, seed=0)
    small = load_config(GraphSSLConfig, overrides={"encoder.hidden_dim": 8, "optim.epochs": 2, "loss.proj_dim": 4})
    a, _ = pretrain_graph(g.x, g.edge_index, _apply(small, {"loss.edge_mask_rate": 0.15}))
    b, _ = pretrain_graph(g.x, g.edge_index, _apply(small, {"loss.edge_mask_rate": 0.5}))
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_confirm_takes_distinct_settings_after_their_epochs_are_set():
    from autoglm.graph.tune import _finalists

    rows = [{"trial": 11, "overrides": {"optim.epochs": 150}, "val_acc": 82.6, "best_epoch": 60},
            {"trial": 0, "overrides": {}, "val_acc": 82.0, "best_epoch": 60},  # the same setting: epochs 60
            {"trial": 7, "overrides": {"loss.contrastive_weight": 0.3}, "val_acc": 81.8, "best_epoch": 70}]
    got = _finalists(GraphSSLConfig(), rows, 2)
    assert [(r["trial"], over) for r, over in got] == [
        (11, {"optim.epochs": 60}), (7, {"loss.contrastive_weight": 0.3, "optim.epochs": 70})]


def test_score_breaks_accuracy_ties_by_validation_loss_and_confirm_keeps_the_base_on_a_full_tie():
    from autoglm.graph.tune import _finalists, _select, score

    rows = [{"trial": 0, "overrides": {}, "val_acc": 81.0, "val_loss": 0.70, "best_epoch": 70},
            {"trial": 3, "overrides": {"loss.mask_rate": 0.75}, "val_acc": 81.0, "val_loss": 0.62, "best_epoch": 70},
            {"trial": 5, "overrides": {"loss.edge_weight": 1.0}, "val_acc": 80.8, "val_loss": 0.50, "best_epoch": 70}]
    assert score(rows[1]) > score(rows[0]) > score(rows[2])  # accuracy first, then the lower loss
    assert [r["trial"] for r, _ in _finalists(GraphSSLConfig(), rows, 3)] == [3, 0, 5]
    # the confirm stage: the best score wins; a full tie keeps the base even when it is listed second
    confirm = [{"trial": 3, "val_acc": 81.0, "val_loss": 0.6}, {"trial": 0, "val_acc": 81.0, "val_loss": 0.6},
               {"trial": 5, "val_acc": 80.8, "val_loss": 0.4}]
    assert _select(confirm)["trial"] == 0
    assert _select([{**confirm[0], "val_loss": 0.59}, confirm[1]])["trial"] == 3
    assert _select([{"trial": 7, "val_acc": 81.0, "val_loss": 0.6}, confirm[0]])["trial"] == 3


def test_confirm_keeps_the_base_unless_the_best_leads_by_more_than_one_standard_error():
    from autoglm.graph.tune import _select

    base = {"trial": 0, "val_accs": [81.0, 80.0, 82.6], "val_acc": 81.2, "val_loss": 0.72}
    # per-seed leads 0.6, 0.6, -0.4: mean 0.27, standard error 0.33 -> within the noise, the base stays
    noisy = {"trial": 8, "val_accs": [81.6, 80.6, 82.2], "val_acc": 81.47, "val_loss": 0.70}
    assert _select([noisy, base])["trial"] == 0
    # leads 0.6, 0.8, 0.4: mean 0.6, standard error 0.12 -> a consistent gain, the candidate wins
    clear = {"trial": 4, "val_accs": [81.6, 80.8, 83.0], "val_acc": 81.8, "val_loss": 0.70}
    assert _select([noisy, clear, base])["trial"] == 4
    # the base as configured is the reference, not trial 0 at the epochs where one search run peaked
    peak = {**clear, "trial": 0, "base": False}
    assert _select([peak, {**base, "base": True}]) is peak
    assert _select([{**noisy, "base": False}, {**base, "trial": 0, "base": True}])["base"]
    # one seed: no spread to measure, the best score wins as before
    one = [{**noisy, "val_accs": [81.6], "val_acc": 81.6}, {**base, "val_accs": [81.0], "val_acc": 81.0}]
    assert _select(one)["trial"] == 8


def test_search_and_confirm_never_read_test_labels(graph):
    budget = TuneBudget(minutes=5, max_trials=3, eval_every=2, patience=2, confirm_top=2, report_seeds=0,
                        space=SMALL)
    a = tune_graph(graph, BASE, budget, probe_kw=ONE_PROBE)
    scrambled = graph.clone()
    g = torch.Generator().manual_seed(0)
    scrambled.y = torch.where(graph.test_mask & ~graph.val_mask & ~graph.train_mask,
                              torch.randint(0, 3, graph.y.shape, generator=g), graph.y)
    assert not torch.equal(scrambled.y, graph.y)
    b = tune_graph(scrambled, BASE, budget, probe_kw=ONE_PROBE)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(a["trials"]) == strip(b["trials"]) and a["confirm"] == b["confirm"]
    assert a["selected"] == b["selected"] and a["trials"][0]["overrides"] == {}
    best = max(a["confirm"], key=lambda r: (r["val_acc"], -r["val_loss"], r["trial"] == 0))
    assert a["selected"]["overrides"] == best["overrides"]  # the confirm stage's best validation mean (1 seed)
    assert 0 in {r["trial"] for r in a["confirm"]}  # the base is always confirmed


def test_early_stopping_and_budget_end_trials(graph):
    flat = load_config(GraphSSLConfig, overrides={"encoder.hidden_dim": 16, "optim.epochs": 40, "optim.lr": 1e-9})
    res = tune_graph(graph, flat, TuneBudget(minutes=5, max_trials=1, eval_every=2, patience=2, confirm_top=0,
                                             report_seeds=0, space=SMALL), probe_kw=ONE_PROBE)
    trial = res["trials"][0]
    assert trial["stopped"] == "patience" and len(trial["curve"]) < 20  # lr ~0: no progress, stopped early
    res = tune_graph(graph, BASE, TuneBudget(minutes=1e-6, max_trials=5, eval_every=2, confirm_top=0,
                                             report_seeds=1, space=SMALL), probe_kw=ONE_PROBE)
    assert len(res["trials"]) == 1 and res["stopped_by"] == "budget"  # the first trial always runs
    assert set(res["report"]) == {"base", "tuned"}


def test_confirm_skips_finalists_whose_retraining_would_overrun_the_budget(graph, monkeypatch):
    import autoglm.graph.tune as tune

    budget = TuneBudget(minutes=5, max_trials=3, eval_every=2, patience=2, confirm_top=2, report_seeds=0,
                        space=SMALL)
    monkeypatch.setattr(tune, "_epoch_seconds", lambda row: 0.0 if row["trial"] == 0 else 1e6)
    res = tune_graph(graph, BASE, budget, probe_kw=ONE_PROBE)
    assert [r["trial"] for r in res["confirm"]] == [0]  # the base first; the finalists would overrun
    assert res["confirm_skipped"] and 0 not in {r["trial"] for r in res["confirm_skipped"]}
    assert res["selected"]["trial"] == 0
    monkeypatch.setattr(tune, "_epoch_seconds", lambda row: 1e6)  # not even the base fits: it is kept
    res = tune_graph(graph, BASE, budget, probe_kw=ONE_PROBE)
    assert res["confirm"] == [] and 0 in {r["trial"] for r in res["confirm_skipped"]}
    assert res["selected"] == {"trial": 0, "overrides": {}} and res["tuned_config"] == BASE.to_dict()
    monkeypatch.setattr(tune, "_epoch_seconds", lambda row: 0.0)  # within the budget: nothing skipped
    res = tune_graph(graph, BASE, budget, probe_kw=ONE_PROBE)
    assert res["confirm_skipped"] == [] and len(res["confirm"]) >= 2 and res["confirm"][0]["trial"] == 0


def test_successive_halving_trains_many_settings_briefly_and_the_best_at_full_length(graph):
    space = {"loss.edge_weight": (0.0, 1.0), "loss.contrastive_weight": (0.0, 0.1, 0.3), "optim.epochs": (4, 8)}
    budget = TuneBudget(minutes=5, max_trials=6, eval_every=2, patience=9, confirm_top=2, report_seeds=0,
                        space=space, halving=2, rungs=2)
    res = tune_graph(graph, BASE, budget, probe_kw=ONE_PROBE)
    first = [r for r in res["trials"] if r["rung"] == 0]
    second = [r for r in res["trials"] if r["rung"] == 1]
    assert [r["trial"] for r in first] == list(range(6))
    full = {r["trial"]: _apply(BASE, r["overrides"]).optim.epochs for r in first}
    for r in first:  # a whole schedule of half the setting's epochs (at least one probe's worth)
        assert r["max_epochs"] == max(2, round(full[r["trial"]] / 2))
    ranked = sorted(first, key=lambda r: (-r["val_acc"], r["val_loss"]))[:3]
    assert {r["trial"] for r in second} == {r["trial"] for r in ranked} | {0}  # the best half, and the base
    assert all(r["max_epochs"] == full[r["trial"]] for r in second)
    # only the full-length rung is confirmed
    confirmed = {r["trial"] for r in res["confirm"]}
    assert confirmed <= {r["trial"] for r in second} and 0 in confirmed and len(confirmed) in (2, 3)


def test_missing_validation_split_is_a_clear_error(graph):
    no_val = graph.clone()
    del no_val.val_mask
    with pytest.raises(ValueError, match="no val_mask: the tuner selects settings on validation nodes only"):
        check_validation_split(no_val)
    empty = graph.clone()
    empty.val_mask = torch.zeros_like(graph.val_mask)
    with pytest.raises(ValueError, match="val_mask selects no node"):
        tune_graph(empty, BASE, TuneBudget(minutes=1), probe_kw=ONE_PROBE)


def test_missing_split_error_names_what_a_cli_user_can_do(tmp_path):
    """A cleaned folder has no labels: the error names the sources that carry a split (it used to
    suggest the Python function planetoid_split(y), which a CLI user cannot apply)."""
    (tmp_path / "e.csv").write_text("source,target\n0,1\n1,2\n2,0\n")
    r = CliRunner().invoke(app, ["graph", "clean", "--out", str(tmp_path / "g"), "--edges", str(tmp_path / "e.csv")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["graph", "tune", "--data", str(tmp_path / "g"), "--out", str(tmp_path / "t")])
    msg = " ".join(r.output.split())
    assert r.exit_code == 2 and "has no y, train_mask, val_mask" in msg and "planetoid_split" not in msg
    assert "'sbm'" in msg and "Cora / CiteSeer / PubMed (--data Cora --root DIR" in msg
    assert "`autoglm graph pretrain --data DIR`" in msg and not (tmp_path / "t").exists()


def test_cli_tune_writes_trials_and_a_reusable_config(tmp_path):
    # a budget of a few milliseconds: the base trial runs (it always does), no drawn setting starts,
    # and no confirmation fits: the base is kept
    r = CliRunner().invoke(app, ["graph", "tune", "--out", str(tmp_path / "t"), "--hidden-dim", "8", "--epochs", "4",
                                 "--minutes", "0.0001", "--max-trials", "3", "--eval-every", "2", "--confirm-top", "1",
                                 "--report-seeds", "1", "--probe-weight-decays", "1e-3", "--probe-standardize", "false"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in (tmp_path / "t" / "trials.jsonl").read_text().splitlines()]
    assert rows[0]["stage"] == "search" and rows[0]["overrides"] == {}
    assert len(rows) == 1  # no confirm rows
    tuned = load_config(__import__("autoglm.recipes.graph_ssl", fromlist=["x"]).GraphProbeConfig,
                        tmp_path / "t" / "tuned.yaml")
    res = json.loads((tmp_path / "t" / "result.json").read_text())
    assert tuned.ssl.to_dict() == res["tuned_config"] and set(res["report"]) == {"base", "tuned"}
    assert 0 in {r["trial"] for r in res["confirm_skipped"]} and res["selected"] == {"trial": 0, "overrides": {}}
    assert res["tuned_config"] == res["base_config"]
    assert res["stopped_by"] == "budget"
    assert "selected" in r.output and "tuned config" in r.output
    assert "not confirmed, the budget would run out" in " ".join(r.output.split())


def test_planetoid_split_inside_a_pool_never_touches_nodes_outside_it():
    from autoglm.graph.datasets import planetoid_split

    y = torch.arange(300) % 3
    held = torch.zeros(300, dtype=torch.bool)
    held[::4] = True  # e.g. a public test set that must stay unseen
    tr, va, te = planetoid_split(y, per_class=10, num_val=50, num_test=100, seed=3, pool=~held)
    assert not ((tr | va | te) & held).any()
    assert int(tr.sum()) == 30 and all(int((y[tr] == c).sum()) == 10 for c in range(3))
    assert int(va.sum()) == 50 and int(te.sum()) == 100 and not (tr & va).any() and not (va & te).any()
    assert torch.equal(planetoid_split(y, 10, 50, 100, seed=3, pool=~held)[1], va)  # seeded
    with pytest.raises(ValueError, match="bool mask"):
        planetoid_split(y, pool=torch.ones(5, dtype=torch.bool))
