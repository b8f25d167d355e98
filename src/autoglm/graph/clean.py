"""`autoglm graph clean`: ingest raw files (DuckDB, incremental), then build a PyG `Data`
with imputed features and anomaly flags, saved as safetensors + JSON.

Output folder:
    graph.duckdb        ingested rows (the state an incremental re-run continues from)
    manifest.json       files already ingested (hash, size, lines), feature width, runs
    quarantine.csv      every rejected row: file, line, reason, raw text (all runs)
    nodes.csv           node index -> original id
    graph.safetensors   x, edge_index, edge_weight, edge_type, edge_time, feature_imputed,
                        imputed, degree_z, feature_z, anomaly (+ recon_error, recon_z with
                        recon_anomaly=True)
    graph.json          shapes, relation names, thresholds
    report.json         rows per rule per file (with the first example of each), totals, rows/s
                        (input rows = kept + quarantined)

Reading (formats, column names, timestamps) and the rules, in the order a row is judged,
are in `autoglm.data.graph_ingest`. Each run works on a copy of the folder in a temporary
sibling that replaces it only when the run succeeds, so bad input, a guard rail
(`CleaningRejected`: nothing kept, or more than `max_quarantine` of the rows quarantined,
counted for edge rows and node rows separately, or a graph without edges, unless
`allow_partial`) or a crash leaves the folder exactly as it was. `dry_run` reads,
validates and reports without writing. `load_clean_graph` returns the PyG `Data`
(`autoglm graph pretrain --data OUT` reads the same folder); `time_snapshots` cuts it into
windows of `edge_time` (UTC epoch seconds) for `GraphEncoder.forward_sequence`.

Missing features (nodes without a row, or NaN entries) are filled by feature propagation
(Rossi et al. 2022): repeat x_i <- mean of i's neighbours, resetting known entries, so each
missing entry converges to the harmonic average of the known values around it; they are marked in `feature_imputed`
(N, F) / `imputed` (N,). Anomalies: z-score of log(1 + degree) and the RMS z-score of a
node's features; |z| > threshold flags the node (`anomaly`), nothing is dropped. With
`recon_anomaly=True` a graph autoencoder is also trained on the cleaned graph and each
node's masked-reconstruction error (`autoglm.graph.anomaly`) is scored by a robust z-score
(`recon_z`); recon_z > threshold flags the node too: this catches contextual anomalies
(normal-looking features that do not fit the neighbourhood), which the z-scores miss.

Example:
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "e.csv").write_text("source,target\\na,b\\nb,c\\na,b\\nc,\\n")
    >>> rep = clean_graph(d / "out", edges=[d / "e.csv"])
    >>> rep["totals"]["kept"], rep["totals"]["by_rule"]
    (2, {'duplicate': 1, 'missing_endpoint': 1})
    >>> load_clean_graph(d / "out").edge_index.tolist()
    [[0, 1], [1, 2]]
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import atomic_dir
from ..data.graph_ingest import IngestConfig, connect, ingest_files

__all__ = ["clean_graph", "load_clean_graph", "time_snapshots", "propagate_features", "anomaly_scores",
           "CleaningRejected"]

log = logging.getLogger(__name__)


def propagate_features(x: torch.Tensor, known: torch.Tensor, edge_index: torch.Tensor,
                       steps: int = 40) -> torch.Tensor:
    """Neighbour-mean feature propagation: x (N, F) with `known` (N, F) bool. Unknown entries
    start at the column mean of known entries, then `steps` times x_i <- mean of x_j over
    i's neighbours (edges used in both directions), known entries reset each time; this
    converges to the harmonic extension of the known values. Nodes without neighbours keep
    the column mean. Returns (N, F) with known entries unchanged."""
    n = x.shape[0]
    col_mean = torch.nan_to_num((x.nan_to_num(0) * known).sum(0) / known.sum(0).clamp_min(1))
    out = torch.where(known, x.nan_to_num(0), col_mean.expand_as(x))
    if edge_index.shape[1] == 0 or bool(known.all()):
        return out
    src = torch.cat([edge_index[0], edge_index[1]])
    dst = torch.cat([edge_index[1], edge_index[0]])
    deg = torch.bincount(dst, minlength=n).unsqueeze(1).float()
    has_nbr = deg > 0
    for _ in range(steps):
        mean = torch.zeros_like(out).index_add_(0, dst, out[src]) / deg.clamp_min(1)
        out = torch.where(known | ~has_nbr, out, mean)
    return out


def anomaly_scores(x: torch.Tensor | None, edge_index: torch.Tensor, num_nodes: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(degree_z (N,), feature_z (N,)): z-score of log(1 + total degree); RMS over columns
    of per-column feature z-scores (0 without features)."""
    deg = torch.bincount(edge_index.reshape(-1), minlength=num_nodes).double()
    ld = torch.log1p(deg)
    degree_z = ((ld - ld.mean()) / ld.std().clamp_min(1e-12)) if num_nodes > 1 else torch.zeros(num_nodes)
    if x is None or x.shape[1] == 0 or num_nodes < 2:
        return degree_z.float(), torch.zeros(num_nodes)
    xd = x.double()
    z = (xd - xd.mean(0)) / xd.std(0).clamp_min(1e-12)
    return degree_z.float(), z.pow(2).mean(1).sqrt().float()


