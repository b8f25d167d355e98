"""Graph ingestion on DuckDB: raw edge / triple / node files -> validated, deduplicated rows.

Files are read line by line by DuckDB (out of core: `memory_limit` bounds RAM, the rest
spills to disk) into tables of a database under the output folder:

    edges(src, dst, rel, weight, ts, file, line)     kept edge rows (triples: rel = predicate)
    node_rows(id, feats DOUBLE[], file, line)        kept node attribute rows (NaN = missing)
    quarantine(file, line, reason, raw)              every rejected row with its reason

Rules per edge row, first match wins: `malformed` (wrong field count / invalid JSON /
blank line), `missing_endpoint`, `bad_weight`, `bad_timestamp`, `node_id_out_of_range`
(only when `num_nodes` is given), `self_loop`, `duplicate` (same (src, dst, rel) as an
earlier row, in this run or a previous one). Node rows: `malformed`, `missing_id`,
`wrong_width`, `non_numeric`, `node_id_out_of_range`, `duplicate`. For every file,
rows_in == kept + quarantined. A manifest (`manifest.json`) records each file's hash and
line count, so a re-run skips files already ingested and reads only appended lines of a
file that grew.

CSV/TSV need a header (`source,target[,relation][,weight][,timestamp]`; triples
`subject,relation,object`; nodes `id,<feature columns>`). Fields follow RFC 4180 quoting
within a line: a field in double quotes may hold the delimiter, and `""` inside it is one
`"` (`"Smith, J.",b` -> `Smith, J.` | `b`); a field with an unbalanced quote makes the
row `malformed: unbalanced quotes`. A quoted field cannot span lines (rows are lines, so
row accounting stays exact). JSONL rows are objects with the same keys (nodes:
`{"id": ..., "features": [...]}`).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["IngestConfig", "ingest_files", "connect", "EDGE_RULES", "NODE_RULES"]

log = logging.getLogger(__name__)

EDGE_RULES = ("malformed", "missing_endpoint", "bad_weight", "bad_timestamp", "node_id_out_of_range",
              "self_loop", "duplicate")
NODE_RULES = ("malformed", "missing_id", "wrong_width", "non_numeric", "node_id_out_of_range", "duplicate")
_ALIASES = {"source": ("source", "src", "subject", "head", "from"), "target": ("target", "dst", "object", "tail", "to"),
            "relation": ("relation", "rel", "predicate", "type"), "weight": ("weight", "w"),
            "timestamp": ("timestamp", "time", "ts"), "id": ("id", "node", "node_id")}


@dataclass
class IngestConfig:
    num_nodes: int | None = None  # if set, node ids must be integers in [0, num_nodes); else any string
    allow_self_loops: bool = False  # self-loops are quarantined by default (GCN adds its own)
    num_features: int | None = None  # node feature width; default: taken from the first node file
    memory_limit: str = "4GB"  # DuckDB RAM cap; larger inputs spill to the database folder
    threads: int | None = None  # DuckDB threads (None = DuckDB's default)
    extra: dict[str, Any] = field(default_factory=dict)


def connect(db_path: Path, cfg: IngestConfig):
    import duckdb

    con = duckdb.connect(str(db_path))
    con.execute(f"SET memory_limit='{cfg.memory_limit}'")
    con.execute(f"SET temp_directory='{db_path.parent / 'duckdb_tmp'}'")
    if cfg.threads:
        con.execute(f"SET threads={int(cfg.threads)}")
    con.execute("CREATE TABLE IF NOT EXISTS edges(src VARCHAR, dst VARCHAR, rel VARCHAR, weight DOUBLE, "
                "ts DOUBLE, file VARCHAR, line BIGINT)")
    con.execute("CREATE TABLE IF NOT EXISTS node_rows(id VARCHAR, feats DOUBLE[], file VARCHAR, line BIGINT)")
    con.execute("CREATE TABLE IF NOT EXISTS quarantine(file VARCHAR, line BIGINT, reason VARCHAR, raw VARCHAR)")
    return con


def _sha256(path: Path, limit: int | None = None) -> str:
    h, left = hashlib.sha256(), limit if limit is not None else float("inf")
    with open(path, "rb") as f:
        while left > 0:
            chunk = f.read(int(min(1 << 20, left)))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def _fmt(path: Path) -> str:
    suf = path.suffix.lower()
    if suf in (".csv", ".tsv", ".txt"):
        return "tsv" if suf == ".tsv" else "csv"
    if suf in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    raise ValueError(f"{path}: unsupported extension {suf!r}; use .csv, .tsv or .jsonl")


def _q(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _header(path: Path, kind: str, delim: str) -> dict[str, int]:
    """Column name -> 1-based field index, from the file's first line."""
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\r\n")
    names = [c.strip().lower() for c in next(csv.reader([header], delimiter=delim, skipinitialspace=True), [])]
    cols: dict[str, int] = {}
    for key, aliases in _ALIASES.items():
        for a in aliases:
            if a in names:
                cols[key] = names.index(a) + 1
                break
    need = ("id",) if kind == "nodes" else ("source", "target") + (("relation",) if kind == "triples" else ())
    missing = [k for k in need if k not in cols]
    if missing:
        raise ValueError(f"{path}: header {names} lacks {missing}; the first line must name the columns, e.g. "
                         f"{'id,f0,f1,...' if kind == 'nodes' else 'subject,relation,object' if kind == 'triples' else 'source,target,relation,weight,timestamp'}")
    if kind == "nodes":
        cols["_features"] = [i + 1 for i, n in enumerate(names) if i + 1 != cols["id"]]  # type: ignore[assignment]
    cols["_width"] = len(names)
    return cols


