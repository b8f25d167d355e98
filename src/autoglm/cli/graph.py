"""`autoglm graph clean | pretrain | probe` (registered in cli.py)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.logging import RichHandler

from .common import err, fail
from ..graph_recipes import CORA_RECIPE as R
from ..graph_recipes import CORA_TRAINING as T

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Graph branch: clean raw graph files, self-supervised pre-training, linear probe.")
console = Console()

SOURCE_HELP = ("'sbm' (generated stochastic block model), Cora/CiteSeer/PubMed (with --root) or a folder "
               "written by `autoglm graph clean`")


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True,
                        handlers=[RichHandler(console=err, show_path=False, show_time=False)])


def _pair(text: str, name: str) -> tuple[float, float] | None:
    """'0.4,0.2' -> (0.4, 0.2); '0.3' -> (0.3, 0.3); '' -> None."""
    if not text:
        return None
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--{name} {text!r}: expected one or two numbers, e.g. 0.4 or 0.4,0.2") from None
    if len(vals) not in (1, 2):
        raise ValueError(f"--{name} {text!r}: expected one or two numbers (view 1, view 2)")
    return (vals[0], vals[-1])


def _ssl_config(augment: str, aug_p: str, feature_p: str, **fields):
    """GraphSSLConfig from the CLI's strings (comma lists) plus the other fields by name."""
    from ..graph.ssl import GraphSSLConfig

    return GraphSSLConfig(augmentations=tuple(a for a in augment.split(",") if a), aug_p=_pair(aug_p, "aug-p"),
                          feature_p=_pair(feature_p, "feature-p"), **fields)


def _csv(values) -> str:
    return ",".join(str(v) for v in values)


REC_HELP = "Masked feature reconstruction weight."
LAMBDA_HELP = "CCA-SSG lambda (decorrelation vs invariance)."
PROPAGATE_HELP = "Smooth the input projection once (norm_adj or attention)."
DECOR_HELP = "CCA-SSG weight (view invariance + feature decorrelation on the encoder outputs); 0 = off."
AUG_P_HELP = "Augmentation strength of view 1,view 2 (one number = both)."
MASK_HELP = ("Fraction of nodes whose features are masked and reconstructed (GraphSSLConfig's default is "
             "0.15; 0.5 is GraphMAE's Cora setting).")
NODES_HELP = "InfoNCE is O(N^2): anchors sampled per step (all nodes if the graph is smaller)."
SCE_HELP = "Scaled cosine error exponent of the reconstruction loss (GraphMAE on Cora: 3)."
RESIDUAL_HELP = "Residual layers h + act(A h W); off = plain GCN / GAT layers."
INPUT_PROJ_HELP = ("Linear input projection before the layers; off = the first layer reads the features "
                   "(exact GCN of CCA-SSG; needs --no-propagate-input).")
FINAL_ACT_HELP = "Activation on the last encoder layer; off = a linear last layer (CCA-SSG)."
INIT_HELP = "Layer weight init: torch (nn.Linear default) or glorot (Xavier-uniform, as the GCN papers and PyG)."
FEATURE_P_HELP = "Feature-masking rate of view 1,view 2 if it should differ from --aug-p (CCA-SSG on Cora: 0.1)."


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

    _setup_logging()
    try:
        rep = clean_graph(out, edges=edges, triples=triples, nodes=nodes, num_nodes=num_nodes,
                          allow_self_loops=allow_self_loops, z_threshold=z_threshold, memory_limit=memory_limit,
                          recon_anomaly=recon_anomaly, recon_epochs=recon_epochs)
    except (ValueError, FileNotFoundError) as e:
        fail(e)
    console.print_json(json.dumps({"totals": rep["totals"], "graph": rep["graph"], "rows_per_s": rep["rows_per_s"]}))
    console.print(f"report: {out / 'report.json'}; quarantined rows: {out / 'quarantine.csv'}")


