"""Bring-your-own-graph ingestion: files as spreadsheets, pandas, DuckDB and JSON tools
export them (byte order mark, CRLF, quoted delimiters, sniffed delimiters, renamed columns,
ISO 8601 / epoch s / epoch ms / custom timestamps, JSONL, Parquet), every row kept or
quarantined with the first rule it broke, checked against hand-labelled rows; times
checked against Python's own `datetime` parsing."""

import csv
import math
from datetime import datetime, timezone

import duckdb
import pytest
import torch

from autoglm.graph.clean import CleaningRejected, clean_graph, load_clean_graph, time_snapshots


def _utc(s):
    """Reference parse: Python's datetime, zone-less = UTC (independent of DuckDB)."""
    d = datetime.fromisoformat(s.replace("Z", "+00:00"))
    return (d if d.tzinfo else d.replace(tzinfo=timezone.utc)).timestamp()


# (row as written, the rule a person would name or None if kept, expected edge_time if kept)
LABELLED = [
    ('"Smith, J.",b,cites,1.0,2024-01-01', None, _utc("2024-01-01")),
    ("b,c,cites,2,2024-01-06T10:00:00Z", None, _utc("2024-01-06T10:00:00Z")),
    ("c,d,cites,,2024-01-07T08:30:00+02:00", None, _utc("2024-01-07T08:30:00+02:00")),  # no weight: 1.0
    ("d,e,cites,1,1704067200", None, 1704067200.0),  # epoch seconds
    ("e,f,cites,1,1704067200123", None, 1704067200.123),  # epoch milliseconds (by magnitude)
    ('f,g,"likes, a lot",1,2024-01-01 12:00:00.5', None, _utc("2024-01-01 12:00:00.500")),  # no zone: UTC
    ("g,h,cites,1,", None, math.nan),  # no time: NaN in edge_time
    ("h,,cites,1,2024-01-01", "missing_endpoint", None),
    ("h,i,cites,heavy,yesterday", "bad_weight", None),  # two rules broken: the first in the order
    ("i,j,cites,1,yesterday", "bad_timestamp", None),
    ("i,j,cites,1,2024-02-30", "bad_timestamp", None),  # not a calendar date
    ("i,j,cites,1,01/02/2024", "bad_timestamp", None),  # needs --time-format
    ("k,l,cites,1,99999999999999999", "bad_timestamp", None),  # too large for s or ms
    ("k,l,cites,nan,2024-01-01", "bad_weight", None),
    ("j,j,cites,1,2024-01-01", "self_loop", None),
    ("j,j,cites,1,yesterday", "bad_timestamp", None),  # bad timestamp comes before self-loop
    ("a,b,cites,1", "malformed", None),  # 4 fields of 5
    ('"unterminated,b,cites,1,2024-01-01', "malformed", None),
    ("", "malformed", None),  # blank line
    ("b,c,cites,5,2024-03-01", "duplicate", None),  # same (source, target, relation) as line 3
    ("b,c,other,5,2024-03-01", None, _utc("2024-03-01")),  # another relation: a different edge
]
COLUMNS = {"source": "From User", "target": "to user", "relation": "Kind", "weight": "strength", "timestamp": "When"}


def _write_labelled(path):
    """A spreadsheet export: UTF-8 byte order mark, CRLF line ends, a quoted header name."""
    text = "\r\n".join(['"From User",To User,Kind,Strength,When'] + [r for r, _, _ in LABELLED]) + "\r\n"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())


def _quarantine(out):
    with open(out / "quarantine.csv", newline="") as f:
        return list(csv.DictReader(f))


def _names(out):
    with open(out / "nodes.csv", newline="") as f:
        return [r["name"] for r in csv.DictReader(f)]


