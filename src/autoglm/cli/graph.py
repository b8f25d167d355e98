"""`autoglm graph clean | pretrain | probe` (registered in cli/__init__.py).

`pretrain` and `probe` are the graph SSL recipe (`autoglm.recipes.graph_ssl`): their options
are generated from its config (`--config configs/graph-cora.yaml` for the Cora recipe,
`--print-config` to see the resolved one). `clean` stays a plain command: its options are
the files of one ingest and four switches, used by no other command or benchmark, so a
config file would add a layer and save nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ..recipes.graph_ssl import GraphPretrainConfig, GraphProbeConfig
from .common import console, err, fail, setup_logging, user_errors
from .options import add_recipe_command

__all__ = ["app"]

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Graph branch: clean raw graph files, self-supervised pre-training, linear probe.")


@app.command()
def clean(
    out: Path = typer.Option(..., help="Output folder (re-use it for incremental syncs)."),
    edges: list[Path] = typer.Option([], help="Edge list CSV/TSV/JSONL: source,target[,relation,weight,timestamp]."),
    triples: list[Path] = typer.Option([], help="Triple dump CSV/TSV/JSONL: subject,relation,object."),
    nodes: list[Path] = typer.Option([], help="Node attribute table: id + feature columns (JSONL: id, features)."),
    num_nodes: Optional[int] = typer.Option(None, help="If set, node ids must be integers in [0, num_nodes)."),
    allow_self_loops: bool = typer.Option(False, help="Keep self-loops instead of quarantining them."),
    z_threshold: float = typer.Option(3.0, help="|z| above which a node is flagged as an anomaly."),
    memory_limit: str = typer.Option("4GB", help="DuckDB memory cap; larger inputs spill to disk."),
    recon_anomaly: bool = typer.Option(False, help="Also flag nodes by the graph autoencoder's masked "
                                                   "reconstruction error (needs --nodes features)."),
    recon_epochs: int = typer.Option(100, min=1, help="Autoencoder training epochs for --recon-anomaly."),
) -> None:
    """Ingest new rows (dedup, quarantine with reasons, impute features, flag anomalies) into OUT."""
    from ..graph.clean import clean_graph

    setup_logging()
    try:
        rep = clean_graph(out, edges=edges, triples=triples, nodes=nodes, num_nodes=num_nodes,
                          allow_self_loops=allow_self_loops, z_threshold=z_threshold, memory_limit=memory_limit,
                          recon_anomaly=recon_anomaly, recon_epochs=recon_epochs)
    except user_errors() as e:
        fail(e)
    console.print_json(json.dumps({"totals": rep["totals"], "graph": rep["graph"], "rows_per_s": rep["rows_per_s"]}))
    console.print(f"report: {out / 'report.json'}; quarantined rows: {out / 'quarantine.csv'}")


def _pretrain(cfg: GraphPretrainConfig) -> None:
    from ..recipes.graph_ssl import pretrain

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


add_recipe_command(app, "pretrain", GraphPretrainConfig, _pretrain,
                   help="Self-supervised pre-training (CCA-SSG term + InfoNCE + masked feature reconstruction, "
                        "weighted); saves the model and the embeddings to --out. Defaults: the best validation "
                        "probe on Cora (configs/graph-cora.yaml) on the generated graph.")
add_recipe_command(app, "probe", GraphProbeConfig, _probe,
                   help="Linear probe (logistic regression on frozen embeddings; weight decay and "
                        "standardisation chosen on the validation split): pre-train + probe per seed, mean +/- "
                        "std, or probe one saved --model-dir.")
