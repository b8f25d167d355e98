"""`autoglm graph clean | pretrain | probe | tune` (registered in cli/__init__.py).

`pretrain` (also `--dynamic` and `--sampled`), `probe` and `tune` are the graph SSL
recipe (`autoglm.recipes.graph_ssl`): their options are generated from its config
(`--config configs/graph-cora.yaml` for the Cora recipe, `--print-config` to see the
resolved one). `clean` stays a plain command: its options are
the files of one ingest and how to read them (delimiter, column names, time unit/format)
plus a few switches, used by no other command or benchmark, so a config file would add a
layer and save nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ..recipes.graph_ssl import GraphPretrainConfig, GraphProbeConfig, GraphTuneConfig
from rich.markup import escape

from .common import console, err, fail, setup_logging, user_errors
from .options import add_recipe_command

__all__ = ["app"]

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Graph branch: clean raw graph files, self-supervised pre-training (static or "
                       "dynamic), linear probe, recipe search.")


@app.command()
def clean(
    out: Path = typer.Option(..., help="Output folder (re-use it for incremental syncs)."),
    edges: list[Path] = typer.Option([], help="Edge list CSV/TSV/JSONL/Parquet: source,target[,relation,weight,"
                                              "timestamp]."),
    triples: list[Path] = typer.Option([], help="Triple dump CSV/TSV/JSONL/Parquet: subject,relation,object."),
    nodes: list[Path] = typer.Option([], help="Node attribute table: id + feature columns (JSONL: id, features)."),
    delimiter: Optional[str] = typer.Option(None, help="CSV field delimiter (',', ';', '|', '\\t'); default: tab "
                                                       "for .tsv, else sniffed from the header line."),
    source_col: Optional[str] = typer.Option(None, help="Column holding the source id (default: source, src, "
                                                        "subject, head or from)."),
    target_col: Optional[str] = typer.Option(None, help="Column holding the target id (default: target, dst, "
                                                        "object, tail or to)."),
    relation_col: Optional[str] = typer.Option(None, help="Relation column (default: relation, rel, predicate, "
                                                          "type)."),
    weight_col: Optional[str] = typer.Option(None, help="Weight column (default: weight, w)."),
    time_col: Optional[str] = typer.Option(None, help="Timestamp column (default: timestamp, time, ts, date, "
                                                      "datetime)."),
    node_id_col: Optional[str] = typer.Option(None, help="Node id column of --nodes files (default: id, node, "
                                                         "node_id)."),
    time_unit: str = typer.Option("auto", help="Unit of epoch-number timestamps: s, ms, or auto (|v| >= 1e11 is "
                                               "ms; 8-digit YYYYMMDD dates and values before 1973 are quarantined "
                                               "as ambiguous). ISO 8601 dates/datetimes are always read (no zone = "
                                               "UTC)."),
    time_format: Optional[str] = typer.Option(None, help="strptime format every timestamp must match instead, "
                                                         "e.g. '%d/%m/%Y %H:%M'."),
    num_nodes: Optional[int] = typer.Option(None, help="If set, node ids must be integers in [0, num_nodes)."),
    allow_self_loops: bool = typer.Option(False, help="Keep self-loops instead of quarantining them."),
    max_quarantine: float = typer.Option(0.5, min=0.0, max=1.0, help="Fail (and write nothing) when more than "
                                                                      "this share of the rows is quarantined."),
    allow_partial: bool = typer.Option(False, help="Write the graph even when nothing or too little was kept."),
    dry_run: bool = typer.Option(False, help="Read, validate and report; write nothing."),
    z_threshold: float = typer.Option(3.0, help="|z| above which a node is flagged as an anomaly."),
    memory_limit: str = typer.Option("4GB", help="DuckDB memory cap (e.g. 4GB, 512MB, 50%); larger inputs spill "
                                                 "to disk."),
    recon_anomaly: bool = typer.Option(False, help="Also flag nodes by the graph autoencoder's masked "
                                                   "reconstruction error (needs --nodes features)."),
    recon_epochs: int = typer.Option(100, min=1, help="Autoencoder training epochs for --recon-anomaly."),
) -> None:
    """Ingest new rows (dedup, quarantine with reasons, impute features, flag anomalies) into OUT.

    Every rejected row goes to OUT/quarantine.csv with the first rule it broke, in this order:
    malformed, bad_id, missing_endpoint, bad_weight, bad_timestamp, self_loop, duplicate
    (same source, target, relation and time). Input must be UTF-8; NULL, NA, N/A, NaN and
    None count as empty in id and time columns. A run that fails (bad input, or a guard
    rail: edge or node rows nothing kept or too many quarantined, no edges) leaves OUT as it
    was. The cleaned graph has no labels: `graph pretrain --data OUT` reads it; `graph probe`
    and `graph tune` need a labelled split ('sbm' or Cora / CiteSeer / PubMed)."""
    from ..graph.clean import CleaningRejected, clean_graph

    setup_logging()
    columns = {"source": source_col, "target": target_col, "relation": relation_col, "weight": weight_col,
               "timestamp": time_col, "id": node_id_col}
    try:
        rep = clean_graph(out, edges=edges, triples=triples, nodes=nodes, num_nodes=num_nodes,
                          allow_self_loops=allow_self_loops, z_threshold=z_threshold, memory_limit=memory_limit,
                          recon_anomaly=recon_anomaly, recon_epochs=recon_epochs, delimiter=delimiter,
                          columns={k: v for k, v in columns.items() if v}, time_unit=time_unit,
                          time_format=time_format, max_quarantine=max_quarantine, allow_partial=allow_partial,
                          dry_run=dry_run)
    except CleaningRejected as e:
        console.print(summary_table(e.report))
        fail(e)
    except user_errors() as e:
        fail(e)
    console.print(summary_table(rep))
    if dry_run:
        console.print(f"dry run: nothing was written to {out}")
    else:
        console.print(f"report: {out / 'report.json'}; quarantined rows: {out / 'quarantine.csv'}")


def summary_table(report: dict):
    """The rows of one clean run: in, kept, quarantined per rule (with the first example), nodes, edges."""
    from rich.table import Table

    t, g = report["totals"], report["graph"]
    table = Table("", "rows", "first example", title="graph clean" + (" (dry run)" if report.get("dry_run") else ""))
    table.add_row("rows in", str(t["rows_in"]), "")
    table.add_row("kept", str(t["kept"]), "")
    table.add_row("quarantined", str(t["quarantined"]),
                  f"{t['quarantined'] / t['rows_in']:.1%} of rows in" if t["rows_in"] else "")
    for rule, n in t["by_rule"].items():
        ex = t.get("examples", {}).get(rule)
        detail = ex["reason"].partition(":")[2].strip() if ex else ""
        where = (f"{Path(ex['file']).name}:{ex['line']}" + (f" {ex['value']!r}" if ex.get("value") is not None else "")
                 + (f": {detail}" if detail else "")) if ex else ""
        table.add_row(f"  {rule}", str(n), escape(where))
    table.add_row("nodes", str(g["num_nodes"]), "in the graph (all runs)")
    table.add_row("edges", str(g["num_edges"]), "in the graph (all runs)")
    return table


def _pretrain(cfg: GraphPretrainConfig) -> None:
    from ..recipes.graph_ssl import pretrain

    if cfg.dynamic.enabled:
        from rich.table import Table

        res = pretrain(cfg)
        table = Table("encoder", "AUC", "AP", title=f"temporal link prediction on {res['data']['source']} "
                      f"({len(res['snapshots'])} snapshots, last {res['test_snapshots']} held out)")
        for name in ("dynamic", "static"):
            if name in res:
                table.add_row(name + (" (carries node states)" if name == "dynamic" else " (each snapshot alone)"),
                              f"{res[name]['auc']:.4f}", f"{res[name]['ap']:.4f}")
        console.print(table)
        skipped = res["skipped_windows"]
        if skipped:
            shown = ", ".join(str(s["window"]) for s in skipped[:5]) + (", ..." if len(skipped) > 5 else "")
            console.print(f"dropped {len(skipped)} empty snapshot window(s) of "
                          f"{len(skipped) + len(res['snapshots'])} (windows {shown}; all in dynamic.json)")
        console.print(f"saved to {cfg.out} (dynamic.json, model.safetensors, states.safetensors)")
        return
    res = pretrain(cfg, progress=True, console=err).result
    last = next((r for r in reversed(res.history) if "loss" in r), {})
    console.print(f"[bold green]done[/]: {res.steps} steps in {res.elapsed:.0f}s, final loss "
                  f"{last.get('loss', float('nan')):.4f}; saved to {cfg.out}")


def _probe(cfg: GraphProbeConfig) -> None:
    from rich.table import Table

    from ..graph.experiment import curve_rows
    from ..recipes.graph_ssl import probe

    out = probe(cfg)
    if out.get("curve"):
        table = Table("epoch", "val (%)", "test (%)", title="probe accuracy during pre-training")
        for row in curve_rows(out["curve"]):
            table.add_row(*row)
        console.print(table)
    if "mean" in out:
        console.print(f"[bold]{cfg.data.source}[/] linear probe: {out['mean']:.2f} +/- {out['std']:.2f} % over "
                      f"seeds {out['seeds']} (split {out['split']})")
    console.print_json(json.dumps({k: v for k, v in out.items() if k != "recipe_config"}, default=str))


def _tune(cfg: GraphTuneConfig) -> None:
    from rich.table import Table

    from ..recipes.graph_ssl import tune

    res = tune(cfg)
    table = Table("trial", "rung", "val (%)", "val loss", "best epoch / of", "stopped", "s", "setting",
                  title=f"graph tune on {cfg.data.source} (validation nodes only; {res['search_seconds']:.0f} s, "
                        f"ended by {res['stopped_by']})")
    for r in res["trials"]:
        table.add_row(str(r["trial"]), str(r["rung"]), f"{r['val_acc']:.2f}", f"{r['val_loss']:.4f}",
                      f"{r['best_epoch']} / {r['max_epochs']}",
                      r["stopped"], f"{r['seconds']:.0f}",
                      escape(", ".join(f"{k.split('.')[-1]}={v}" for k, v in r["overrides"].items()) or "base"))
    console.print(table)
    for r in res["confirm"]:
        who = "the base as configured" if r.get("base") else f"trial {r['trial']}"
        console.print(f"confirm {who}: val {r['val_acc']:.2f}% (loss {r['val_loss']:.4f}) on fresh seeds")
    if res["confirm_skipped"]:
        console.print("not confirmed, the budget would run out: " + ", ".join(
            f"trial {r['trial']} {escape(str(r['overrides']))}" for r in res["confirm_skipped"])
            + ("" if res["confirm"] else " (so the base is kept)"))
    console.print(f"[bold]selected[/]: trial {res['selected']['trial']} {escape(str(res['selected']['overrides']))}")
    for name, rep in res["report"].items():
        console.print(f"{name}: test {rep['mean']:.2f} +/- {rep['std']:.2f} % (val {rep['val_mean']:.2f}) over "
                      f"seeds {rep['seeds']}")
    console.print(f"tuned config: {cfg.out / 'tuned.yaml'}; trials: {cfg.out / 'trials.jsonl'}")


add_recipe_command(app, "tune", GraphTuneConfig, _tune,
                   help="Search a small fixed space (objective weights, mask rates, width, epochs, view strengths, "
                        "learning rate, weight decay) on the graph's validation nodes only, with early stopping "
                        "and a budget in minutes; "
                        "report the test accuracy of the base and the validation-best setting; write tuned.yaml.")
add_recipe_command(app, "pretrain", GraphPretrainConfig, _pretrain,
                   help="Self-supervised pre-training (CCA-SSG term + InfoNCE + masked feature reconstruction, "
                        "weighted); saves the model and the embeddings to --out. Defaults: the best validation "
                        "probe on Cora (configs/graph-cora.yaml) on the generated graph.")
add_recipe_command(app, "probe", GraphProbeConfig, _probe,
                   help="Linear probe (logistic regression on frozen embeddings; weight decay and "
                        "standardisation chosen on the validation split): pre-train + probe per seed, mean +/- "
                        "std, or probe one saved --model-dir.")
