"""Graph ingestion on DuckDB: edge / triple / node files as people export them ->
validated, deduplicated rows.

Readers (streamed by DuckDB, out of core: `memory_limit` bounds RAM, the rest spills to disk):

* CSV / TSV / .txt: a header line names the columns; a UTF-8 byte order mark and CRLF
  line ends are accepted; the delimiter is `IngestConfig.delimiter` or, if unset, tab for
  .tsv and otherwise whichever of `,` `\\t` `;` `|` splits the header into the most fields.
  Fields follow RFC 4180 quoting within a line: a field in double quotes may hold the
  delimiter, and `""` inside it is one `"` (`"Smith, J.",b` -> `Smith, J.` | `b`); a field
  with an unbalanced quote makes the row `malformed: unbalanced quotes`. A quoted field
  cannot span lines (rows are lines, so row accounting stays exact).
* JSONL (.jsonl, .ndjson, .json): one object per line; its keys are the columns (nodes:
  `{"id": ..., "features": [...]}`, or the other keys as scalar features).
* Parquet (.parquet, .pq): the file's columns; a row's `line` is its 1-based row number.

Columns are found by name, case-insensitively: source (source, src, subject, head, from),
target (target, dst, object, tail, to), relation (relation, rel, predicate, type), weight
(weight, w), timestamp (timestamp, time, ts, date, datetime), node id (id, node, node_id);
`IngestConfig.columns` ({"source": "from_user", ...}) names them when the file differs.
A required column that is missing is an error listing the columns found.

Files must be UTF-8 (a byte order mark is fine); a file in another encoding (latin-1, an
Excel "Unicode text" export in UTF-16) is an error naming the file and the `iconv` command
that converts it.

Missing values: an empty cell, or one of the markers NULL, NA, N/A, NaN, None (any case), is
missing in the source, target, timestamp and node id columns (a missing endpoint is
`missing_endpoint`, a missing time is "no time", NaN in `edge_time`).

Timestamps become UTC epoch seconds (`edges.ts`, later `edge_time`): ISO 8601 dates and
datetimes (`2024-01-01`, `2024-01-06T10:00:00Z`, `2024-01-07 08:30:00+02:00`; no zone =
UTC), epoch numbers (`time_unit="auto"`: |v| >= 1e11 is milliseconds, below is seconds,
>= 1e14 is refused, and so are two look-alikes a guess would misread: an 8-digit
YYYYMMDD date such as 20240101 (1970-08-23 as seconds) and any value before 1973-01-01,
e.g. an Excel serial date such as 45292; or "s" / "ms", taken as given), or, with
`time_format` (a strptime format such as `%d/%m/%Y %H:%M`), only values of that format.

With `num_nodes`, ids are integers written any way (`3`, `03`, `+3`) and stored as plain
integers (`3`), so the same node is one node.

Rules per edge row, in this order, the first one broken is reported (with the offending
value): `malformed` (wrong field count, unbalanced quotes, invalid JSON, blank line),
`bad_id` (with `num_nodes`: an id that is not an integer in [0, num_nodes)),
`missing_endpoint`, `bad_weight` (not a finite number), `bad_timestamp`, `self_loop`,
`duplicate` (same (source, target, relation, time) as an earlier kept row, in this run or a
previous one: the same pair at another time is a repeated interaction and is kept; rows
without a time compare as equal times). Node rows: `malformed`, `bad_id`, `missing_id`,
`wrong_width`, `non_numeric`, `duplicate`. For every file rows_in == kept + quarantined
(checked).

Tables in the database:

    edges(src, dst, rel, weight, ts, file, line)         kept edge rows (triples: rel = predicate)
    node_rows(id, feats DOUBLE[], file, line)            kept node attribute rows (NaN = missing)
    quarantine(file, line, reason, value, raw)           every rejected row: "rule: detail", value

A manifest records each file's hash and line count, so a re-run skips files already
ingested and reads only appended lines of a CSV/JSONL file that grew.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["IngestConfig", "ingest_files", "connect", "EDGE_RULES", "NODE_RULES", "TIME_UNITS", "file_format"]

log = logging.getLogger(__name__)

EDGE_RULES = ("malformed", "bad_id", "missing_endpoint", "bad_weight", "bad_timestamp", "self_loop", "duplicate")
NODE_RULES = ("malformed", "bad_id", "missing_id", "wrong_width", "non_numeric", "duplicate")
TIME_UNITS = ("auto", "s", "ms")
ROLES = ("source", "target", "relation", "weight", "timestamp", "id")
_ALIASES = {"source": ("source", "src", "subject", "head", "from"), "target": ("target", "dst", "object", "tail", "to"),
            "relation": ("relation", "rel", "predicate", "type"), "weight": ("weight", "w"),
            "timestamp": ("timestamp", "time", "ts", "date", "datetime"), "id": ("id", "node", "node_id")}
_FLAG = {"source": "--source-col", "target": "--target-col", "relation": "--relation-col", "weight": "--weight-col",
         "timestamp": "--time-col", "id": "--node-id-col"}
_SNIFF = (",", "\t", ";", "|")
_EXT = {".csv": "csv", ".txt": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl",
        ".parquet": "parquet", ".pq": "parquet"}
# ISO 8601 calendar date, optional time (T or space), optional fraction, optional zone (Z, +hh, +hhmm, +hh:mm)
_ISO = r"[0-9]{4}-[0-9]{2}-[0-9]{2}([Tt ][0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]+)?)?)? ?([Zz]|[+-][0-9]{2}(:?[0-9]{2})?)?"
_MS_FROM, _EPOCH_MAX = 1e11, 1e14  # auto unit: |v| >= 1e11 (year 5138 in s, 1973 in ms) is ms; >= 1e14 refused
_EPOCH_MIN = 94694400  # 1973-01-01T00:00Z: an auto-detected epoch before it is more likely another unit (see _time_sql)
MISSING = ("", "NULL", "NA", "N/A", "NAN", "NONE")  # cells that mean "no value" (compared upper-cased, trimmed)
_MEMORY = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]I?B|[KMGT]|B|%)\s*", re.IGNORECASE)  # DuckDB sizes


@dataclass
class IngestConfig:
    num_nodes: int | None = None  # if set, node ids must be integers in [0, num_nodes); else any string
    allow_self_loops: bool = False  # self-loops are quarantined by default (GCN adds its own)
    num_features: int | None = None  # node feature width; default: taken from the first node file
    memory_limit: str = "4GB"  # DuckDB RAM cap; larger inputs spill to the database folder
    threads: int | None = None  # DuckDB threads (None = DuckDB's default)
    delimiter: str | None = None  # CSV field delimiter; None: tab for .tsv, else sniffed from the header
    columns: dict[str, str] = field(default_factory=dict)  # role -> the file's column name, roles in ROLES
    time_unit: str = "auto"  # epoch numbers: "s", "ms" or "auto" (by magnitude)
    time_format: str | None = None  # strptime format every timestamp must match (instead of ISO / epoch)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.delimiter in ("\\t", "tab", "TAB"):
            self.delimiter = "\t"  # a tab is awkward to type in a shell
        if self.delimiter is not None and (len(self.delimiter) != 1 or self.delimiter in "\"\r\n"):
            raise ValueError(f"delimiter {self.delimiter!r} must be one character other than a quote or a line end "
                             f"(e.g. ',', ';', '|', or '\\t' for tab)")
        if self.time_unit not in TIME_UNITS:
            raise ValueError(f"time_unit {self.time_unit!r} must be one of {', '.join(TIME_UNITS)}")
        unknown = sorted(set(self.columns) - set(ROLES))
        if unknown:
            raise ValueError(f"columns: unknown roles {unknown}; use {', '.join(ROLES)}")
        self.columns = {k: v for k, v in self.columns.items() if v}
        if self.num_nodes is not None and self.num_nodes < 1:
            raise ValueError(f"num_nodes ({self.num_nodes}) must be >= 1, or None for string ids")
        m = _MEMORY.fullmatch(str(self.memory_limit))
        amount = float(m.group(1)) if m else 0.0
        if m is None or amount <= 0 or (m.group(2) == "%" and amount > 100):
            raise ValueError(f"memory_limit {self.memory_limit!r} is not a size: give a number and a unit, e.g. "
                             f"'4GB', '512MB' or '50%' of the machine's memory (--memory-limit)")


def connect(db_path: Path, cfg: IngestConfig):
    import duckdb

    con = duckdb.connect(str(db_path))
    try:
        con.execute(f"SET memory_limit={_q(str(cfg.memory_limit))}")
    except duckdb.Error as e:
        con.close()
        raise ValueError(f"memory_limit {cfg.memory_limit!r} was refused by DuckDB ({str(e).splitlines()[0]}); "
                         f"give a size such as '4GB' or '512MB' (--memory-limit)") from None
    con.execute(f"SET temp_directory={_q(str(db_path.parent / 'duckdb_tmp'))}")
    con.execute("SET TimeZone='UTC'")  # zone-less datetimes are UTC; TIMESTAMPTZ columns print in UTC
    if cfg.threads:
        con.execute(f"SET threads={int(cfg.threads)}")
    if cfg.time_format is not None:
        try:
            con.execute("SELECT try_strptime('', ?)", [cfg.time_format]).fetchall()
        except duckdb.Error as e:
            raise ValueError(f"time_format {cfg.time_format!r} is not a strptime format ({e}); e.g. "
                             f"'%d/%m/%Y %H:%M'") from None
    con.execute("CREATE TABLE IF NOT EXISTS edges(src VARCHAR, dst VARCHAR, rel VARCHAR, weight DOUBLE, "
                "ts DOUBLE, file VARCHAR, line BIGINT)")
    con.execute("CREATE TABLE IF NOT EXISTS node_rows(id VARCHAR, feats DOUBLE[], file VARCHAR, line BIGINT)")
    con.execute("CREATE TABLE IF NOT EXISTS quarantine(file VARCHAR, line BIGINT, reason VARCHAR, value VARCHAR, "
                "raw VARCHAR)")
    if "value" not in [r[0] for r in con.execute("DESCRIBE quarantine").fetchall()]:  # a folder from before `value`
        con.execute("ALTER TABLE quarantine ADD COLUMN value VARCHAR")
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


def file_format(path: Path) -> str:
    """"csv", "tsv", "jsonl" or "parquet", from the extension."""
    fmt = _EXT.get(Path(path).suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: unsupported extension {Path(path).suffix!r}; use .csv, .tsv, .txt, .jsonl, "
                         f".ndjson or .parquet")
    return fmt


def _q(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _roles(kind: str) -> tuple[str, ...]:
    """The columns a file of this kind may have."""
    return ("id",) if kind == "nodes" else ("source", "target", "relation", "weight", "timestamp")


def _resolve(path: Path, names: list[str], kind: str, cfg: IngestConfig) -> dict[str, int]:
    """Role -> 0-based position in `names` (the file's columns), by `cfg.columns` or the aliases."""
    low = [n.strip().lower() for n in names]
    found = ", ".join(repr(n) for n in names) or "none"
    roles = _roles(kind)
    need = {"nodes": ("id",), "triples": ("source", "target", "relation")}.get(kind, ("source", "target"))
    cols: dict[str, int] = {}
    for role in roles:
        given = cfg.columns.get(role)
        if given is not None:
            if given.strip().lower() not in low:
                raise ValueError(f"{path}: no column {given!r} (given by {_FLAG[role]}); columns found: {found}")
            cols[role] = low.index(given.strip().lower())
            continue
        hit = next((a for a in _ALIASES[role] if a in low and low.index(a) not in cols.values()), None)
        if hit is not None:
            cols[role] = low.index(hit)
        elif role in need:
            raise ValueError(f"{path}: no {role} column (looked for {', '.join(_ALIASES[role])}); columns found: "
                             f"{found}; name the column with {_FLAG[role]} NAME")
    by_pos: dict[int, list[str]] = {}
    for role, i in cols.items():
        by_pos.setdefault(i, []).append(role)
    clash = [f"{names[i]!r} as {' and '.join(r)}" for i, r in by_pos.items() if len(r) > 1]
    if clash:
        raise ValueError(f"{path}: one column used for two roles: {'; '.join(clash)}; give each role its own column "
                         f"({', '.join(_FLAG[r] for r in roles)})")
    return cols


def _not_utf8(path: Path, detail: str = "") -> ValueError:
    """The error for a file that is not UTF-8 text, with the `iconv` command that converts it."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] in (b"\xff\xfe", b"\xfe\xff"):  # UTF-16 byte order mark: Excel's "Unicode text" export
        enc, what = "utf-16", "UTF-16 (e.g. Excel's \"Unicode text\" export)"
    else:
        enc, what = "latin1", "another encoding (e.g. latin-1 / Windows-1252)"
    fixed = path.with_name(f"{path.stem}-utf8{path.suffix}")
    return ValueError(f"{path} is not UTF-8 text{f' ({detail})' if detail else ''}; it looks like {what}. Convert it "
                      f"to UTF-8 first, e.g. `iconv -f {enc} -t utf-8 {path} > {fixed}`, and pass the converted file")


def _read_error(path: Path, fmt: str, e: Exception) -> ValueError:
    """A DuckDB or decoding error while reading `path`, as a ValueError naming the file."""
    msg = str(e)
    if isinstance(e, UnicodeDecodeError) or "not utf-8" in msg.lower() or "invalid unicode" in msg.lower():
        line = re.search(r"CSV Error on Line: *([0-9]+)", msg)
        return _not_utf8(path, f"line {line.group(1)}" if line else "")
    first = next((ln.strip() for ln in msg.splitlines() if ln.strip()), type(e).__name__)
    return ValueError(f"{path}: cannot be read as {fmt} ({first}); check that the file is complete and that its "
                      f"extension matches its format")


def _csv_header(path: Path, fmt: str, cfg: IngestConfig) -> tuple[list[str], str]:
    """(column names, delimiter) from the first line (a UTF-8 byte order mark is dropped)."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        header = f.readline().rstrip("\r\n")
    if not header.strip():
        raise ValueError(f"{path}: the first line is empty; it must name the columns, e.g. "
                         f"source,target,relation,weight,timestamp")
    delim = cfg.delimiter or ("\t" if fmt == "tsv" else None)
    if delim is None:  # the candidate that splits the header into the most fields (ties: ',')
        width = {d: len(next(csv.reader([header], delimiter=d))) for d in _SNIFF}
        delim = max(_SNIFF, key=lambda d: (width[d], d == ","))
    return [c.strip() for c in next(csv.reader([header], delimiter=delim, skipinitialspace=True))], delim


def _json_keys(path: Path, limit: int = 1000) -> list[str]:
    """Keys of the objects on the first `limit` lines, in first-seen order."""
    keys: dict[str, None] = {}
    with open(path, encoding="utf-8-sig") as f:
        for i, line in enumerate(f):
            if i >= limit:
                break
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                keys.update(dict.fromkeys(obj))
    return list(keys)


_QUOTED = '"(?:[^"]|"")*"'  # one complete double-quoted field ("" = an escaped quote)


def _split_sql(delim: str) -> tuple[str, str]:
    """SQL (fields list, unbalanced-quotes condition) for the VARCHAR column `line`.

    Lines without a double quote take the fast `string_split`; others are tokenised by a
    regex (one match per field: a quoted field, or a run of non-delimiters), then quoted
    fields are unwrapped and `""` unescaped."""
    d = f"\\x{{{ord(delim):x}}}"  # RE2 spelling of the delimiter, safe inside and outside a class
    pat = f"(?:^|{d}) *({_QUOTED} *|[^{d}]*)"
    tokens = f"regexp_extract_all(line, {_q(pat)}, 1)"
    full, has_quote = f"regexp_full_match(trim(x), {_q(_QUOTED)})", "strpos(coalesce(line, ''), chr(34))"
    unquote = (f"list_transform({tokens}, lambda x: CASE WHEN {full} "
               f"THEN replace(trim(x)[2:-2], repeat(chr(34), 2), chr(34)) ELSE x END)")
    fields = f"CASE WHEN {has_quote} = 0 THEN string_split(coalesce(line, ''), {_q(delim)}) ELSE {unquote} END"
    bad = f"{has_quote} > 0 AND len(list_filter({tokens}, lambda x: strpos(x, chr(34)) > 0 AND NOT {full})) > 0"
    return fields, bad


def _raw_lines(con, path: Path, skip: int) -> int:
    """Temp table `raw`(ln, line) with the lines after the first `skip`; returns the file's line
    count. DuckDB drops a byte order mark and the CR of CRLF line ends."""
    con.execute(f"CREATE OR REPLACE TEMP TABLE raw AS SELECT * FROM (SELECT row_number() OVER () AS ln, line "
                f"FROM read_csv({_q(str(path))}, columns={{'line': 'VARCHAR'}}, header=false, delim='\x1f', "
                f"quote='', escape='', auto_detect=false, strict_mode=false)) WHERE ln > {skip}")
    return int(con.execute(f"SELECT coalesce(max(ln), {skip}) FROM raw").fetchone()[0])


_BLANK = "WHEN line IS NULL OR trim(line) = '' THEN 'malformed: blank line' "


def _read_fields(con, path: Path, fmt: str, kind: str, skip: int, cfg: IngestConfig) -> tuple[int, list[str]]:
    """Temp table `fields`(ln, line, bad, <role> VARCHAR..., fv VARCHAR[]): one row per input
    row, `bad` = the malformed reason, a NULL role = a missing or empty value, `fv` = node
    features. Returns (the file's line / row count, the feature column names)."""
    roles = _roles(kind)
    val = _cell
    if fmt == "parquet":
        src = f"read_parquet({_q(str(path))}, file_row_number=true)"
        schema = con.execute(f"DESCRIBE SELECT * FROM {src}").fetchall()
        names = [r[0] for r in schema if r[0] != "file_row_number"]
        types = {r[0]: r[1] for r in schema}
        cols = _resolve(path, names, kind, cfg)
        got = {k: val(f"CAST(_r_.{_ident(names[i])} AS VARCHAR)", k) for k, i in cols.items()}
        is_list = lambda n: types[n].endswith("[]")  # noqa: E731
        fnames = _feature_names(names, cols, is_list) if kind == "nodes" else []
        fv = _feature_list(fnames, lambda n: f"_r_.{_ident(n)}", is_list)
        con.execute(f"""CREATE OR REPLACE TEMP TABLE fields AS SELECT file_row_number + 1 AS ln,
            CAST(to_json(_r_) AS VARCHAR) AS line, NULL::VARCHAR AS bad,
            {', '.join(got.get(k, 'NULL::VARCHAR') + f' AS {k}' for k in roles)}, {fv} AS fv
            FROM {src} _r_ WHERE file_row_number + 1 > {skip}""")
        return int(con.execute(f"SELECT count(*) FROM read_parquet({_q(str(path))})").fetchone()[0]), fnames
    lines = _raw_lines(con, path, skip)
    if fmt == "jsonl":
        names = _json_keys(path)
        cols = _resolve(path, names, kind, cfg)
        get = lambda n: f"json_extract_string(j, {_q('$.' + json.dumps(n))})"  # noqa: E731
        is_list = lambda n: n.lower() == "features"  # noqa: E731
        fnames = _feature_names(names, cols, is_list) if kind == "nodes" else []
        fv = _feature_list(fnames, lambda n: f"json_extract(j, {_q('$.' + json.dumps(n))})", is_list, get)
        bad = (f"CASE {_BLANK}WHEN NOT json_valid(line) THEN 'malformed: invalid JSON' "
               f"WHEN json_type(line) <> 'OBJECT' THEN 'malformed: not a JSON object' END")
        con.execute(f"""CREATE OR REPLACE TEMP TABLE fields AS SELECT ln, line, bad,
            {', '.join((val(get(names[cols[k]]), k) if k in cols else 'NULL::VARCHAR') + f' AS {k}' for k in roles)},
            CASE WHEN bad IS NULL THEN {fv} END AS fv
            FROM (SELECT ln, line, {bad} AS bad, CASE WHEN json_valid(line) THEN line END AS j FROM raw)""")
        return lines, fnames
    names, delim = _csv_header(path, fmt, cfg)
    cols = _resolve(path, names, kind, cfg)
    split, bad_quotes = _split_sql(delim)
    rest = [i for i in range(len(names)) if i not in cols.values()]  # by position: names may repeat
    fnames = [names[i] for i in rest] if kind == "nodes" else []
    fv = "[" + ", ".join(val(f"f[{i + 1}]") for i in rest) + "]::VARCHAR[]" if kind == "nodes" else "[]::VARCHAR[]"
    w = len(names)
    con.execute(f"""CREATE OR REPLACE TEMP TABLE fields AS SELECT ln, line, bad,
        {', '.join((val(f'f[{cols[k] + 1}]', k) if k in cols else 'NULL::VARCHAR') + f' AS {k}' for k in roles)},
        {fv} AS fv
        FROM (SELECT ln, line, f, CASE {_BLANK}WHEN {bad_quotes} THEN 'malformed: unbalanced quotes'
                                      WHEN len(f) <> {w} THEN 'malformed: expected {w} fields, got ' || len(f)
                                      END AS bad
              FROM (SELECT ln, line, {split} AS f FROM raw))""")
    return lines, fnames


def _cell(expr: str, role: str | None = None) -> str:
    """SQL for one cell as VARCHAR: trimmed; empty = missing (NULL), and in the id and time
    columns (source, target, timestamp, id) so are the markers in MISSING (NULL, NA, N/A,
    NaN, None, any case). Relations and weights keep them: a weight "nan" is `bad_weight`."""
    if role in ("source", "target", "timestamp", "id"):
        return (f"CASE WHEN upper(trim({expr})) IN ({', '.join(_q(m) for m in MISSING)}) THEN NULL "
                f"ELSE trim({expr}) END")
    return f"nullif(trim({expr}), '')"


def _feature_names(names: list[str], cols: dict[str, int], is_list) -> list[str]:
    """Node feature columns: one list column (JSON `features`, a Parquet list) or every other column."""
    rest = [n for i, n in enumerate(names) if i not in cols.values()]
    lists = [n for n in rest if is_list(n)]
    return lists[:1] if lists else rest


def _feature_list(fnames: list[str], expr, is_list, scalar=None) -> str:
    """SQL VARCHAR[] of a row's features."""
    if not fnames:
        return "[]::VARCHAR[]"
    if len(fnames) == 1 and is_list(fnames[0]):
        return f"TRY_CAST({expr(fnames[0])} AS VARCHAR[])"
    scalar = scalar or (lambda n: f"CAST({expr(n)} AS VARCHAR)")
    return "[" + ", ".join(f"nullif(trim({scalar(n)}), '')" for n in fnames) + "]::VARCHAR[]"


def _first_broken(rules: list[tuple[str, str, str]]) -> tuple[str, str]:
    """SQL (reason, value) of the first (condition, reason, value) rule a row breaks; NULL if none."""
    return ("CASE " + " ".join(f"WHEN {c} THEN {r}" for c, r, _ in rules) + " END",
            "CASE " + " ".join(f"WHEN {c} THEN {v}" for c, _, v in rules) + " END")


def _id_ok(col: str, n: int) -> str:
    return f"(regexp_full_match({col}, '[+-]?[0-9]+') AND try_cast({col} AS BIGINT) BETWEEN 0 AND {n - 1})"


def _time_sql(cfg: IngestConfig) -> tuple[str, str]:
    """SQL (epoch seconds or NULL, why a value failed) for the VARCHAR column `timestamp`."""
    if cfg.time_format is not None:
        return (f"epoch(try_strptime(timestamp, {_q(cfg.time_format)}))",
                _q(f"bad_timestamp: does not match --time-format {cfg.time_format!r}"))
    num = "try_cast(timestamp AS DOUBLE)"
    out_of_range = "WHEN {num} IS NOT NULL THEN 'bad_timestamp: epoch number out of range; pass --time-unit s or ms' "
    if cfg.time_unit == "auto":
        # a guessed unit must not turn another date spelling into a 1970 time: 20240101 (ISO basic
        # YYYYMMDD) read as seconds is 1970-08-23, 45292 (an Excel serial day) is 1970-01-01
        ymd = "(regexp_full_match(timestamp, '[0-9]{8}') AND try_strptime(timestamp, '%Y%m%d') IS NOT NULL)"
        sec = f"(CASE WHEN abs({num}) >= {_MS_FROM:.0f} THEN {num} / 1000 ELSE {num} END)"
        epoch = (f"CASE WHEN NOT isfinite({num}) OR abs({num}) >= {_EPOCH_MAX:.0f} OR {ymd} OR {sec} < {_EPOCH_MIN} "
                 f"THEN NULL ELSE {sec} END")
        guess = (f"WHEN {ymd} THEN 'bad_timestamp: an 8-digit YYYYMMDD date, not epoch seconds; pass --time-format "
                 f"%Y%m%d (or --time-unit s if it is epoch seconds)' "
                 f"WHEN isfinite({num}) AND abs({num}) < {_EPOCH_MAX:.0f} THEN 'bad_timestamp: epoch number before "
                 f"1973-01-01, more likely another unit (an Excel serial date such as 45292, a counter); pass "
                 f"--time-unit s if it is epoch seconds, or write ISO 8601 dates' ")
    else:
        epoch = f"CASE WHEN isfinite({num}) THEN {num}{' / 1000' if cfg.time_unit == 'ms' else ''} END"
        guess = ""
    iso = "epoch(try_cast(upper(timestamp) AS TIMESTAMPTZ))"
    t = f"CASE WHEN {num} IS NOT NULL THEN {epoch} WHEN regexp_full_match(timestamp, {_q(_ISO)}) THEN {iso} END"
    why = (f"CASE {guess}{out_of_range.format(num=num)}"
           f"ELSE 'bad_timestamp: not an ISO 8601 date/datetime or epoch number; pass --time-format' END")
    return t, why


def _canonical_ids(cols: tuple[str, ...], n: int | None) -> str:
    """SQL `SELECT` list over `fields`: with `num_nodes`, ids that are valid integers written
    another way (`03`, `+3`, `-0`) become plain integers (`3`, `0`), so they match the node
    index; others are left for the bad_id rule."""
    if n is None:
        return "*"
    return "* REPLACE (" + ", ".join(f"CASE WHEN {_id_ok(c, n)} THEN try_cast({c} AS BIGINT)::VARCHAR ELSE {c} END "
                                     f"AS {c}" for c in cols) + ")"


def _judge_edges(con, cfg: IngestConfig) -> None:
    """Temp table `judged`(ln, line, source, target, relation, w, t, reason, value) from `fields`."""
    t, why_t = _time_sql(cfg)
    rules = [("bad IS NOT NULL", "bad", "NULL")]
    if cfg.num_nodes is not None:
        n = int(cfg.num_nodes)
        for end in ("source", "target"):
            rules.append((f"{end} IS NOT NULL AND NOT {_id_ok(end, n)}",
                          _q(f"bad_id: {end} is not an integer in [0, {n})"), end))
    rules += [("source IS NULL", "'missing_endpoint: no source'", "NULL"),
              ("target IS NULL", "'missing_endpoint: no target'", "NULL"),
              ("weight IS NOT NULL AND NOT coalesce(isfinite(w), false)", "'bad_weight: not a finite number'",
               "weight"),
              ("timestamp IS NOT NULL AND t IS NULL", why_t, "timestamp")]
    if not cfg.allow_self_loops:
        rules.append(("source = target", "'self_loop'", "source"))
    reason, value = _first_broken(rules)
    ids = _canonical_ids(("source", "target"), cfg.num_nodes)
    con.execute(f"""CREATE OR REPLACE TEMP TABLE parsed AS
        SELECT ln, line, source, target, coalesce(relation, '') AS relation, w, t, {reason} AS reason,
               {value} AS value
        FROM (SELECT *, try_cast(weight AS DOUBLE) AS w, {t} AS t FROM (SELECT {ids} FROM fields))""")
    # duplicates: a later row of the same (src, dst, rel, time) in this file, or one kept by an earlier file /
    # run; the same pair at another time is a repeated interaction (a dynamic graph's data), not a duplicate
    key = ("source || ' -> ' || target || CASE WHEN relation = '' THEN '' ELSE ' [' || relation || ']' END "
           "|| CASE WHEN t IS NULL THEN '' ELSE ' at ' || to_timestamp(t)::VARCHAR END")
    con.execute(f"""CREATE OR REPLACE TEMP TABLE judged AS
        SELECT ln, line, source, target, relation, w, t,
               CASE WHEN reason IS NOT NULL THEN reason WHEN ln > first THEN 'duplicate: of line ' || first
               END AS reason,
               CASE WHEN reason IS NOT NULL THEN value WHEN ln > first THEN {key} END AS value
        FROM (SELECT *, min(ln) OVER (PARTITION BY source, target, relation, t, reason IS NULL) AS first
              FROM parsed)""")
    con.execute(f"""UPDATE judged SET reason = 'duplicate: of ' || e.at, value = {key}
                    FROM (SELECT src, dst, rel, ts, any_value(file || ' line ' || line) AS at FROM edges GROUP BY ALL) e
                    WHERE judged.reason IS NULL AND e.src = judged.source AND e.dst = judged.target
                      AND e.rel = judged.relation AND e.ts IS NOT DISTINCT FROM judged.t""")


def _judge_nodes(con, cfg: IngestConfig, width: int) -> None:
    """Temp table `judged`(ln, line, id, fv, reason, value) from `fields`."""
    rules = [("bad IS NOT NULL", "bad", "NULL"), ("fv IS NULL", "'malformed: no features list'", "NULL")]
    if cfg.num_nodes is not None:
        rules.append((f"id IS NOT NULL AND NOT {_id_ok('id', int(cfg.num_nodes))}",
                      _q(f"bad_id: id is not an integer in [0, {cfg.num_nodes})"), "id"))
    not_num = ("list_filter(fv, lambda v: v IS NOT NULL AND lower(v) NOT IN ('nan', 'null') "
               "AND try_cast(v AS DOUBLE) IS NULL)")
    rules += [("id IS NULL", "'missing_id'", "NULL"),
              (f"len(fv) <> {width}", f"'wrong_width: expected {width} features, got ' || len(fv)", "len(fv)::VARCHAR"),
              (f"len({not_num}) > 0", "'non_numeric'", f"{not_num}[1]")]
    reason, value = _first_broken(rules)
    con.execute(f"""CREATE OR REPLACE TEMP TABLE judged AS
        SELECT ln, line, id, fv, CASE WHEN reason IS NOT NULL THEN reason WHEN ln > first
                                      THEN 'duplicate: of line ' || first END AS reason,
               CASE WHEN reason IS NOT NULL THEN value WHEN ln > first THEN id END AS value
        FROM (SELECT *, min(ln) OVER (PARTITION BY id, reason IS NULL) AS first
              FROM (SELECT ln, line, id, fv, {reason} AS reason, {value} AS value
                    FROM (SELECT {_canonical_ids(("id",), cfg.num_nodes)} FROM fields)))""")
    con.execute("""UPDATE judged SET reason = 'duplicate: of ' || r.at, value = judged.id
                   FROM (SELECT id, any_value(file || ' line ' || line) AS at FROM node_rows GROUP BY id) r
                   WHERE judged.reason IS NULL AND r.id = judged.id""")


def _store(con, path: Path, kind: str) -> None:
    f = _q(str(path))
    if kind == "nodes":
        con.execute(f"""INSERT INTO node_rows SELECT id, list_transform(fv, lambda v: coalesce(try_cast(v AS DOUBLE),
                        'nan'::DOUBLE)), {f}, ln FROM judged WHERE reason IS NULL""")
    else:
        con.execute(f"INSERT INTO edges SELECT source, target, relation, w, t, {f}, ln FROM judged "
                    f"WHERE reason IS NULL")
    con.execute(f"INSERT INTO quarantine (file, line, reason, value, raw) SELECT {f}, ln, reason, value, line "
                f"FROM judged WHERE reason IS NOT NULL")


def _counts(con) -> dict[str, Any]:
    """Rows in / kept / quarantined, per-rule counts and the first example of each rule, of the
    file just judged."""
    rows = con.execute("""SELECT split_part(reason, ':', 1) AS r, count(*), min(ln), arg_min(value, ln),
                                 arg_min(reason, ln)
                          FROM judged WHERE reason IS NOT NULL GROUP BY r ORDER BY r""").fetchall()
    rows_in, kept = con.execute("SELECT count(*), count(*) FILTER (WHERE reason IS NULL) FROM judged").fetchone()
    return {"rows_in": int(rows_in), "kept": int(kept), "quarantined": int(sum(r[1] for r in rows)),
            "by_rule": {r[0]: int(r[1]) for r in rows},
            "examples": {r[0]: {"line": int(r[2]), "reason": r[4], "value": r[3]} for r in rows}}


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
        fmt = file_format(path)
        size, key = path.stat().st_size, str(path)
        prev = seen.get(key)
        skip = 1 if fmt in ("csv", "tsv") else 0  # the header line
        if prev is not None:
            if prev["size"] == size and prev["sha256"] == _sha256(path):
                reports.append({"file": key, "kind": kind, "skipped": "already ingested", "rows_in": 0, "kept": 0,
                                "quarantined": 0, "by_rule": {}, "examples": {}})
                continue
            if fmt != "parquet" and size > prev["size"] and _sha256(path, prev["size"]) == prev["sha256"]:
                skip = prev["lines"]  # the file grew: only the appended lines are new
            else:
                raise ValueError(f"{path} changed since it was ingested (not an append); rebuild with a fresh output "
                                 f"folder instead of an incremental sync")
        import duckdb

        try:
            lines, fnames = _read_fields(con, path, fmt, kind, skip, cfg)
        except (duckdb.Error, UnicodeDecodeError) as e:
            raise _read_error(path, fmt, e) from None
        if kind == "nodes":
            if width is None:
                width = cfg.num_features
            if width is None:  # the first well-formed row's width
                row = con.execute("SELECT len(fv) FROM fields WHERE bad IS NULL AND fv IS NOT NULL "
                                  "ORDER BY ln LIMIT 1").fetchone()
                width = int(row[0]) if row else len(fnames)
            _judge_nodes(con, cfg, width)
            manifest["num_features"] = width
        else:
            _judge_edges(con, cfg)
        _store(con, path, kind)
        rep = {"file": key, "kind": kind, "format": fmt, "first_line": skip + 1, **_counts(con)}
        if rep["rows_in"] != rep["kept"] + rep["quarantined"]:  # invariant; fail loudly if ever broken
            raise RuntimeError(f"row accounting broke for {path}: {rep}")
        reports.append(rep)
        seen[key] = {"kind": kind, "size": size, "sha256": _sha256(path), "lines": lines}
        log.info("%s: %d rows, %d kept, %d quarantined %s", path.name, rep["rows_in"], rep["kept"],
                 rep["quarantined"], rep["by_rule"])
    return reports
