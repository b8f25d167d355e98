"""Cleaning pipeline: rows per rule vs a naive Python reference, quarantine with reasons,
incremental sync, imputation vs the harmonic solution, anomaly flags, bad input."""

import csv

import numpy as np
import pytest
import torch

from autoglm.graph.clean import CleaningRejected, anomaly_scores, clean_graph, load_clean_graph, propagate_features

EDGES = """source,target,relation,weight
a,b,cites,1.0
b,c,cites,2.0
a,b,cites,3.0
a,b,likes,1.0
c,c,cites,1.0
d,,cites,1.0
,e,cites,1.0
e,f,cites,heavy
x,y,cites,1.0,extra

f,a,cites,0.5
"""


def _naive_clean(text):
    """Independent reference: the same rules written as a plain Python loop."""
    lines = text.split("\n")[1:-1]
    kept, reasons, seen = [], [], set()
    for ln, line in enumerate(lines, start=2):
        f = line.split(",")
        if not line.strip():
            reasons.append("malformed")
        elif len(f) != 4:
            reasons.append("malformed")
        elif not f[0] or not f[1]:
            reasons.append("missing_endpoint")
        elif f[3] and not _isfloat(f[3]):
            reasons.append("bad_weight")
        elif f[0] == f[1]:
            reasons.append("self_loop")
        elif (f[0], f[1], f[2]) in seen:
            reasons.append("duplicate")
        else:
            seen.add((f[0], f[1], f[2]))
            kept.append((f[0], f[1], f[2], float(f[3])))
    return kept, reasons


def _isfloat(s):
    try:
        float(s)
        return True
    except ValueError:
        return False


def test_edge_rules_match_reference(tmp_path):
    (tmp_path / "e.csv").write_text(EDGES)
    rep = clean_graph(tmp_path / "out", edges=[tmp_path / "e.csv"], allow_partial=True)  # 7 of 11 quarantined
    kept, reasons = _naive_clean(EDGES)
    t = rep["totals"]
    assert t["rows_in"] == len(EDGES.split("\n")) - 2 == t["kept"] + t["quarantined"]
    assert t["kept"] == len(kept)
    assert t["by_rule"] == {r: reasons.count(r) for r in sorted(set(reasons))}
    g = load_clean_graph(tmp_path / "out")
    names = [r["name"] for r in csv.DictReader(open(tmp_path / "out" / "nodes.csv"))]
    got = [(names[s], names[d], g.relations[r], w) for (s, d), r, w in
           zip(g.edge_index.t().tolist(), g.edge_type.tolist(), g.edge_weight.tolist())]
    assert got == kept
    q = list(csv.DictReader(open(tmp_path / "out" / "quarantine.csv")))
    assert len(q) == t["quarantined"]
    assert {"line": "9", "raw": "e,f,cites,heavy"}.items() <= {k: q_[k] for q_ in q if q_["line"] == "9"
                                                               for k in ("line", "raw")}.items()
    assert any(r["reason"].startswith("malformed: expected 4 fields, got 5") for r in q)


def test_incremental_sync_processes_only_new_rows(tmp_path):
    e = tmp_path / "e.csv"
    e.write_text("source,target\n0,1\n1,2\n")
    out = tmp_path / "out"
    assert clean_graph(out, edges=[e])["totals"]["kept"] == 2
    again = clean_graph(out, edges=[e])
    assert again["totals"]["rows_in"] == 0 and again["files"][0]["skipped"]
    with open(e, "a") as f:
        f.write("2,3\n0,1\n")  # one new edge, one duplicate of an edge from the first run
    rep = clean_graph(out, edges=[e])
    assert {k: rep["totals"][k] for k in ("rows_in", "kept", "quarantined", "by_rule")} == \
        {"rows_in": 2, "kept": 1, "quarantined": 1, "by_rule": {"duplicate": 1}}
    assert rep["totals"]["examples"]["duplicate"]["value"] == "0 -> 1"  # the edge kept by the first run
    e2 = tmp_path / "e2.jsonl"
    e2.write_text('{"source": "3", "target": "4", "weight": 2}\n{"source": "3"\n')
    rep = clean_graph(out, edges=[e, e2])
    assert rep["files"][0]["rows_in"] == 0
    assert rep["totals"]["by_rule"] == {"malformed": 1}
    g = load_clean_graph(out)
    assert g.edge_index.shape[1] == 4 and g.num_nodes == 5
    e.write_text("source,target\n9,9\n")
    with pytest.raises(ValueError, match="changed since it was ingested"):
        clean_graph(out, edges=[e])


