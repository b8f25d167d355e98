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
    ("b,c,cites,5,2024-01-06 12:00:00+02:00", "duplicate", None),  # line 3's (source, target, relation, time)
    ("b,c,other,5,2024-03-01", None, _utc("2024-03-01")),  # another relation: a different edge
    ("b,c,cites,5,2024-03-01", None, _utc("2024-03-01")),  # line 3's pair at another time: a repeated interaction
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
    assert got[21]["value"] == "b -> c [cites] at 2024-01-06 10:00:00+00"  # the time in UTC

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
        ('a', 'b', TIMESTAMPTZ '2024-01-01 08:00:00+00', 2.0),  -- the first row's instant: a duplicate
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


def test_repeated_interactions_are_kept_and_only_same_time_repeats_are_duplicates(tmp_path):
    """A dynamic graph's data: the same pair on many days. The duplicate key is (source, target,
    relation, time), checked against a plain Python set of the parsed times."""
    rows = [(f"u{p}", f"v{p}", f"2024-01-{d + 1:02d}") for d in range(10) for p in range(6)]
    rows += [("u0", "v0", "2024-01-01T02:00:00+02:00"),  # the instant of 2024-01-01 00:00Z: a duplicate
             ("u1", "v1", ""), ("u1", "v1", "")]  # two rows without a time: the second is a duplicate
    (tmp_path / "e.csv").write_text("source,target,timestamp\n" + "".join(f"{a},{b},{t}\n" for a, b, t in rows))
    rep = clean_graph(tmp_path / "out", edges=[tmp_path / "e.csv"])
    seen, want_kept = set(), 0
    for a, b, t in rows:
        key = (a, b, _utc(t) if t else None)
        want_kept += key not in seen
        seen.add(key)
    assert rep["totals"]["kept"] == want_kept == 61 and rep["totals"]["by_rule"] == {"duplicate": 2}
    q = {int(r["line"]): r for r in _quarantine(tmp_path / "out")}
    assert q[62]["reason"] == "duplicate: of line 2" and q[62]["value"] == "u0 -> v0 at 2024-01-01 00:00:00+00"
    assert q[64]["reason"] == "duplicate: of line 63" and q[64]["value"] == "u1 -> v1"
    assert load_clean_graph(tmp_path / "out").edge_index.shape[1] == 61
    # a later file repeating a kept (pair, time) is a duplicate of that run's row; another time is new
    (tmp_path / "more.csv").write_text("source,target,timestamp\nu2,v2,2024-01-03\nu2,v2,2024-02-01\n")
    rep = clean_graph(tmp_path / "out", edges=[tmp_path / "e.csv", tmp_path / "more.csv"])
    assert (rep["totals"]["kept"], rep["totals"]["by_rule"]) == (1, {"duplicate": 1})
    assert rep["totals"]["examples"]["duplicate"]["reason"].endswith("e.csv line 16")


def test_integer_ids_written_with_zeros_or_signs_are_one_node(tmp_path):
    """With num_nodes, '03', '+1' and '007' are the integers 3, 1, 7 (as Python's int() reads them):
    every kept row is an edge, and '3,4' after '03,4' is a duplicate."""
    rows = ["03,4", "+1,2", "5,6", "007,8", "3,4", "-0,9"]
    (tmp_path / "e.csv").write_text("source,target\n" + "\n".join(rows) + "\n")
    (tmp_path / "n.csv").write_text("id,f\n004,1.5\n+9,2.5\n")
    rep = clean_graph(tmp_path / "out", edges=[tmp_path / "e.csv"], nodes=[tmp_path / "n.csv"], num_nodes=10)
    assert rep["totals"]["by_rule"] == {"duplicate": 1} and rep["totals"]["kept"] == 7
    g = load_clean_graph(tmp_path / "out")
    want = [(int(a), int(b)) for a, b in (r.split(",") for r in rows)]
    want = list(dict.fromkeys(want))  # the first of each pair
    assert g.edge_index.t().tolist() == [list(p) for p in want] and g.num_nodes == 10
    assert g.x[4].item() == 1.5 and g.x[9].item() == 2.5 and not g.imputed[[4, 9]].any()
    assert _names(tmp_path / "out") == [str(i) for i in range(10)]