def _node_index(con, num_nodes: int | None) -> None:
    """Append ids seen for the first time to `node_index(name, idx)`; existing indices stay."""
    con.execute("CREATE TABLE IF NOT EXISTS node_index(name VARCHAR PRIMARY KEY, idx BIGINT)")
    if num_nodes is not None:
        con.execute(f"INSERT INTO node_index SELECT i::VARCHAR, i FROM range({num_nodes}) t(i) "
                    f"WHERE i::VARCHAR NOT IN (SELECT name FROM node_index)")
        return
    con.execute("""INSERT INTO node_index
        WITH seen AS (SELECT name, min(k) AS k FROM (
            SELECT src AS name, file || ':' || lpad(line::VARCHAR, 12, '0') || ':0' AS k FROM edges UNION ALL
            SELECT dst, file || ':' || lpad(line::VARCHAR, 12, '0') || ':1' FROM edges UNION ALL
            SELECT id, file || ':' || lpad(line::VARCHAR, 12, '0') || ':2' FROM node_rows) GROUP BY name)
        SELECT name, (SELECT coalesce(max(idx) + 1, 0) FROM node_index) + row_number() OVER (ORDER BY k) - 1
        FROM seen WHERE name NOT IN (SELECT name FROM node_index)""")


class CleaningRejected(ValueError):
    """A guard rail tripped (nothing kept, too many rows quarantined, no edges): nothing was
    written. `report` is the report the run would have written (rows per rule, examples);
    `problem` is what was wrong, without the advice on `graph clean`'s options (for callers
    that offer other options)."""

    def __init__(self, message: str, report: dict[str, Any], problem: str | None = None):
        super().__init__(message)
        self.report = report
        self.problem = problem or message