@app.command()
def pretrain(
    data: str = typer.Option("sbm", help=SOURCE_HELP),
    root: Optional[Path] = typer.Option(None, help="Planetoid root holding <name>/raw."),
    cache_dir: Path = typer.Option(Path.home() / ".cache" / "autoglm" / "planetoid", help="Writable copy for PyG."),
    out: Path = typer.Option(Path("runs/graph"), help="Where model.safetensors + config + embeddings go."),
    epochs: int = typer.Option(T["epochs"]), lr: float = typer.Option(T["lr"]),
    hidden_dim: int = typer.Option(R["hidden_dim"]),
    num_layers: int = typer.Option(R["num_layers"]), attention: bool = typer.Option(False),
    mask_rate: float = typer.Option(R["mask_rate"], help=MASK_HELP),
    contrastive_weight: float = typer.Option(R["contrastive_weight"], help="InfoNCE weight."),
    reconstruction_weight: float = typer.Option(R["reconstruction_weight"], help=REC_HELP),
    sce_alpha: float = typer.Option(R["sce_alpha"], help=SCE_HELP),
    contrastive_nodes: int = typer.Option(R["contrastive_nodes"], min=2, help=NODES_HELP),
    decorrelation_weight: float = typer.Option(R["decorrelation_weight"], help=DECOR_HELP),
    decorrelation_lambda: float = typer.Option(R["decorrelation_lambda"], help=LAMBDA_HELP),
    augment: str = typer.Option(_csv(R["augmentations"]), help="Comma list: node_drop, edge_perturb, "
                                                                  "edge_drop, feature_mask."),
    aug_p: str = typer.Option(_csv(R["aug_p"]), help=AUG_P_HELP),
    feature_p: str = typer.Option(_csv(R["feature_p"]), help=FEATURE_P_HELP),
    dropout: float = typer.Option(R["dropout"], help="Dropout on every encoder layer's input."),
    weight_decay: float = typer.Option(T["weight_decay"], help="AdamW (decoupled) weight decay."),
    normalize_features: bool = typer.Option(True, help="Row-normalise Planetoid features (sum 1)."),
    propagate_input: bool = typer.Option(R["propagate_input"], help=PROPAGATE_HELP),
    residual: bool = typer.Option(R["residual"], help=RESIDUAL_HELP),
    input_projection: bool = typer.Option(R["input_projection"], help=INPUT_PROJ_HELP),
    final_act: bool = typer.Option(R["final_act"], help=FINAL_ACT_HELP),
    init: str = typer.Option(R["init"], help=INIT_HELP),
    seed: int = typer.Option(0),
) -> None:
    """Self-supervised pre-training (CCA-SSG term, InfoNCE, masked feature reconstruction; weighted sum), saves
    the model and embeddings. Defaults: the best validation probe on Cora (benchmarks/graph_ssl.py)."""
    from safetensors.torch import save_file

    from ..graph.datasets import load_graph
    from ..graph.experiment import embed, save_ssl_model
    from ..graph.ssl import pretrain_graph

    _setup_logging()
    try:
        g = load_graph(data, root, cache_dir, normalize_features=normalize_features)
        cfg = _ssl_config(augment, aug_p, feature_p, hidden_dim=hidden_dim, num_layers=num_layers,
                          attention=attention, mask_rate=mask_rate, contrastive_weight=contrastive_weight,
                          reconstruction_weight=reconstruction_weight, sce_alpha=sce_alpha,
                          contrastive_nodes=contrastive_nodes, decorrelation_weight=decorrelation_weight,
                          decorrelation_lambda=decorrelation_lambda, dropout=dropout, seed=seed,
                          propagate_input=propagate_input, residual=residual, input_projection=input_projection,
                          final_act=final_act, init=init)
        model, result = pretrain_graph(g.x, g.edge_index, cfg, epochs=epochs, lr=lr, weight_decay=weight_decay,
                                       progress=True, console=err)
    except (ValueError, FileNotFoundError) as e:
        fail(e)
    save_ssl_model(model, out)
    save_file({"embeddings": embed(model, g.x, g.edge_index).contiguous()}, str(out / "embeddings.safetensors"))
    last = result.history[-1] if result.history else {}
    console.print(f"[bold green]done[/]: {result.steps} epochs in {result.elapsed:.0f}s, final loss "
                  f"{last.get('loss', float('nan')):.4f}; saved to {out}")