def test_build_refuses_kept_rows_that_join_no_node(tmp_path):
    """The build step checks that every kept edge row became an edge (an id spelled unlike the
    node index, as '03' was before ids were normalised, used to vanish at the join)."""
    (tmp_path / "e.csv").write_text("source,target\n0,1\n")
    out = tmp_path / "out"
    clean_graph(out, edges=[tmp_path / "e.csv"], num_nodes=5)
    con = duckdb.connect(str(out / "graph.duckdb"))  # a folder written by a version that kept '03' as text
    con.execute("INSERT INTO edges VALUES ('03', '4', '', 1.0, NULL, 'old.csv', 2)")
    con.close()
    before = _snapshot(out)
    (tmp_path / "f.csv").write_text("source,target\n1,2\n")
    with pytest.raises(RuntimeError, match="1 of 3 kept edge rows found no node index entry.*fresh --out"):
        clean_graph(out, edges=[tmp_path / "f.csv"], num_nodes=5)
    assert _snapshot(out) == before


@pytest.mark.parametrize("data, enc", [("source,target,relation\n1,2,café\n".encode("latin-1"), "latin1"),
                                       ("source\ttarget\n1\t2\n".encode("utf-16"), "utf-16")],
                         ids=["latin1", "utf16"])
def test_a_file_that_is_not_utf8_is_one_clear_error(tmp_path, data, enc):
    """A latin-1 CSV and an Excel "Unicode text" export (UTF-16): a ValueError naming the file and the
    iconv command, on the CLI one line and exit 2 (was a DuckDB traceback)."""
    from typer.testing import CliRunner

    from autoglm.cli import app

    path = tmp_path / "e.csv"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=rf"{path} is not UTF-8 text \(line \d\).*iconv -f {enc} -t utf-8 {path} "):
        clean_graph(tmp_path / "out", edges=[path])
    data.decode(enc)  # the hint names the encoding the bytes really are in
    r = CliRunner().invoke(app, ["graph", "clean", "--out", str(tmp_path / "out"), "--edges", str(path)])
    assert r.exit_code == 2 and r.output.startswith("error:") and "Traceback" not in r.output
    assert not (tmp_path / "out").exists()