def clean_graph(out_dir: str | Path, edges: Sequence[str | Path] = (), triples: Sequence[str | Path] = (),
                nodes: Sequence[str | Path] = (), num_nodes: int | None = None, allow_self_loops: bool = False,
                num_features: int | None = None, z_threshold: float = 3.0, propagation_steps: int = 40,
                memory_limit: str = "4GB", threads: int | None = None, recon_anomaly: bool = False,
                recon_epochs: int = 100, *, delimiter: str | None = None, columns: dict[str, str] | None = None,
                time_unit: str = "auto", time_format: str | None = None, max_quarantine: float = 0.5,
                allow_partial: bool = False, dry_run: bool = False) -> dict[str, Any]:
    """Ingest new rows of the given files into `out_dir` and rebuild the cleaned graph.
    Returns the report (also written to out_dir/report.json). `recon_anomaly` adds the
    graph autoencoder's reconstruction error to the anomaly scores (needs node features).

    Reading: `delimiter`, `columns` (role -> column name), `time_unit`, `time_format`, see
    `autoglm.data.graph_ingest`. Guard rails: when this run's edge rows, or its node rows,
    include none kept or a quarantined share above `max_quarantine` (each kind is judged on
    its own, so good node rows cannot hide lost edges), or the graph would have no edge,
    `CleaningRejected` is raised (unless `allow_partial`). The run is built in a temporary
    folder next to `out_dir` that replaces it only on success: a failed run leaves `out_dir`
    as it was. `dry_run`: read, validate and return the report (graph: node and edge counts
    only); nothing is written."""
    if not (edges or triples or nodes):
        raise ValueError("no input files; pass edge lists, triple dumps and/or node attribute tables")
    if z_threshold <= 0:
        raise ValueError(f"z_threshold ({z_threshold}) must be > 0")
    if not 0 <= max_quarantine <= 1:
        raise ValueError(f"max_quarantine ({max_quarantine}) must be a fraction in [0, 1], e.g. 0.5 for 50%")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} is a file; --out must be a folder (new, or one written by graph clean)")
    cfg = IngestConfig(num_nodes=num_nodes, allow_self_loops=allow_self_loops, num_features=num_features,
                       memory_limit=memory_limit, threads=threads, delimiter=delimiter, columns=dict(columns or {}),
                       time_unit=time_unit, time_format=time_format)
    mpath = out / "manifest.json"
    manifest = json.loads(mpath.read_text()) if mpath.is_file() else {}
    if manifest.get("num_nodes", num_nodes) != num_nodes:
        raise ValueError(f"{out} was built with num_nodes={manifest['num_nodes']}, now {num_nodes}; "
                         f"use the same value or a fresh output folder")
    manifest["num_nodes"] = num_nodes
    files = ([("edges", Path(p)) for p in edges] + [("triples", Path(p)) for p in triples]
             + [("nodes", Path(p)) for p in nodes])
    t0 = time.perf_counter()
    with _staging(out, dry_run) as work:
        con = connect(work / "graph.duckdb", cfg)
        try:
            reports = ingest_files(con, manifest, files, cfg)
            t_ingest = time.perf_counter() - t0
            _node_index(con, num_nodes)
            totals = _totals(reports)
            n, e = (int(con.execute(f"SELECT count(*) FROM {t}").fetchone()[0]) for t in ("node_index", "edges"))
            report = {"run": len(manifest.get("runs", [])) + 1, "dry_run": dry_run, "files": reports,
                      "totals": totals, "graph": {"num_nodes": n, "num_edges": e}}
            _guard(report, max_quarantine, allow_partial, out)
            if n == 0 and not dry_run:
                raise CleaningRejected(f"the cleaned graph is empty: no row survived cleaning ({totals['by_rule']}); "
                                       f"nothing was written to {out}", report)
            if not dry_run:
                con.execute(f"COPY (SELECT file, line, reason, value, raw FROM quarantine ORDER BY file, line) "
                            f"TO '{work / 'quarantine.csv'}' (HEADER)")
                report["graph"] = _build(con, work, manifest.get("num_features"), z_threshold, propagation_steps,
                                         recon_epochs if recon_anomaly else 0)
                con.execute(f"COPY (SELECT idx, name FROM node_index ORDER BY idx) TO '{work / 'nodes.csv'}' (HEADER)")
        finally:
            con.close()
        shutil.rmtree(work / "duckdb_tmp", ignore_errors=True)
        elapsed = time.perf_counter() - t0
        report.update(seconds={"ingest": round(t_ingest, 3), "total": round(elapsed, 3)},
                      rows_per_s=round(totals["rows_in"] / max(t_ingest, 1e-9), 1))
        if not dry_run:
            manifest.setdefault("runs", []).append({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "totals": totals})
            (work / "manifest.json").write_text(json.dumps(manifest, indent=1))
            (work / "report.json").write_text(json.dumps(report, indent=1))
    return report


@contextlib.contextmanager
def _staging(out: Path, dry_run: bool) -> Iterator[Path]:
    """A working copy of `out`: for a real run a temporary sibling that replaces `out` when the
    block succeeds (`atomic_dir`); for a dry run a scratch folder that is always removed."""
    if dry_run:
        with tempfile.TemporaryDirectory(prefix="autoglm-clean-dry-") as tmp:
            if (out / "graph.duckdb").is_file():  # duplicates are judged against earlier runs too
                shutil.copy2(out / "graph.duckdb", Path(tmp) / "graph.duckdb")
            yield Path(tmp)
        return
    with atomic_dir(out) as tmp:
        if out.is_dir():
            shutil.copytree(out, tmp, symlinks=True, dirs_exist_ok=True)
        yield tmp


def _totals(reports: list[dict[str, Any]]) -> dict[str, Any]:
    totals: dict[str, Any] = {"rows_in": 0, "kept": 0, "quarantined": 0, "by_rule": {}, "examples": {}}
    for r in reports:
        for k in ("rows_in", "kept", "quarantined"):
            totals[k] += r[k]
        for k, v in r["by_rule"].items():
            totals["by_rule"][k] = totals["by_rule"].get(k, 0) + v
        for k, ex in r.get("examples", {}).items():
            totals["examples"].setdefault(k, {"file": r["file"], **ex})
    totals["by_rule"] = dict(sorted(totals["by_rule"].items()))
    totals["examples"] = dict(sorted(totals["examples"].items()))
    return totals


def _why(t: dict[str, Any]) -> str:
    """'rule count, ...; e.g. FILE line N: reason (value)' of totals `t`, the commonest rule first."""
    ranked = sorted(t["by_rule"].items(), key=lambda kv: -kv[1])
    why = ", ".join(f"{k} {v}" for k, v in ranked)
    if ranked:
        ex = t["examples"][ranked[0][0]]
        why += (f"; e.g. {Path(ex['file']).name} line {ex['line']}: {ex['reason']}"
                + (f" ({ex['value']!r})" if ex["value"] is not None else ""))
    return why