_QUOTED = '"(?:[^"]|"")*"'  # one complete double-quoted field ("" = an escaped quote)


def _split_sql(delim: str) -> tuple[str, str]:
    """SQL (fields list, unbalanced-quotes condition) for the VARCHAR column `line`.

    Lines without a double quote take the fast `string_split`; others are tokenised by a
    regex (one match per field: a quoted field, or a run of non-delimiters), then quoted
    fields are unwrapped and `""` unescaped."""
    d = "\\t" if delim == "\t" else delim  # RE2 spelling of the delimiter
    pat = f"(?:^|{d}) *({_QUOTED} *|[^{d}]*)"
    tokens = f"regexp_extract_all(line, {_q(pat)}, 1)"
    full, has_quote = f"regexp_full_match(trim(x), {_q(_QUOTED)})", "strpos(coalesce(line, ''), chr(34))"
    unquote = (f"list_transform({tokens}, lambda x: CASE WHEN {full} "
               f"THEN replace(trim(x)[2:-2], repeat(chr(34), 2), chr(34)) ELSE x END)")
    fields = f"CASE WHEN {has_quote} = 0 THEN string_split(coalesce(line, ''), {_q(delim)}) ELSE {unquote} END"
    bad = f"{has_quote} > 0 AND len(list_filter({tokens}, lambda x: strpos(x, chr(34)) > 0 AND NOT {full})) > 0"
    return fields, bad


def _raw_lines(con, path: Path, skip: int, name: str) -> int:
    """Table `name`(ln, line) with the lines after the first `skip`; returns the file's line count."""
    con.execute(f"CREATE OR REPLACE TEMP TABLE {name} AS SELECT * FROM (SELECT row_number() OVER () AS ln, line "
                f"FROM read_csv({_q(str(path))}, columns={{'line': 'VARCHAR'}}, header=false, delim='\x1f', "
                f"quote='', escape='', auto_detect=false, strict_mode=false)) WHERE ln > {skip}")
    return int(con.execute(f"SELECT coalesce(max(ln), {skip}) FROM {name}").fetchone()[0])


def _edge_fields(path: Path, fmt: str, kind: str) -> tuple[str, str]:
    """SQL expressions (select list, malformed condition) turning `line` into fields."""
    if fmt == "jsonl":
        g = {k: f"json_extract_string(CASE WHEN json_valid(line) THEN line END, '$.{a}')" for k, a in
             (("source", "subject" if kind == "triples" else "source"),
              ("target", "object" if kind == "triples" else "target"),
              ("relation", "relation"), ("weight", "weight"), ("timestamp", "timestamp"))}
        return (", ".join(f"{v} AS {k}" for k, v in g.items()),
                "CASE WHEN line IS NULL OR trim(line) = '' THEN 'malformed: blank line' "
                "WHEN NOT json_valid(line) THEN 'malformed: invalid JSON' END")
    delim = "\t" if fmt == "tsv" else ","
    cols = _header(path, kind, delim)
    sel = ", ".join(f"nullif(trim(f[{cols[k]}]), '') AS {k}" if k in cols else f"NULL AS {k}"
                    for k in ("source", "target", "relation", "weight", "timestamp"))
    w = cols["_width"]
    _, bad_quotes = _split_sql(delim)
    return (sel, f"CASE WHEN line IS NULL OR trim(line) = '' THEN 'malformed: blank line' "
                 f"WHEN {bad_quotes} THEN 'malformed: unbalanced quotes' WHEN len(f) <> {w} THEN "
                 f"'malformed: expected {w} fields, got ' || len(f) END")