def test_bad_memory_limit_and_unreadable_parquet_are_clear_errors(tmp_path):
    from typer.testing import CliRunner

    from autoglm.cli import app

    (tmp_path / "e.csv").write_text("source,target\n0,1\n")
    for bad in ("lots", "4", "0GB", "150%", "4GB'; DROP TABLE edges; --"):
        with pytest.raises(ValueError, match=f"memory_limit {bad!r} is not a size.*--memory-limit"):
            clean_graph(tmp_path / "out", edges=[tmp_path / "e.csv"], memory_limit=bad)
    for good in ("512MB", "1.5 GB", "2GiB", "50%"):
        clean_graph(tmp_path / f"ok{good[:2]}", edges=[tmp_path / "e.csv"], memory_limit=good, dry_run=True)
    r = CliRunner().invoke(app, ["graph", "clean", "--out", str(tmp_path / "o"), "--edges", str(tmp_path / "e.csv"),
                                 "--memory-limit", "lots"])
    assert r.exit_code == 2 and "memory_limit 'lots' is not a size" in r.output and "Traceback" not in r.output
    (tmp_path / "p.parquet").write_bytes(b"PAR1 not really parquet")
    with pytest.raises(ValueError, match="p.parquet: cannot be read as parquet"):
        clean_graph(tmp_path / "o2", edges=[tmp_path / "p.parquet"])


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_missing_value_markers_are_empty_cells(tmp_path, fmt):
    """NULL, NA, N/A, NaN, None (any case) as an endpoint: missing_endpoint; as a time: no time
    (NaN), like an empty cell; as a node id: missing_id. Never a node named 'NULL'."""
    markers = ["NULL", "na", "N/A", "NaN", "None", "null", " NA "]
    rows = [(m, "b", "2024-01-01") for m in markers] + [("a", m, "2024-01-01") for m in markers]
    rows += [(f"t{i}", "c", m) for i, m in enumerate(markers + [""])]
    if fmt == "csv":
        text = "source,target,timestamp\n" + "".join(f"{a},{b},{t}\n" for a, b, t in rows)
    else:
        text = "".join('{"source": "%s", "target": "%s", "timestamp": "%s"}\n' % r for r in rows)
    (tmp_path / f"e.{fmt}").write_text(text)
    (tmp_path / "n.csv").write_text("id,f\nNULL,1\nc,2\n")
    rep = clean_graph(tmp_path / "out", edges=[tmp_path / f"e.{fmt}"], nodes=[tmp_path / "n.csv"], allow_partial=True)
    assert rep["totals"]["by_rule"] == {"missing_endpoint": 14, "missing_id": 1}
    q = {int(r["line"]): r["reason"] for r in _quarantine(tmp_path / "out") if r["file"].endswith(f"e.{fmt}")}
    first = 2 if fmt == "csv" else 1
    want = ["missing_endpoint: no source"] * 7 + ["missing_endpoint: no target"] * 7
    assert [q[first + i] for i in range(14)] == want
    g = load_clean_graph(tmp_path / "out")
    assert g.edge_index.shape[1] == 8 and torch.isnan(g.edge_time).all()  # every marker time reads as no time
    assert set(_names(tmp_path / "out")) == {f"t{i}" for i in range(8)} | {"c"}


def test_auto_time_unit_refuses_dates_that_look_like_epochs(tmp_path):
    """20240101 (ISO basic) and 45292 (Excel serial) are 1970 as epoch seconds: quarantined under
    --time-unit auto with the fix in the reason; taken as given with an explicit unit or format."""
    (tmp_path / "e.csv").write_text("source,target,ts\na,b,20240101\nb,c,45292\nc,d,94694400\nd,e,94694399\n"
                                    "e,f,20241301\nf,g,1704067200\ng,h,-5\nh,i,1704067200000\n")
    rep = clean_graph(tmp_path / "out", edges=[tmp_path / "e.csv"], allow_partial=True)
    q = {int(r["line"]): (r["reason"], r["value"]) for r in _quarantine(tmp_path / "out")}
    assert sorted(q) == [2, 3, 5, 6, 8] and rep["totals"]["by_rule"] == {"bad_timestamp": 5}
    assert "YYYYMMDD" in q[2][0] and "--time-format %Y%m%d" in q[2][0] and q[2][1] == "20240101"
    for line in (3, 5, 6, 8):  # before 1973-01-01 (20241301 is no calendar date: just a small number)
        assert "before 1973-01-01" in q[line][0] and "--time-unit s" in q[line][0]
    want = [_utc("1973-01-01"), 1704067200.0, 1704067200.0]
    assert load_clean_graph(tmp_path / "out").edge_time.tolist() == want
    clean_graph(tmp_path / "s", edges=[tmp_path / "e.csv"], time_unit="s")
    assert load_clean_graph(tmp_path / "s").edge_time[:2].tolist() == [20240101.0, 45292.0]
    (tmp_path / "d.csv").write_text("source,target,ts\na,b,20240101\n")
    clean_graph(tmp_path / "d", edges=[tmp_path / "d.csv"], time_format="%Y%m%d")
    assert load_clean_graph(tmp_path / "d").edge_time.tolist() == [_utc("2024-01-01")]