def _guard(report: dict[str, Any], max_quarantine: float, allow_partial: bool, out: Path) -> None:
    """Raise CleaningRejected when this run's edge rows or node rows (each kind on its own)
    kept nothing or quarantined more than allowed, or when the graph would have no edge."""
    if allow_partial or report["totals"]["rows_in"] == 0:
        return
    kinds = {"edge": _totals([r for r in report["files"] if r["kind"] != "nodes"]),
             "node": _totals([r for r in report["files"] if r["kind"] == "nodes"])}
    kinds = {k: t for k, t in kinds.items() if t["rows_in"]}
    options = ("fix the input or the reading options (--source-col, --time-col, --time-unit, --time-format, "
               "--delimiter, ...)")
    for kind, t in kinds.items():
        rows = f"{kind} rows" if len(kinds) > 1 else "rows"  # named only when a run reads both kinds
        share = t["quarantined"] / t["rows_in"]
        if t["kept"] > 0 and share <= max_quarantine:
            continue
        head = (f"no {rows[:-1]} of {t['rows_in']} was kept" if t["kept"] == 0 else
                f"{t['quarantined']} of {t['rows_in']} {rows} ({share:.0%}) were quarantined, above the limit of "
                f"{max_quarantine:.0%}")
        flag = " (--max-quarantine)" if t["kept"] else ""
        keep = f", or pass --allow-partial to keep the {t['kept']} good {rows}" if t["kept"] else ""
        raise CleaningRejected(f"{head}{flag} ({_why(t)}); {options}{keep}. Nothing was written to {out}", report,
                               problem=f"{head} ({_why(t)})")
    if report["graph"]["num_edges"] == 0:
        t = kinds.get("edge")
        problem = "the cleaned graph would have no edges: " + (f"no edge row was kept ({_why(t)})" if t else
                                                               "no edge file was given and the folder holds none")
        fix = options if t else "add an edge list (--edges FILE or --triples FILE)"
        raise CleaningRejected(f"{problem}; {fix}, or pass --allow-partial to write a graph of nodes without "
                               f"edges. Nothing was written to {out}", report, problem)


def _build(con, out: Path, width: int | None, z_threshold: float, steps: int, recon_epochs: int = 0
           ) -> dict[str, Any]:
    from safetensors.torch import save_file

    n = int(con.execute("SELECT count(*) FROM node_index").fetchone()[0])
    rels = [r[0] for r in con.execute("SELECT DISTINCT rel FROM edges ORDER BY rel").fetchall()]
    e = con.execute("""SELECT s.idx AS s, d.idx AS d, coalesce(e.weight, 1.0) AS w, coalesce(e.ts, 'nan'::DOUBLE) AS t,
                              r.k AS r
                       FROM edges e JOIN node_index s ON e.src = s.name JOIN node_index d ON e.dst = d.name
                       JOIN (SELECT rel, row_number() OVER (ORDER BY rel) - 1 AS k FROM (SELECT DISTINCT rel FROM edges))
                            r ON e.rel = r.rel
                       ORDER BY e.file, e.line""").fetchnumpy()
    kept = int(con.execute("SELECT count(*) FROM edges").fetchone()[0])
    if len(e["s"]) != kept:  # every kept row must become an edge: an id that misses the node index is a bug
        raise RuntimeError(f"{kept - len(e['s'])} of {kept} kept edge rows found no node index entry (an id spelled "
                           f"differently from the index, e.g. '03' for 3); rebuild into a fresh --out")
    edge_index = torch.from_numpy(np.stack([e["s"], e["d"]]).astype(np.int64)) if len(e["s"]) else \
        torch.empty(2, 0, dtype=torch.long)
    tensors: dict[str, torch.Tensor] = {
        "edge_index": edge_index.contiguous(),
        "edge_weight": torch.from_numpy(np.asarray(e["w"], dtype=np.float32)),
        "edge_time": torch.from_numpy(np.asarray(e["t"], dtype=np.float64)),
        "edge_type": torch.from_numpy(np.asarray(e["r"], dtype=np.int64))}
    x = None
    if width:
        rows = con.execute("SELECT i.idx, r.feats FROM node_rows r JOIN node_index i ON r.id = i.name").fetchall()
        kept = int(con.execute("SELECT count(*) FROM node_rows").fetchone()[0])
        if len(rows) != kept:
            raise RuntimeError(f"{kept - len(rows)} of {kept} kept node rows found no node index entry (an id "
                               f"spelled differently from the index, e.g. '03' for 3); rebuild into a fresh --out")
        x = torch.full((n, width), float("nan"))
        if rows:
            idx = torch.tensor([r[0] for r in rows])
            x[idx] = torch.tensor([r[1] for r in rows], dtype=torch.float32)
        known = ~x.isnan()
        x = propagate_features(x, known, edge_index, steps)
        tensors.update(x=x, feature_imputed=~known, imputed=(~known).any(1))
    degree_z, feature_z = anomaly_scores(x, edge_index, n)
    anomaly = (degree_z.abs() > z_threshold) | (feature_z > z_threshold)
    recon_flags = None
    if recon_epochs:
        if x is None:
            raise ValueError("recon_anomaly needs node features: ingest a node attribute table (--nodes) or turn "
                             "--recon-anomaly off")
        from torch_geometric.utils import to_undirected

        from .anomaly import reconstruction_errors, robust_z

        err = reconstruction_errors(x, to_undirected(edge_index, num_nodes=n), epochs=recon_epochs)
        recon_z = robust_z(err)
        recon_flags = recon_z > z_threshold
        anomaly = anomaly | recon_flags
        tensors.update(recon_error=err, recon_z=recon_z)
    tensors.update(degree_z=degree_z, feature_z=feature_z, anomaly=anomaly)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "graph.safetensors"))
    meta = {"num_nodes": n, "num_edges": int(edge_index.shape[1]), "num_features": int(width or 0),
            "relations": rels, "z_threshold": z_threshold, "imputed_nodes": int(tensors["imputed"].sum()) if x is not None
            else 0, "anomalies": int(anomaly.sum()), "tensors": sorted(tensors)}
    if recon_flags is not None:
        meta["recon_anomalies"] = int(recon_flags.sum())
    (out / "graph.json").write_text(json.dumps(meta, indent=1))
    return meta