def test_nodes_triples_out_of_range_and_imputation(tmp_path):
    (tmp_path / "t.tsv").write_text("subject\trelation\tobject\n0\tr\t1\n1\tr\t2\n2\tr\t7\n1\tr\tx\n")
    (tmp_path / "n.jsonl").write_text('{"id": 0, "features": [1.0, 0.0]}\n{"id": 2, "features": [3.0, 4.0]}\n'
                                      '{"id": 1, "features": [1.0]}\n{"id": 1, "features": ["a", 2]}\n'
                                      '{"features": [1, 1]}\n{"id": 0, "features": [9, 9]}\n')
    rep = clean_graph(tmp_path / "out", triples=[tmp_path / "t.tsv"], nodes=[tmp_path / "n.jsonl"], num_nodes=4,
                      allow_partial=True)
    assert rep["totals"]["by_rule"] == {"bad_id": 2, "duplicate": 1, "missing_id": 1, "non_numeric": 1,
                                        "wrong_width": 1}
    g = load_clean_graph(tmp_path / "out")
    assert g.num_nodes == 4 and g.edge_index.tolist() == [[0, 1], [1, 2]]
    # node 1 (no valid feature row) sits between 0 and 2: neighbour mean; node 3 is isolated: column mean
    torch.testing.assert_close(g.x, torch.tensor([[1.0, 0.0], [2.0, 2.0], [3.0, 4.0], [2.0, 2.0]]))
    assert g.imputed.tolist() == [False, True, False, True]


def test_propagation_converges_to_harmonic_solution():
    n = 8  # path 0-1-...-7 plus a chord; nodes 0, 7 and 4 known
    ei = torch.tensor([[i for i in range(n - 1)] + [2], [i + 1 for i in range(n - 1)] + [6]])
    x = torch.randn(n, 3)
    known = torch.zeros(n, 3, dtype=torch.bool)
    known[[0, 4, 7]] = True
    out = propagate_features(x.masked_fill(~known, float("nan")), known, ei, steps=500)
    a = np.zeros((n, n))  # reference: solve L_uu x_u = -L_uk x_k
    for s, t in ei.t().tolist():
        a[s, t] = a[t, s] = 1
    lap = np.diag(a.sum(1)) - a
    u, k = [1, 2, 3, 5, 6], [0, 4, 7]
    ref = np.linalg.solve(lap[np.ix_(u, u)], -lap[np.ix_(u, k)] @ x[k].numpy())
    np.testing.assert_allclose(out[u].numpy(), ref, rtol=1e-4, atol=1e-5)
    assert torch.equal(out[k], x[k])


def test_anomaly_flags_hub_and_outlier_features(tmp_path):
    rows = ["source,target"] + [f"{i},{(i + 1) % 60}" for i in range(60)] + [f"0,{i}" for i in range(2, 59)]
    (tmp_path / "e.csv").write_text("\n".join(rows) + "\n")
    feats = ["id,f0,f1"] + [f"{i},{i % 3},{i % 5}" for i in range(60)]
    feats[31] = "30,500,-400"
    (tmp_path / "n.csv").write_text("\n".join(feats) + "\n")
    rep = clean_graph(tmp_path / "out", edges=[tmp_path / "e.csv"], nodes=[tmp_path / "n.csv"])
    g = load_clean_graph(tmp_path / "out")
    names = [r["name"] for r in csv.DictReader(open(tmp_path / "out" / "nodes.csv"))]
    flagged = sorted(names[i] for i in g.anomaly.nonzero().flatten().tolist())
    assert flagged == ["0", "30"]
    assert rep["graph"]["anomalies"] == 2 and g.num_nodes == 60  # flagged, not dropped
    dz, fz = anomaly_scores(None, torch.tensor([[0, 0], [1, 2]]), 3)
    assert fz.abs().sum() == 0 and dz.shape == (3,)


def test_bad_input_messages(tmp_path):
    (tmp_path / "h.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match=r"no source column \(looked for source, src, subject, head, from\); "
                                         r"columns found: 'a', 'b'; name the column with --source-col NAME"):
        clean_graph(tmp_path / "o1", edges=[tmp_path / "h.csv"])
    with pytest.raises(ValueError, match=r"no column 'from_id' \(given by --source-col\); columns found: 'a', 'b'"):
        clean_graph(tmp_path / "o1", edges=[tmp_path / "h.csv"], columns={"source": "from_id"})
    assert not (tmp_path / "o1").exists()
    (tmp_path / "loops.csv").write_text("source,target\n1,1\n2,2\n")
    with pytest.raises(CleaningRejected, match=r"no row of 2 was kept \(self_loop 2; e.g. loops.csv line 2: "
                                               r"self_loop \('1'\)\)"):
        clean_graph(tmp_path / "o2", edges=[tmp_path / "loops.csv"])
    with pytest.raises(CleaningRejected, match="the cleaned graph is empty"):
        clean_graph(tmp_path / "o2", edges=[tmp_path / "loops.csv"], allow_partial=True)
    assert not (tmp_path / "o2").exists()  # a failed run writes nothing: no stray graph.duckdb
    (tmp_path / "loops.csv").write_text("source,target\n1,1\n2,2\n1,2\n")
    rep = clean_graph(tmp_path / "o2", edges=[tmp_path / "loops.csv"], allow_partial=True)  # retry: nothing left over
    assert (rep["totals"]["rows_in"], rep["totals"]["kept"], rep["totals"]["by_rule"]) == (3, 1, {"self_loop": 2})
    with pytest.raises(ValueError, match="no input files"):
        clean_graph(tmp_path / "o3")
    (tmp_path / "x.xlsx").write_text("")
    with pytest.raises(ValueError, match="unsupported extension '.xlsx'; use .csv, .tsv"):
        clean_graph(tmp_path / "o4", edges=[tmp_path / "x.xlsx"])