def _ingest_edges(con, path: Path, fmt: str, kind: str, skip: int, cfg: IngestConfig) -> None:
    sel, malformed = _edge_fields(path, fmt, kind)
    delim = "\t" if fmt == "tsv" else ","
    split = _split_sql(delim)[0] if fmt != "jsonl" else "[]::VARCHAR[]"
    rng = ""
    if cfg.num_nodes is not None:
        n = int(cfg.num_nodes)
        rng = (f"WHEN try_cast(source AS BIGINT) IS NULL OR try_cast(target AS BIGINT) IS NULL OR "
               f"try_cast(source AS BIGINT) NOT BETWEEN 0 AND {n - 1} OR "
               f"try_cast(target AS BIGINT) NOT BETWEEN 0 AND {n - 1} "
               f"THEN 'node_id_out_of_range: ids must be integers in [0, {n})' ")
    loop = "" if cfg.allow_self_loops else "WHEN source = target THEN 'self_loop' "
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE parsed AS
        WITH s AS (SELECT ln, line, {split} AS f FROM raw),
             p AS (SELECT ln, line, {malformed} AS bad, {sel} FROM s)
        SELECT ln, line, source, target, coalesce(relation, '') AS relation,
               try_cast(weight AS DOUBLE) AS w, try_cast(timestamp AS DOUBLE) AS t,
               CASE WHEN bad IS NOT NULL THEN bad
                    WHEN source IS NULL OR target IS NULL THEN 'missing_endpoint'
                    WHEN weight IS NOT NULL AND try_cast(weight AS DOUBLE) IS NULL THEN 'bad_weight'
                    WHEN timestamp IS NOT NULL AND try_cast(timestamp AS DOUBLE) IS NULL THEN 'bad_timestamp'
                    {rng}{loop}
                    ELSE NULL END AS reason
        FROM p""")
    # duplicates: a later row of the same (src, dst, rel) in this file, or one already kept earlier
    con.execute("""
        CREATE OR REPLACE TEMP TABLE judged AS
        SELECT ln, line, source, target, relation, w, t,
               CASE WHEN reason IS NOT NULL THEN reason
                    WHEN row_number() OVER (PARTITION BY source, target, relation, reason IS NULL ORDER BY ln) > 1
                         THEN 'duplicate'
                    END AS reason
        FROM parsed""")
    con.execute("""UPDATE judged SET reason = 'duplicate' WHERE reason IS NULL AND EXISTS
                   (SELECT 1 FROM edges e WHERE e.src = judged.source AND e.dst = judged.target
                    AND e.rel = judged.relation)""")
    f = _q(str(path))
    con.execute(f"INSERT INTO edges SELECT source, target, relation, w, t, {f}, ln FROM judged WHERE reason IS NULL")
    con.execute(f"INSERT INTO quarantine SELECT {f}, ln, reason, line FROM judged WHERE reason IS NOT NULL")


def _ingest_nodes(con, path: Path, fmt: str, skip: int, cfg: IngestConfig, width: int | None) -> int:
    """Returns the feature width used (from cfg, earlier files, or this file)."""
    if fmt == "jsonl":
        feats = "json_extract(j, '$.features')::VARCHAR[]"
        con.execute(f"""CREATE OR REPLACE TEMP TABLE p AS SELECT ln, line,
            CASE WHEN line IS NULL OR trim(line) = '' THEN 'malformed: blank line'
                 WHEN NOT json_valid(line) THEN 'malformed: invalid JSON'
                 WHEN json_type(j, '$.features') IS DISTINCT FROM 'ARRAY' THEN 'malformed: no features list' END AS bad,
            json_extract_string(j, '$.id') AS id,
            CASE WHEN json_type(j, '$.features') = 'ARRAY' THEN {feats} END AS fv
            FROM (SELECT ln, line, CASE WHEN json_valid(line) THEN line END AS j FROM raw)""")
    else:
        delim = "\t" if fmt == "tsv" else ","
        cols = _header(path, "nodes", delim)
        fidx = cols["_features"]  # type: ignore[assignment]
        lst = "[" + ", ".join(f"nullif(trim(f[{i}]), '')" for i in fidx) + "]" if fidx else "[]::VARCHAR[]"
        w = cols["_width"]
        split, bad_quotes = _split_sql(delim)
        con.execute(f"""CREATE OR REPLACE TEMP TABLE p AS
            WITH s AS (SELECT ln, line, {split} AS f FROM raw)
            SELECT ln, line, CASE WHEN line IS NULL OR trim(line) = '' THEN 'malformed: blank line'
                                  WHEN {bad_quotes} THEN 'malformed: unbalanced quotes'
                                  WHEN len(f) <> {w} THEN 'malformed: expected {w} fields, got ' || len(f) END AS bad,
                   nullif(trim(f[{cols['id']}]), '') AS id, {lst} AS fv FROM s""")
    if width is None:
        width = cfg.num_features
    if width is None:
        row = con.execute("SELECT len(fv) FROM p WHERE bad IS NULL AND fv IS NOT NULL ORDER BY ln LIMIT 1").fetchone()
        width = int(row[0]) if row else 0
    rng = ""
    if cfg.num_nodes is not None:
        rng = (f"WHEN try_cast(id AS BIGINT) IS NULL OR try_cast(id AS BIGINT) NOT BETWEEN 0 AND {cfg.num_nodes - 1} "
               f"THEN 'node_id_out_of_range: ids must be integers in [0, {cfg.num_nodes})' ")
    con.execute(f"""CREATE OR REPLACE TEMP TABLE judged AS
        SELECT ln, line, id, fv, CASE
            WHEN bad IS NOT NULL THEN bad
            WHEN id IS NULL THEN 'missing_id'
            WHEN len(fv) <> {width} THEN 'wrong_width: expected {width} features, got ' || len(fv)
            WHEN len(list_filter(fv, lambda v: v IS NOT NULL AND lower(v) NOT IN ('nan', 'null')
                                      AND try_cast(v AS DOUBLE) IS NULL)) > 0 THEN 'non_numeric'
            {rng}
            ELSE NULL END AS reason FROM p""")
    con.execute("""UPDATE judged SET reason = 'duplicate' WHERE reason IS NULL AND (EXISTS
                   (SELECT 1 FROM node_rows r WHERE r.id = judged.id) OR ln > (SELECT min(ln) FROM judged j2
                    WHERE j2.id = judged.id AND j2.reason IS NULL))""")
    f = _q(str(path))
    con.execute(f"""INSERT INTO node_rows SELECT id, list_transform(fv, lambda v: coalesce(try_cast(v AS DOUBLE), 'nan'::DOUBLE)),
                    {f}, ln FROM judged WHERE reason IS NULL""")
    con.execute(f"INSERT INTO quarantine SELECT {f}, ln, reason, line FROM judged WHERE reason IS NOT NULL")
    return width


def _counts(con) -> dict[str, Any]:
    """Rows in / kept / quarantined and per-rule counts of the file just judged."""
    kept = con.execute("SELECT count(*) FROM judged WHERE reason IS NULL").fetchone()[0]
    rules = dict(con.execute("SELECT split_part(reason, ':', 1) AS r, count(*) FROM judged WHERE reason IS NOT NULL "
                             "GROUP BY r ORDER BY r").fetchall())
    rows_in = con.execute("SELECT count(*) FROM judged").fetchone()[0]
    return {"rows_in": int(rows_in), "kept": int(kept), "quarantined": int(sum(rules.values())),
            "by_rule": {k: int(v) for k, v in rules.items()}}


def ingest_files(con, manifest: dict[str, Any], files: list[tuple[str, Path]], cfg: IngestConfig) -> list[dict]:
    """Ingest (kind, path) pairs, kind in {"edges", "triples", "nodes"}, updating `manifest`
    in place. Returns one report dict per file (skipped files have rows_in = 0)."""
    reports = []
    seen = manifest.setdefault("files", {})
    width = manifest.get("num_features")
    for kind, path in files:
        path = Path(path).resolve()
        if kind not in ("edges", "triples", "nodes"):
            raise ValueError(f"unknown file kind {kind!r}; use edges, triples or nodes")
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist")
        fmt = _fmt(path)
        size, key = path.stat().st_size, str(path)
        prev = seen.get(key)
        skip = 1 if fmt != "jsonl" else 0  # the header line
        if prev is not None:
            if prev["size"] == size and prev["sha256"] == _sha256(path):
                reports.append({"file": key, "kind": kind, "skipped": "already ingested", "rows_in": 0, "kept": 0,
                                "quarantined": 0, "by_rule": {}})
                continue
            if size > prev["size"] and _sha256(path, prev["size"]) == prev["sha256"]:
                skip = prev["lines"]  # the file grew: only the appended lines are new
            else:
                raise ValueError(f"{path} changed since it was ingested (not an append); rebuild with a fresh output "
                                 f"folder (or --full) instead of an incremental sync")
        lines = _raw_lines(con, path, skip, "raw")
        if kind == "nodes":
            width = _ingest_nodes(con, path, fmt, skip, cfg, width)
            manifest["num_features"] = width
        else:
            _ingest_edges(con, path, fmt, kind, skip, cfg)
        rep = {"file": key, "kind": kind, "first_line": skip + 1, **_counts(con)}
        if rep["rows_in"] != rep["kept"] + rep["quarantined"]:  # invariant; fail loudly if ever broken
            raise RuntimeError(f"row accounting broke for {path}: {rep}")
        reports.append(rep)
        seen[key] = {"kind": kind, "size": size, "sha256": _sha256(path), "lines": lines}
        log.info("%s: %d rows, %d kept, %d quarantined %s", path.name, rep["rows_in"], rep["kept"],
                 rep["quarantined"], rep["by_rule"])
    return reports