def load_clean_graph(out_dir: str | Path) -> Any:
    """The PyG `Data` written by `clean_graph` (tensors from graph.safetensors; metadata from
    graph.json is attached as `relations`)."""
    from safetensors.torch import load_file
    from torch_geometric.data import Data

    out = Path(out_dir)
    if not (out / "graph.safetensors").is_file():
        raise FileNotFoundError(f"{out} holds no graph.safetensors; run `autoglm graph clean --out {out}` first")
    meta = json.loads((out / "graph.json").read_text())
    t = load_file(str(out / "graph.safetensors"))
    return Data(num_nodes=meta["num_nodes"], relations=meta["relations"], **t)


def time_snapshots(data: Any, num_snapshots: int, cumulative: bool = False
                   ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Dynamic graph from a cleaned one: `num_snapshots` equal windows of `edge_time` (UTC
    epoch seconds, as parsed by `graph clean`) between its earliest and latest value, as
    [(x (N, F), edge_index_t (2, E_t))] for `GraphEncoder.forward_sequence`. Edges without a
    time (NaN) are static: in every snapshot. `cumulative`: snapshot t holds every edge up to
    the end of window t.

    >>> from torch_geometric.data import Data
    >>> g = Data(x=torch.zeros(3, 1), edge_index=torch.tensor([[0, 1, 2], [1, 2, 0]]),
    ...          edge_time=torch.tensor([0.0, 86400.0, float("nan")], dtype=torch.float64))
    >>> [ei.tolist() for _, ei in time_snapshots(g, 2)]
    [[[0, 2], [1, 0]], [[1, 2], [2, 0]]]
    """
    if num_snapshots < 1:
        raise ValueError(f"num_snapshots ({num_snapshots}) must be >= 1")
    if getattr(data, "x", None) is None:
        raise ValueError("time_snapshots needs node features (data.x); ingest a node table with --nodes")
    t = data.edge_time.double()
    timed = ~t.isnan()
    if not bool(timed.any()):
        raise ValueError("no edge has a time (edge_time is all NaN); pass --time-col when the column has "
                         "another name")
    lo, hi = t[timed].min(), t[timed].max()
    width = (hi - lo) / num_snapshots if hi > lo else torch.ones((), dtype=torch.float64)
    window = ((t - lo) / width).floor().clamp(0, num_snapshots - 1).nan_to_num(-1).long()  # (E,), -1 = static
    out = []
    for k in range(num_snapshots):
        keep = ~timed | ((window <= k) if cumulative else (window == k))
        out.append((data.x, data.edge_index[:, keep]))
    return out