def test_quoted_csv_and_tsv_fields_match_python_csv(tmp_path):
    """Delimiters inside double quotes, "" escapes, quoted node ids in a TSV: fields as
    Python's csv module reads them; an unbalanced quote is quarantined, not mis-split."""
    rows = [["source", "target", "relation", "weight"], ["Smith, J.", "Doe, A.", "cites", "1.0"],
            ["a", "b", "knows, well", "2"], ['say "hi"', "b", "r", "1"], ["c", "d", "", "1"]]
    edges = tmp_path / "e.csv"
    with open(edges, "w", newline="") as f:
        csv.writer(f, quoting=csv.QUOTE_MINIMAL, lineterminator="\n").writerows(rows)
    with open(edges, "a") as f:
        f.write('"unterminated,b,r,1\n')
    nodes = tmp_path / "n.tsv"
    nodes.write_text('id\tf0\tf1\n"Smith, J."\t1.0\t2.0\n"tab\there"\t3\t4\n')
    rep = clean_graph(tmp_path / "out", edges=[edges], nodes=[nodes])
    assert rep["totals"]["rows_in"] == 5 + 2 and rep["totals"]["kept"] == 4 + 2  # edge rows + node rows
    assert rep["totals"]["by_rule"] == {"malformed": 1}
    with open(tmp_path / "out" / "quarantine.csv") as f:
        q = list(csv.DictReader(f))
    assert [(r["line"], r["reason"]) for r in q] == [("6", "malformed: unbalanced quotes")]
    with open(tmp_path / "out" / "nodes.csv") as f:
        names = [r["name"] for r in csv.DictReader(f)]
    g = load_clean_graph(tmp_path / "out")
    got = sorted((names[s], names[t]) for s, t in g.edge_index.t().tolist())
    assert got == sorted((r[0], r[1]) for r in rows[1:])
    assert sorted(g.relations) == ["", "cites", "knows, well", "r"]
    assert g.x[names.index("Smith, J.")].tolist() == [1.0, 2.0] and g.x[names.index("tab\there")].tolist() == [3.0, 4.0]


def test_guard_judges_edge_rows_and_node_rows_separately(tmp_path):
    """Every edge quarantined but 7 good node rows: 3 of 10 rows (30%) passed the old pooled guard
    and wrote a graph of 0 edges. Each kind is judged on its own; a graph without edges is refused
    unless allow_partial."""
    from typer.testing import CliRunner

    from autoglm.cli import app

    (tmp_path / "e.csv").write_text("source,target\n1,1\n2,2\n3,3\n")
    (tmp_path / "n.csv").write_text("id,a\n" + "".join(f"{i},{i}\n" for i in range(1, 8)))
    kw = dict(edges=[tmp_path / "e.csv"], nodes=[tmp_path / "n.csv"])
    with pytest.raises(CleaningRejected, match=r"no edge row of 3 was kept \(self_loop 3; e.g. e.csv line 2") as e:
        clean_graph(tmp_path / "out", **kw)
    assert e.value.report["totals"]["quarantined"] / e.value.report["totals"]["rows_in"] == 0.3  # under the limit
    (tmp_path / "half.csv").write_text("source,target\n1,2\n3,3\n4,4\n")  # 2 of 3 edge rows, 2 of 10 rows
    with pytest.raises(CleaningRejected, match=r"2 of 3 edge rows \(67%\) were quarantined.*keep the 1 good edge rows"):
        clean_graph(tmp_path / "out", edges=[tmp_path / "half.csv"], nodes=[tmp_path / "n.csv"])
    with pytest.raises(CleaningRejected, match="would have no edges: no edge file was given.*--edges FILE"):
        clean_graph(tmp_path / "out", nodes=[tmp_path / "n.csv"])
    assert not (tmp_path / "out").exists()
    r = CliRunner().invoke(app, ["graph", "clean", "--out", str(tmp_path / "out"), "--edges", str(tmp_path / "e.csv"),
                                 "--nodes", str(tmp_path / "n.csv")])
    assert r.exit_code == 2 and "no edge row of 3 was kept" in " ".join(r.output.split())
    rep = clean_graph(tmp_path / "out", allow_partial=True, **kw)  # asked for: the nodes without edges
    assert rep["graph"]["num_edges"] == 0 and load_clean_graph(tmp_path / "out").num_nodes == 7
    (tmp_path / "more.csv").write_text("source,target\n1,2\n")
    rep = clean_graph(tmp_path / "out2", edges=[tmp_path / "more.csv"])
    rep = clean_graph(tmp_path / "out2", nodes=[tmp_path / "n.csv"])  # node rows only, into a graph with edges
    assert rep["graph"]["num_edges"] == 1 and rep["totals"]["kept"] == 7