def test_every_labelled_row_lands_where_a_person_would_put_it(tmp_path):
    _write_labelled(tmp_path / "e.csv")
    out = tmp_path / "out"
    rep = clean_graph(out, edges=[tmp_path / "e.csv"], columns=COLUMNS, allow_partial=True)
    t = rep["totals"]
    want_rules = [rule for _, rule, _ in LABELLED if rule]
    assert t["rows_in"] == len(LABELLED) == t["kept"] + t["quarantined"]
    assert t["kept"] == sum(rule is None for _, rule, _ in LABELLED)
    assert t["by_rule"] == {r: want_rules.count(r) for r in sorted(set(want_rules))}
    got = {int(q["line"]): q for q in _quarantine(out)}
    for line, (row, rule, _) in enumerate(LABELLED, start=2):  # line 1 is the header
        if rule is None:
            assert line not in got, (row, got.get(line))
        else:
            assert got[line]["reason"].split(":")[0] == rule, (row, got[line])
            assert got[line]["raw"] == row
    assert got[11]["value"] == "yesterday" and "pass --time-format" in got[11]["reason"]
    assert got[10]["value"] == "heavy" and got[21]["reason"] == "duplicate: of line 3"
    assert got[21]["value"] == "b -> c [cites]"

    g = load_clean_graph(out)
    g.validate(raise_on_error=True)
    names = _names(out)
    kept = [(r, want) for r, rule, want in LABELLED if rule is None]
    edges = [(names[s], names[d], g.relations[k]) for (s, d), k in zip(g.edge_index.t().tolist(), g.edge_type.tolist())]
    assert edges == [tuple(next(csv.reader([r]))[:3]) for r, _ in kept]  # quoted commas split as csv does
    want_t = torch.tensor([w for _, w in kept], dtype=torch.float64)
    torch.testing.assert_close(g.edge_time, want_t, equal_nan=True, rtol=0, atol=1e-3)
    assert g.edge_weight[2].item() == 1.0  # an empty weight is 1


def test_bad_id_is_reported_before_later_rules_jsonl_epoch_ms(tmp_path):
    """With --num-nodes an id 'abc' is `bad_id` whatever its timestamp (the issue's report);
    JSONL with renamed keys, a byte order mark and epoch milliseconds."""
    rows = [('{"src": 0, "dst": 1, "time": 1704067200000}', None),
            ('{"src": "abc", "dst": 1, "time": "2024-01-01"}', "bad_id"),
            ('{"src": "abc", "dst": 1, "time": "yesterday"}', "bad_id"),
            ('{"src": 1, "dst": 9, "time": 1704067200000}', "bad_id"),  # out of range
            ('{"src": "1.0", "dst": 2}', "bad_id"),  # not an integer
            ('{"src": 0, "dst": null, "time": "yesterday"}', "missing_endpoint"),
            ('{"src": 1, "dst": 2, "time": "2024-01-07T08:30:00+02:00"}', None),
            ('{"src": 2, "dst": 3, "weight": "x"}', "bad_weight"),
            ('{"src": 2, "dst": 3', "malformed"),
            ('[2, 3]', "malformed"),
            ('{"src": 2, "dst": 3, "time": 1704067200123}', None)]
    (tmp_path / "e.jsonl").write_bytes(b"\xef\xbb\xbf" + "\n".join(r for r, _ in rows).encode() + b"\n")
    rep = clean_graph(tmp_path / "out", edges=[tmp_path / "e.jsonl"], num_nodes=4, allow_partial=True,
                      columns={"timestamp": "time"})
    got = {int(q["line"]): q["reason"].split(":")[0] for q in _quarantine(tmp_path / "out")}
    assert got == {i: rule for i, (_, rule) in enumerate(rows, start=1) if rule}
    assert rep["totals"]["kept"] == 3 and rep["totals"]["examples"]["bad_id"]["value"] == "abc"
    g = load_clean_graph(tmp_path / "out")
    assert g.edge_index.tolist() == [[0, 1, 2], [1, 2, 3]]
    assert g.edge_time.tolist() == [1704067200.0, _utc("2024-01-07T08:30:00+02:00"), 1704067200.123]


def test_spreadsheet_export_of_the_issue_keeps_every_good_row(tmp_path):
    """The issue's file: a BOM and ISO dates; before, 1 of 5 rows was kept and the run exited 0."""
    text = ("source,target,relation,weight,timestamp\n" "a,b,cites,1,2024-01-01\n" "b,c,cites,1,2024-01-06T10:00:00Z\n"
            "c,d,cites,1,2024-01-07T08:30:00+02:00\n" "d,e,cites,1,1704067200\n" "e,a,cites,1,2024-01-02\n")
    (tmp_path / "e.csv").write_bytes("\ufeff".encode() + text.encode())
    rep = clean_graph(tmp_path / "out", edges=[tmp_path / "e.csv"])
    assert rep["totals"]["kept"] == 5 and rep["totals"]["quarantined"] == 0
    assert not torch.isnan(load_clean_graph(tmp_path / "out").edge_time).any()


