"""Reconstruction-error anomaly scores: planted contextual anomalies (features copied from
another block) rank high, though the per-column feature z-score cannot see them; in
`clean_graph` they are flagged, never dropped."""

import pytest
import torch
from typer.testing import CliRunner

from autoglm.cli import app
from autoglm.graph.anomaly import reconstruction_errors, robust_z
from autoglm.graph.clean import anomaly_scores, clean_graph, load_clean_graph
from autoglm.graph.datasets import sbm_graph

N = 300


@pytest.fixture(scope="module")
def planted():
    """SBM graph whose 15 planted nodes carry the features of a random node of another block."""
    d = sbm_graph(N, 4, 64, 0.08, 0.004, feature_signal=0.4, seed=0)
    g = torch.Generator().manual_seed(1)
    idx = torch.randperm(N, generator=g)[:15]
    x = d.x.clone()
    for i in idx.tolist():
        other = torch.nonzero(d.y != d.y[i]).flatten()
        x[i] = d.x[other[torch.randint(len(other), (1,), generator=g)]]
    return x, d.edge_index, idx


def _auc(score, pos):
    lab = torch.zeros(N, dtype=torch.bool)
    lab[pos] = True
    return float((score[lab][:, None] > score[~lab][None, :]).float().mean())


def test_robust_z_matches_formula():
    s = torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0])
    mad = torch.tensor([2.0, 1.0, 0.0, 1.0, 97.0]).median() * 1.4826
    torch.testing.assert_close(robust_z(s), (s - 3.0) / mad)
    assert robust_z(torch.ones(4)).eq(0).all()


def test_reconstruction_error_ranks_planted_anomalies(planted):
    x, ei, idx = planted
    err = reconstruction_errors(x, ei, epochs=100, seed=0)
    _, feature_z = anomaly_scores(x, ei, N)
    assert _auc(err, idx) > 0.9
    assert _auc(feature_z, idx) < 0.7  # the column-wise z-score cannot tell them apart
    torch.testing.assert_close(reconstruction_errors(x, ei, epochs=100, seed=0), err)  # deterministic


def test_clean_flags_not_drops(tmp_path, planted):
    x, ei, idx = planted
    und = ei[:, ei[0] < ei[1]]
    (tmp_path / "e.csv").write_text("source,target\n" + "".join(f"{s},{t}\n" for s, t in und.t().tolist()))
    (tmp_path / "n.csv").write_text("id," + ",".join(f"f{j}" for j in range(64)) + "\n" + "".join(
        f"{i}," + ",".join(f"{v:g}" for v in row) + "\n" for i, row in enumerate(x.tolist())))
    rep = clean_graph(tmp_path / "out", edges=[tmp_path / "e.csv"], nodes=[tmp_path / "n.csv"], num_nodes=N,
                      recon_anomaly=True)
    g = load_clean_graph(tmp_path / "out")
    assert g.num_nodes == N and g.edge_index.shape[1] == und.shape[1] and rep["totals"]["quarantined"] == 0
    flagged = g.recon_z > 3.0
    assert bool((g.anomaly | ~flagged).all()) and rep["graph"]["recon_anomalies"] == int(flagged.sum())
    hits = int(flagged[idx].sum())
    assert hits >= 5 and hits / int(flagged.sum()) >= 0.6  # recall 1/3+, precision 60%+ at |z| > 3


def test_recon_anomaly_needs_features(tmp_path):
    (tmp_path / "e.csv").write_text("source,target\na,b\nb,c\n")
    res = CliRunner().invoke(app, ["graph", "clean", "--out", str(tmp_path / "o"), "--edges",
                                   str(tmp_path / "e.csv"), "--recon-anomaly"])
    assert res.exit_code == 2 and "needs node features" in res.output