@app.command()
def probe(
    data: str = typer.Option("sbm", help=SOURCE_HELP + " (needs labels and train/val/test masks)."),
    root: Optional[Path] = typer.Option(None, help="Planetoid root holding <name>/raw."),
    cache_dir: Path = typer.Option(Path.home() / ".cache" / "autoglm" / "planetoid"),
    model_dir: Optional[Path] = typer.Option(None, help="Probe this pre-trained model (one run) instead of "
                                                        "pre-training one per seed."),
    seeds: int = typer.Option(5, min=1, help="Seeds (each: pre-train + probe); mean and std are reported."),
    probe_every: int = typer.Option(0, min=0, help="Also probe every N pre-training epochs and print accuracy "
                                                   "vs epoch, mean over seeds (0 = off)."),
    epochs: int = typer.Option(T["epochs"]), lr: float = typer.Option(T["lr"]),
    hidden_dim: int = typer.Option(R["hidden_dim"]),
    num_layers: int = typer.Option(R["num_layers"]), attention: bool = typer.Option(False),
    mask_rate: float = typer.Option(R["mask_rate"], help=MASK_HELP),
    contrastive_weight: float = typer.Option(R["contrastive_weight"]),
    reconstruction_weight: float = typer.Option(R["reconstruction_weight"]),
    sce_alpha: float = typer.Option(R["sce_alpha"], help=SCE_HELP),
    contrastive_nodes: int = typer.Option(R["contrastive_nodes"], min=2, help=NODES_HELP),
    decorrelation_weight: float = typer.Option(R["decorrelation_weight"], help=DECOR_HELP),
    decorrelation_lambda: float = typer.Option(R["decorrelation_lambda"], help=LAMBDA_HELP),
    augment: str = typer.Option(_csv(R["augmentations"])),
    aug_p: str = typer.Option(_csv(R["aug_p"]), help=AUG_P_HELP),
    feature_p: str = typer.Option(_csv(R["feature_p"]), help=FEATURE_P_HELP),
    dropout: float = typer.Option(R["dropout"]),
    weight_decay: float = typer.Option(T["weight_decay"], help="AdamW (decoupled) weight decay of pre-training."),
    normalize_features: bool = typer.Option(True, help="Row-normalise Planetoid features (sum 1)."),
    propagate_input: bool = typer.Option(R["propagate_input"]),
    residual: bool = typer.Option(R["residual"], help=RESIDUAL_HELP),
    input_projection: bool = typer.Option(R["input_projection"], help=INPUT_PROJ_HELP),
    final_act: bool = typer.Option(R["final_act"], help=FINAL_ACT_HELP),
    init: str = typer.Option(R["init"], help=INIT_HELP),
    json_out: Optional[Path] = typer.Option(None, help="Also write the result as JSON here."),
) -> None:
    """Linear probe (logistic regression on frozen embeddings, public split; weight decay and
    standardisation chosen on the validation split), mean +/- std over seeds."""
    from ..graph.datasets import load_graph
    from ..graph.experiment import curve_rows, load_ssl_model, probe_model, ssl_probe

    _setup_logging()
    try:
        g = load_graph(data, root, cache_dir, normalize_features=normalize_features)
        for k in ("y", "train_mask", "val_mask", "test_mask"):
            if getattr(g, k, None) is None:
                raise ValueError(f"{data} has no {k}; the probe needs labels and a split (use sbm or Planetoid)")
        if model_dir is not None:
            if probe_every:
                raise ValueError("--probe-every follows a pre-training run; drop it with --model-dir")
            res = probe_model(load_ssl_model(model_dir), g)
            out = {"test_acc": 100 * res["test_acc"], "val_acc": 100 * res["val_acc"], "model_dir": str(model_dir)}
        else:
            cfg = _ssl_config(augment, aug_p, feature_p, hidden_dim=hidden_dim, num_layers=num_layers,
                              attention=attention, mask_rate=mask_rate, contrastive_weight=contrastive_weight,
                              reconstruction_weight=reconstruction_weight, sce_alpha=sce_alpha,
                              contrastive_nodes=contrastive_nodes, decorrelation_weight=decorrelation_weight,
                              decorrelation_lambda=decorrelation_lambda, dropout=dropout, seed=0,
                              propagate_input=propagate_input, residual=residual,
                              input_projection=input_projection, final_act=final_act, init=init)
            out = ssl_probe(g, cfg, seeds=list(range(seeds)), epochs=epochs, lr=lr, weight_decay=weight_decay,
                            probe_every=probe_every)
            if out["curve"]:
                from rich.table import Table

                table = Table("epoch", "val (%)", "test (%)", title="probe accuracy during pre-training")
                for row in curve_rows(out["curve"]):
                    table.add_row(*row)
                console.print(table)
            console.print(f"[bold]{data}[/] linear probe: {out['mean']:.2f} +/- {out['std']:.2f} % over {seeds} "
                          f"seeds (split {out['split']})")
    except (ValueError, FileNotFoundError) as e:
        fail(e)
    out["data"] = data
    console.print_json(json.dumps(out))
    if json_out:
        json_out.write_text(json.dumps(out, indent=1))