def test_parquet_with_typed_columns_and_a_node_table(tmp_path):
    con = duckdb.connect()
    con.execute(f"""COPY (SELECT * FROM (VALUES
        ('a', 'b', TIMESTAMPTZ '2024-01-01 10:00:00+02', 1.5),
        ('b', 'c', TIMESTAMPTZ '2024-01-02 00:00:00+00', NULL),
        ('b', NULL, TIMESTAMPTZ '2024-01-02 00:00:00+00', 1.0),
        ('a', 'b', NULL, 2.0),
        ('c', 'c', NULL, 1.0)) t(u, v, seen_at, strength)) TO '{tmp_path / "e.parquet"}' (FORMAT parquet)""")
    con.execute(f"""COPY (SELECT * FROM (VALUES ('a', [1.0, 2.0]), ('b', [3.0, 4.0]), ('c', [5.0]), ('a', [0.0, 0.0])
        ) t(name, features)) TO '{tmp_path / "n.parquet"}' (FORMAT parquet)""")
    rep = clean_graph(tmp_path / "out", edges=[tmp_path / "e.parquet"], nodes=[tmp_path / "n.parquet"],
                      columns={"source": "u", "target": "v", "timestamp": "seen_at", "weight": "strength",
                               "id": "name"},
                      max_quarantine=0.6)
    assert rep["totals"]["by_rule"] == {"duplicate": 2, "missing_endpoint": 1, "self_loop": 1, "wrong_width": 1}
    assert rep["totals"]["rows_in"] == 9 and rep["totals"]["kept"] == 4
    q = {(r["file"].endswith("n.parquet"), int(r["line"])): r for r in _quarantine(tmp_path / "out")}
    assert q[(False, 3)]["reason"] == "missing_endpoint: no target" and '"u":"b"' in q[(False, 3)]["raw"]
    g = load_clean_graph(tmp_path / "out")
    assert g.edge_time.tolist() == [_utc("2024-01-01T10:00:00+02:00"), _utc("2024-01-02T00:00:00Z")]
    assert g.edge_weight.tolist() == [1.5, 1.0]
    names = _names(tmp_path / "out")
    assert g.x[names.index("b")].tolist() == [3.0, 4.0] and g.imputed[names.index("c")]


@pytest.mark.parametrize("delim, name", [(";", "e.csv"), ("|", "e.txt"), ("\t", "e.tsv")])
def test_delimiter_sniffed_from_the_header(tmp_path, delim, name):
    rows = [["source", "target", "relation"], ["Smith; J.", "b|c", "x"], ["b|c", "d", "y\tz"]]
    with open(tmp_path / name, "w", newline="") as f:
        csv.writer(f, delimiter=delim, lineterminator="\r\n").writerows(rows)
    clean_graph(tmp_path / "out", edges=[tmp_path / name])
    g = load_clean_graph(tmp_path / "out")
    names = _names(tmp_path / "out")
    assert [(names[s], names[d]) for s, d in g.edge_index.t().tolist()] == [("Smith; J.", "b|c"), ("b|c", "d")]
    assert sorted(g.relations) == ["x", "y\tz"]


def test_given_delimiter_time_format_and_time_unit(tmp_path):
    (tmp_path / "e.csv").write_text("a;b;t\n0;1;01/02/2024 10:00\n1;2;2024-01-01\n2;3;02/02/2024 00:00\n")
    with pytest.raises(ValueError, match="no source column"):  # ',' given: one column 'a;b;t'
        clean_graph(tmp_path / "o0", edges=[tmp_path / "e.csv"], delimiter=",", columns={"target": "b"})
    rep = clean_graph(tmp_path / "out", edges=[tmp_path / "e.csv"], delimiter=";", time_format="%d/%m/%Y %H:%M",
                      columns={"source": "a", "target": "b", "timestamp": "t"})
    assert rep["totals"]["by_rule"] == {"bad_timestamp": 1}  # with a format, ISO is not guessed
    assert load_clean_graph(tmp_path / "out").edge_time.tolist() == [_utc("2024-02-01T10:00"), _utc("2024-02-02")]
    (tmp_path / "s.csv").write_text("source,target,ts\n0,1,1000\n1,2,2000\n")
    rep = clean_graph(tmp_path / "o2", edges=[tmp_path / "s.csv"], time_unit="ms")
    assert load_clean_graph(tmp_path / "o2").edge_time.tolist() == [1.0, 2.0]
    with pytest.raises(ValueError, match="time_unit 'us' must be one of auto, s, ms"):
        clean_graph(tmp_path / "o3", edges=[tmp_path / "s.csv"], time_unit="us")
    with pytest.raises(ValueError, match="one column used for two roles"):
        clean_graph(tmp_path / "o3", edges=[tmp_path / "s.csv"], columns={"target": "source"})
    assert not (tmp_path / "o0").exists() and not (tmp_path / "o3").exists()


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_guard_rails_trip_and_leave_the_folder_unchanged(tmp_path):
    good, out = tmp_path / "good.csv", tmp_path / "out"
    good.write_text("source,target,timestamp\na,b,2024-01-01\nb,c,2024-01-02\n")
    clean_graph(out, edges=[good])
    before = _snapshot(out)
    bad = tmp_path / "bad.csv"
    bad.write_text("source,target,timestamp\nc,d,2024-01-03\nd,e,01/02/2024\ne,f,01/03/2024\n")  # 2 of 3 bad
    with pytest.raises(CleaningRejected, match=r"2 of 3 rows \(67%\) were quarantined, above the limit of 50%.*"
                                               r"bad_timestamp 2; e.g. bad.csv line 3: bad_timestamp.*'01/02/2024'"
                                               r".*--allow-partial to keep the 1 good rows") as e:
        clean_graph(out, edges=[good, bad])
    assert e.value.report["totals"]["rows_in"] == 3
    assert _snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["bad.csv", "good.csv", "out"]
    with pytest.raises(CleaningRejected, match="no row of 3 was kept"):
        clean_graph(tmp_path / "new", edges=[bad], time_format="%Y-%m-%dT%H")
    assert not (tmp_path / "new").exists()
    rep = clean_graph(out, edges=[good, bad], max_quarantine=0.7)  # a looser limit passes
    assert rep["totals"]["kept"] == 1 and load_clean_graph(out).edge_index.shape[1] == 3
    assert (out / "quarantine.csv").read_text().count("bad_timestamp") == 2


def test_dry_run_reports_and_writes_nothing(tmp_path):
    _write_labelled(tmp_path / "e.csv")
    kw = dict(edges=[tmp_path / "e.csv"], columns=COLUMNS, allow_partial=True)
    dry = clean_graph(tmp_path / "out", dry_run=True, **kw)
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["e.csv"]
    real = clean_graph(tmp_path / "out", **kw)
    assert dry["totals"] == real["totals"] and dry["dry_run"] and not real["dry_run"]
    assert [dry["graph"][k] == real["graph"][k] for k in ("num_nodes", "num_edges")] == [True, True]
    before = _snapshot(tmp_path / "out")
    again = clean_graph(tmp_path / "out", dry_run=True, **kw)  # the file is already ingested: skipped
    assert again["totals"]["rows_in"] == 0 and _snapshot(tmp_path / "out") == before
    with pytest.raises(CleaningRejected):  # a dry run trips the same guard rails as a real run
        clean_graph(tmp_path / "out2", dry_run=True, edges=[tmp_path / "e.csv"], columns=COLUMNS)


def test_time_snapshots_use_the_parsed_edge_time(tmp_path):
    (tmp_path / "e.csv").write_text("source,target,timestamp\n0,1,2024-01-01T00:00:00+01:00\n1,2,2024-01-01\n"
                                    "2,3,1704153600000\n3,0,\n")  # 2023-12-31 23:00Z, 2024-01-01, 2024-01-02, none
    (tmp_path / "n.csv").write_text("id,f\n0,1\n1,2\n2,3\n3,4\n")
    clean_graph(tmp_path / "out", edges=[tmp_path / "e.csv"], nodes=[tmp_path / "n.csv"])
    g = load_clean_graph(tmp_path / "out")
    snaps = time_snapshots(g, 2)
    assert [ei.t().tolist() for _, ei in snaps] == [[[0, 1], [1, 2], [3, 0]], [[2, 3], [3, 0]]]
    assert [ei.shape[1] for _, ei in time_snapshots(g, 2, cumulative=True)] == [3, 4]
    from autoglm.graph.encoder import GraphEncoder

    states = GraphEncoder(1, 8, num_layers=1).forward_sequence(snaps)
    assert len(states) == 2 and states[-1].shape == (4, 8)
