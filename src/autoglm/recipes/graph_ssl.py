"""The graph SSL recipe: graph source -> self-supervised pre-training -> saved model, and
graph source -> pre-train per seed -> linear probe (mean +/- std over seeds).

`autoglm graph pretrain` is `pretrain(GraphPretrainConfig)` (with `--dynamic`,
`pretrain_dynamic`: snapshots, state-carrying encoder, temporal link prediction vs a static
encoder), `autoglm graph probe` is `probe(GraphProbeConfig)`, `autoglm graph tune` is
`tune(GraphTuneConfig)` (a validation-only recipe search), and benchmarks/graph_ssl.py calls
the same ones. Both configs
share the `data` and `ssl` sections, so one file serves both commands:
configs/graph-cora.yaml is the Cora recipe (data + the SSL config behind the documented
result). Without a file the built-in generated graph ('sbm') runs with the same SSL defaults.

Example:
    >>> from autoglm.settings import load_config
    >>> cfg = load_config(GraphProbeConfig, overrides={"ssl.optim.seed": 5, "probe.seeds": 3})
    >>> cfg.data.source, seeds_of(cfg), cfg.ssl.encoder.hidden_dim
    ('sbm', [5, 6, 7], 512)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..graph.config import GraphSSLConfig
from ..settings import section, setting, to_dict, to_yaml

__all__ = ["GraphData", "ProbeSettings", "TuneSettings", "DynamicSettings", "pretrain_dynamic", "load_timed_data",
           "GraphPretrainConfig", "GraphProbeConfig", "GraphTuneConfig", "GraphPretrainOutput", "load_data",
           "pretrain", "probe", "tune", "seeds_of", "split_name"]

log = logging.getLogger(__name__)

PLANETOID = ("Cora", "CiteSeer", "PubMed")


@dataclass
class GraphData:
    source: str = setting("sbm", "'sbm' (a generated stochastic block model, 1000 nodes), Cora / CiteSeer / "
                                 "PubMed (with root) or a folder written by `autoglm graph clean`", flag="data")
    root: Path | None = setting(None, "Planetoid root: the folder holding <name>/raw/ind.<name>.* (read-only "
                                      "is fine)")
    cache_dir: Path = setting(Path.home() / ".cache" / "autoglm" / "planetoid", "writable copy of the raw "
                              "files, since PyG writes processed/ next to them")
    normalize_features: bool = setting(True, "row-normalise non-negative features to sum 1 (standard for "
                                             "Planetoid)")

    def __post_init__(self) -> None:
        if self.source in PLANETOID and self.root is None:
            raise ValueError(f"source {self.source} needs root, the folder that holds {self.source}/raw "
                             f"(e.g. --root data/planetoid)")


@dataclass
class ProbeSettings:
    seeds: int = setting(5, "pre-train + probe runs, with seeds ssl.optim.seed .. ssl.optim.seed + seeds - 1; "
                            "mean and std over them are reported")
    probe_every: int = setting(0, "also probe every N pre-training epochs, for accuracy vs epoch (0 = off; the "
                                  "reported accuracy is always the final model's)")
    weight_decays: tuple[float, ...] = setting((1e-4, 1e-3, 1e-2, 5e-2), "the probe's weight decay grid, chosen "
                                               "on validation accuracy", flag="probe-weight-decays")
    standardize: tuple[bool, ...] = setting((False, True), "z-score the embeddings before the probe: the "
                                            "choices tried on validation", flag="probe-standardize")
    model_dir: Path | None = setting(None, "probe this pre-trained model (one run, no pre-training) instead "
                                           "of pre-training one per seed")
    json_out: Path | None = setting(None, "also write the result as JSON here")

    def __post_init__(self) -> None:
        self.weight_decays, self.standardize = tuple(self.weight_decays), tuple(self.standardize)
        if self.seeds < 1 or self.probe_every < 0:
            raise ValueError(f"seeds ({self.seeds}) must be >= 1 and probe_every ({self.probe_every}) >= 0")
        if not self.weight_decays or not self.standardize:
            raise ValueError("weight_decays and standardize must each hold at least one value")
        if self.model_dir is not None and self.probe_every:
            raise ValueError(f"probe_every={self.probe_every} follows a pre-training run, and model_dir skips "
                             f"pre-training; set it to 0 (drop --probe-every)")


@dataclass
class TuneSettings:
    minutes: float = setting(20.0, "time budget of the search and confirm stages: settings whose confirmation would end "
                                        "past it are skipped, and without the base's the base is kept (the final "
                                        "report is extra)")
    max_trials: int = setting(24, "most settings tried; trial 0 is the base config (file + options)")
    eval_every: int = setting(10, "probe the validation nodes every N epochs of a trial")
    patience: int = setting(3, "stop a trial after this many validation probes without improvement")
    search_seed: int = setting(0, "seeds the order in which settings are drawn from the space")
    confirm_top: int = setting(2, "re-train the best N settings and the base on fresh seeds and pick by their "
                                  "mean validation accuracy, ties broken by the probe's validation cross-entropy "
                                  "(0 = pick on the search score)")
    confirm_seeds: int = setting(1, "fresh seeds per confirmed setting; with 2 or more a setting replaces the base "
                                    "only when it leads by more than one standard error of the per-seed differences")
    report_seeds: int = setting(3, "seeds of the final test report of the base and the tuned config (0 = none)")
    halving: int = setting(1, "successive halving: each rung trains the settings still in the race on 1/halving "
                              "of the next rung's epochs and keeps the best 1/halving of them (the base always); "
                              "1 = off, every setting trains its full schedule")
    rungs: int = setting(3, "rungs of successive halving (with halving > 1); the last trains full schedules")
    strategy: str = setting("random", "order of the settings tried: 'random' draws every dimension at once; 'local' "
                                      "first tries each one-dimension change of the base (where a good base is "
                                      "improved), then random draws")
    weight_decays: tuple[float, ...] = setting((1e-4, 1e-3, 1e-2, 5e-2), "the probe's weight decay grid (chosen "
                                               "on validation)", flag="probe-weight-decays")
    standardize: tuple[bool, ...] = setting((False, True), "z-score the embeddings before the probe: choices "
                                            "tried on validation", flag="probe-standardize")

    def __post_init__(self) -> None:
        self.weight_decays, self.standardize = tuple(self.weight_decays), tuple(self.standardize)
        self.budget()  # TuneBudget checks the search settings
        if not self.weight_decays or not self.standardize:
            raise ValueError("weight_decays and standardize must each hold at least one value")

    def budget(self) -> Any:
        from ..graph.tune import TuneBudget

        return TuneBudget(minutes=self.minutes, max_trials=self.max_trials, eval_every=self.eval_every,
                          patience=self.patience, search_seed=self.search_seed, confirm_top=self.confirm_top,
                          confirm_seeds=self.confirm_seeds, report_seeds=self.report_seeds,
                          halving=self.halving, rungs=self.rungs, strategy=self.strategy)


@dataclass
class DynamicSettings:
    enabled: bool = setting(False, "dynamic graph: snapshots from edge_time, node states carried from snapshot to "
                                   "snapshot, trained by temporal link prediction and compared with a static "
                                   "encoder (AUC / AP); data 'sbm' means the generated evolving graph here, a "
                                   "CSV / TSV / JSONL / Parquet edge file is cleaned first", flag="dynamic")
    num_snapshots: int = setting(12, "equal time windows between the earliest and the latest edge")
    window: float | None = setting(None, "seconds per snapshot instead of num_snapshots (e.g. 86400 = a day); "
                                         "windows more than half empty are refused as too short for the data")
    untimed: Literal["error", "static"] = setting("error", "edges without a time: error, or static (in every "
                                                           "snapshot)")
    test_snapshots: int = setting(2, "the last transitions t -> t+1 held out for the AUC / AP; they must hold at "
                                     "least 20 edges seen for the first time")
    epochs: int = setting(100, "full-batch training epochs (every training transition each epoch)",
                         flag="dynamic-epochs")
    lr: float = setting(3e-3, "AdamW learning rate of the temporal model", flag="dynamic-lr")
    normalize_state: bool = setting(True, "layer-normalise the carried state so it cannot grow with the "
                                          "number of snapshots")
    hidden_dim: int | None = setting(64, "width of the temporal encoder (the ssl.encoder section otherwise); none = "
                                         "ssl.encoder.hidden_dim (512 wide collapsed to AUC 0.50 at lr 3e-3)",
                                     flag="dynamic-hidden-dim")
    compare_static: bool = setting(True, "also train the static encoder (each snapshot alone) the same way")
    seeds: int = setting(1, "training seeds (ssl.optim.seed onward); AUC / AP are averaged",
                       flag="dynamic-seeds")

    def __post_init__(self) -> None:
        if self.hidden_dim is not None and self.hidden_dim < 1:
            raise ValueError(f"hidden_dim ({self.hidden_dim}) must be >= 1, or none for ssl.encoder.hidden_dim")
        for name in ("num_snapshots", "test_snapshots", "epochs", "seeds"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} ({getattr(self, name)}) must be >= 1")
        if self.window is not None and self.window <= 0:
            raise ValueError(f"window ({self.window}) must be > 0 seconds, or none for num_snapshots")
        if self.lr <= 0:
            raise ValueError(f"lr ({self.lr}) must be > 0")


@dataclass
class GraphPretrainConfig:
    data: GraphData = section(GraphData, "the graph")
    ssl: GraphSSLConfig = section(GraphSSLConfig, "the self-supervised model, objective and optimiser")
    dynamic: DynamicSettings = section(DynamicSettings, "dynamic graphs (--dynamic)")
    out: Path = setting(Path("runs/graph"), "output folder: model.safetensors, graph_ssl_config.json, "
                                            "embeddings.safetensors, config.yaml, run.json")
    overwrite: bool = setting(False, "replace a graph run already in OUT (files of the other kind of run, static or "
                                     "dynamic, are removed); without it such an OUT is refused before training")
    device: str | None = setting(None, "cpu, cuda or cuda:N; none = cuda when available")


@dataclass
class GraphProbeConfig:
    data: GraphData = section(GraphData, "the graph (needs labels and train/val/test masks)")
    ssl: GraphSSLConfig = section(GraphSSLConfig, "the self-supervised model, objective and optimiser")
    probe: ProbeSettings = section(ProbeSettings, "seeds and the linear probe")
    device: str | None = setting(None, "cpu, cuda or cuda:N; none = cuda when available")


@dataclass
class GraphTuneConfig:
    data: GraphData = section(GraphData, "the graph (needs labels and train/val masks; test only for the report)")
    ssl: GraphSSLConfig = section(GraphSSLConfig, "the base config: trial 0, and every field the space leaves alone")
    tune: TuneSettings = section(TuneSettings, "budget, early stopping and the report")
    out: Path = setting(Path("runs/graph-tune"), "output folder: trials.jsonl, tuned.yaml (a probe/pretrain "
                                                 "config), result.json")
    device: str | None = setting(None, "cpu, cuda or cuda:N; none = cuda when available")


@dataclass
class GraphPretrainOutput:
    model: Any  # GraphSSLModel, eval mode
    result: Any  # training.TrainResult
    out: Path


def seeds_of(cfg: GraphProbeConfig) -> list[int]:
    """The probe's seeds: ssl.optim.seed and the next probe.seeds - 1."""
    return list(range(cfg.ssl.optim.seed, cfg.ssl.optim.seed + cfg.probe.seeds))


def split_name(src: GraphData) -> str:
    """How the graph's train/val/test split was made, for the record of every result."""
    if src.source in PLANETOID:
        return "public Planetoid split (20 labelled nodes per class, 500 val, 1000 test)"
    if src.source == "sbm":
        return "generated graph: 10 train nodes per class, N/4 val, N/2 test (seed 0)"
    return "the graph's own train/val/test masks"


def load_data(src: GraphData) -> Any:
    """The graph `src` names, as a PyG `Data` (x, edge_index; y and masks where it has them)."""
    from ..graph.datasets import load_graph

    return load_graph(src.source, src.root, src.cache_dir, normalize_features=src.normalize_features)


# What a `graph pretrain` run writes into OUT: static (model + graph_ssl_config.json + embeddings) or
# dynamic (model + states + dynamic.json, and clean/ when it cleaned an edge file); both config.yaml
# and run.json. Any of the first six means OUT holds a run.
RUN_FILES = ("model.safetensors", "run.json", "graph_ssl_config.json", "embeddings.safetensors",
             "states.safetensors", "dynamic.json", "config.yaml", "clean")


def check_out(cfg: GraphPretrainConfig) -> None:
    """FileExistsError when `cfg.out` already holds a run (a graph run, unless `cfg.overwrite`;
    a language-model or adapter run always), before any data is read or model trained."""
    from ..rundir import KINDS, RunDir

    out = cfg.out
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} is a file; --out must be a folder")
    kind = RunDir.detect(out) if out.is_dir() else None
    if kind in ("model", "lora"):
        raise FileExistsError(f"{out} holds a {KINDS[kind][1]}, not a graph run; pick another --out "
                              f"(--overwrite replaces graph runs only)")
    held = [f for f in RUN_FILES[:6] if (out / f).exists()]
    if held and not cfg.overwrite:
        raise FileExistsError(f"{out} already holds a graph run ({', '.join(held)}); pass --overwrite to replace "
                              f"it, or choose another --out")


def _remove_stale(out: Path, written: set[str]) -> None:
    """Remove the run files of an earlier run in `out` that this run did not write (e.g. a
    dynamic run's states.safetensors after a static run), so OUT holds one run."""
    for name in RUN_FILES:
        p = out / name
        if name in written or not (p.exists() or p.is_symlink()):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
        log.info("removed %s of the run replaced in %s", name, out)


def pretrain(cfg: GraphPretrainConfig, data: Any = None, progress: bool = False,
             console: Any = None) -> GraphPretrainOutput:
    """Pre-train `cfg.ssl` on `data` (default: `load_data(cfg.data)`) and write `cfg.out`: the model
    (model.safetensors + graph_ssl_config.json), the final embeddings (embeddings.safetensors),
    config.yaml (this config; re-run it with --config) and run.json, each by atomic rename.
    An OUT that already holds a run is refused unless `cfg.overwrite` (`check_out`); then the
    files of the earlier run that this one does not write are removed."""
    from safetensors.torch import save_file

    from ..atomic import atomic_files
    from ..graph.experiment import embed, pretrain as train, save_ssl_model

    if cfg.dynamic.enabled:
        return pretrain_dynamic(cfg, data)
    check_out(cfg)
    data = load_data(cfg.data) if data is None else data
    model, result = train(data.x, data.edge_index, cfg.ssl, progress=progress, console=console, device=cfg.device)
    last = next((r for r in reversed(result.history) if "loss" in r), {})
    info = {"recipe": "graph_ssl.pretrain", "data": cfg.data.source, "nodes": int(data.x.shape[0]),
            "edges": int(data.edge_index.shape[1]), "config": to_dict(cfg),
            "result": {"steps": result.steps, "seconds": round(result.elapsed, 2), "final_loss": last.get("loss")}}
    with atomic_files(cfg.out) as tmp:  # every file lands by its own rename once all are written
        save_ssl_model(model, tmp)
        save_file({"embeddings": embed(model, data.x, data.edge_index).contiguous()},
                  str(tmp / "embeddings.safetensors"))
        (tmp / "config.yaml").write_text(to_yaml(dataclasses.replace(cfg, overwrite=False)))  # re-runs refuse
        (tmp / "run.json").write_text(json.dumps(info, indent=2, default=str))
    _remove_stale(cfg.out, {"model.safetensors", "graph_ssl_config.json", "embeddings.safetensors", "config.yaml",
                            "run.json"})
    return GraphPretrainOutput(model, result, cfg.out)


def probe(cfg: GraphProbeConfig, data: Any = None) -> dict[str, Any]:
    """Linear-probe accuracy on `data` (default: `load_data(cfg.data)`)'s split: pre-train and
    probe once per seed (`seeds_of(cfg)`), or probe `cfg.probe.model_dir` once. Returns the
    result with "data" (the source), "split" (node counts), "split_name", "seeds" and
    "recipe_config"; also
    written to `cfg.probe.json_out` when set."""
    from ..atomic import atomic_write_text
    from ..graph.experiment import load_ssl_model, probe_model, ssl_probe

    data = load_data(cfg.data) if data is None else data
    missing = [k for k in ("y", "train_mask", "val_mask", "test_mask") if getattr(data, k, None) is None]
    if missing:
        raise ValueError(f"{cfg.data.source} has no {', '.join(missing)}; the probe needs labels and a "
                         f"train/val/test split (use sbm or a Planetoid dataset)")
    p = cfg.probe
    probe_kw = {"weight_decays": p.weight_decays, "standardize": p.standardize}
    if p.model_dir is not None:
        res = probe_model(load_ssl_model(p.model_dir), data, **probe_kw)
        out: dict[str, Any] = {"test_acc": 100 * res["test_acc"], "val_acc": 100 * res["val_acc"],
                               "model_dir": str(p.model_dir),
                               "split": {k: int(getattr(data, k).sum()) for k in ("train_mask", "val_mask",
                                                                                   "test_mask")}}
    else:
        out = ssl_probe(data, cfg.ssl, seeds=seeds_of(cfg), probe_weight_decays=p.weight_decays,
                        probe_standardize=p.standardize, device=cfg.device, probe_every=p.probe_every)
    out.update(data=cfg.data.source, split_name=split_name(cfg.data), recipe_config=to_dict(cfg))
    if p.json_out is not None:
        atomic_write_text(p.json_out, json.dumps(out, indent=1, default=str))
    return out


def tune(cfg: GraphTuneConfig, data: Any = None) -> dict[str, Any]:
    """`autoglm.graph.tune.tune_graph` on `data` (default: `load_data(cfg.data)`), selecting on its
    validation nodes only. Writes to `cfg.out`, each file by atomic replace: trials.jsonl (every
    search / confirm row as it ends, so an interrupted search keeps its trials), tuned.yaml (the
    chosen setting as a `GraphProbeConfig` with this data section: `autoglm graph probe --config
    OUT/tuned.yaml`) and result.json (everything, with the report's test accuracies)."""
    from ..atomic import atomic_write_text
    from ..graph.tune import check_validation_split, tune_graph

    data = load_data(cfg.data) if data is None else data
    check_validation_split(data, cfg.data.source)
    cfg.out.mkdir(parents=True, exist_ok=True)
    rows: list[str] = []

    def keep(row: dict[str, Any]) -> None:
        rows.append(json.dumps(row, default=str))
        atomic_write_text(cfg.out / "trials.jsonl", "\n".join(rows) + "\n")

    t = cfg.tune
    res = tune_graph(data, cfg.ssl, t.budget(), probe_kw={"weight_decays": t.weight_decays,
                                                          "standardize": t.standardize},
                     device=cfg.device, on_trial=keep)
    from ..settings import from_dict

    tuned = GraphProbeConfig(data=cfg.data, ssl=from_dict(GraphSSLConfig, res["tuned_config"]))
    atomic_write_text(cfg.out / "tuned.yaml", f"# chosen by `autoglm graph tune` on {cfg.data.source}'s validation "
                      f"nodes (trial {res['selected']['trial']})\n" + to_yaml(tuned))
    res.update(data=cfg.data.source, split_name=split_name(cfg.data), recipe_config=to_dict(cfg))
    atomic_write_text(cfg.out / "result.json", json.dumps(res, indent=1, default=str))
    return res


EDGE_FILES = (".csv", ".tsv", ".txt", ".jsonl", ".json", ".parquet")


def load_timed_data(cfg: GraphPretrainConfig, clean_dir: Path) -> tuple[Any, dict[str, Any]]:
    """The graph of a dynamic run and where it came from: 'sbm' -> the generated evolving graph;
    an edge file (source,target,timestamp columns) -> `clean_graph` into `clean_dir` first, a
    folder that must not exist yet, so every run cleans its own file from scratch (bad rows,
    e.g. unparsable timestamps, go to clean_dir/quarantine.csv with their reason; info["clean"]
    counts them); a cleaned folder as it is. A graph without node features gets 32
    seeded N(0, 1) features."""
    import torch

    from ..graph.clean import CleaningRejected, clean_graph, load_clean_graph
    from ..graph.datasets import looks_like_path
    from ..graph.dynamic import evolving_graph

    src = cfg.data.source
    info: dict[str, Any] = {"source": src}
    if src == "sbm":
        data = evolving_graph(seed=cfg.ssl.optim.seed)
        info["source"] = "evolving (generated: 500 nodes, 5 drifting communities, 12 days)"
    elif Path(src).suffix.lower() in EDGE_FILES and Path(src).is_file():
        where = Path(clean_dir)
        if where.exists() and (not where.is_dir() or any(where.iterdir())):
            raise FileExistsError(f"{where} already exists; cleaning for a dynamic run needs a fresh folder")
        # graph pretrain has none of graph clean's reading options: its errors point to that command
        clean_first = (f"clean the file first with `autoglm graph clean --out DIR --edges {src}` and the options "
                       f"it needs (`autoglm graph clean --help`), then run `autoglm graph pretrain --dynamic "
                       f"--data DIR`")
        try:
            rep = clean_graph(where, edges=[src])
        except CleaningRejected as e:
            raise ValueError(f"{src}: {e.problem}; nothing was trained or written. To read the file differently "
                             f"(column names, time unit or format, delimiter: options of `autoglm graph clean`) or "
                             f"to keep only its good rows, {clean_first}") from None
        except ValueError as e:
            if " --" not in str(e):
                raise
            raise ValueError(f"{e} (options of `autoglm graph clean`, not of `graph pretrain`: {clean_first})") \
                from None
        info["clean"] = {"kept": rep["totals"]["kept"], "quarantined": rep["totals"]["by_rule"]}
        data = load_clean_graph(where)
    elif Path(src).is_dir():
        data = load_clean_graph(src)
    elif looks_like_path(src) and not Path(src).exists():
        raise FileNotFoundError(f"--data {src}: no such file or folder (dynamic mode reads an edge file with a "
                                f"timestamp column, a folder written by `autoglm graph clean`, or 'sbm')")
    else:
        raise ValueError(f"dynamic mode reads 'sbm' (the generated evolving graph), an edge file with a timestamp "
                         f"column ({', '.join(EDGE_FILES)}) or a folder written by `autoglm graph clean`; got {src!r}")
    if getattr(data, "x", None) is None:
        data.x = torch.randn(data.num_nodes, 32, generator=torch.Generator().manual_seed(0))
        info["features"] = "none in the data: 32 seeded N(0, 1) features per node"
    return data, info


def _check_windows(snaps: list, skipped: list[dict[str, Any]], data: Any, d: DynamicSettings) -> None:
    """Log the empty windows once (count and a few), and refuse windows that are mostly empty:
    the snapshots would be fragments of bursts (a --window of a minute on daily data)."""
    if not skipped:
        return
    total = len(snaps) + len(skipped)
    shown = ", ".join(str(s["window"]) for s in skipped[:5]) + (", ..." if len(skipped) > 5 else "")
    log.warning("dropped %d empty snapshot window(s) of %d (windows %s): no edge has a time in them",
                len(skipped), total, shown)
    if len(skipped) * 2 <= total:
        return
    t = data.edge_time.double()
    t = t[~t.isnan()]
    span = float(t.max() - t.min())
    how = f"--window {d.window:g} s" if d.window else f"--num-snapshots {d.num_snapshots}"
    fix = (f"use a larger --window (the edges span {span:.0f} s; --window {max(span / 12, 1):.0f} gives 12 "
           f"windows)" if d.window else "use fewer --num-snapshots, or --window SECONDS")
    raise ValueError(f"{len(skipped)} of {total} snapshot windows ({how}) hold no edge: most of the time line is "
                     f"empty, so the snapshots would be fragments of the bursts between; {fix}")


def pretrain_dynamic(cfg: GraphPretrainConfig, data: Any = None) -> dict[str, Any]:
    """`autoglm graph pretrain --dynamic`: snapshots of the timed graph (`snapshot_edges`), the
    state-carrying encoder and (with compare_static) the static one trained by temporal link
    prediction side by side (`compare_temporal`), on the encoder section of `cfg.ssl`. Writes
    to `cfg.out`: model.safetensors (the dynamic model), states.safetensors (node states after
    the last snapshot), dynamic.json (AUC / AP of both, snapshots, dropped empty windows),
    config.yaml and run.json, and OUT/clean when it cleaned an edge file (cleaned afresh each
    run, it replaces the earlier OUT/clean only when the run succeeds). An OUT that already
    holds a run is refused unless `cfg.overwrite` (`check_out`). Returns the dynamic.json
    content."""
    check_out(cfg)
    cfg.out.parent.mkdir(parents=True, exist_ok=True)  # scratch sits next to OUT: same disk, renames are atomic
    with tempfile.TemporaryDirectory(prefix=f".{cfg.out.name}.clean-", dir=cfg.out.parent) as scratch:
        return _pretrain_dynamic(cfg, data, Path(scratch))


def _pretrain_dynamic(cfg: GraphPretrainConfig, data: Any, scratch: Path) -> dict[str, Any]:
    """`pretrain_dynamic` with `scratch`, a temporary folder next to OUT: an edge file is cleaned
    into scratch/clean, which replaces OUT/clean only once the model files are written."""
    from safetensors.torch import save_file

    from ..atomic import atomic_files, fsync_dir
    from ..graph.dynamic import compare_temporal, snapshot_edges, train_temporal

    d = cfg.dynamic
    info: dict[str, Any] = {"source": cfg.data.source}
    fresh = scratch / "clean"
    if data is None:
        data, info = load_timed_data(cfg, fresh)
        if "clean" in info:  # where the quarantine lands once the run succeeds (below)
            info["clean"]["quarantine_file"] = str(cfg.out / "clean" / "quarantine.csv")
    snaps, skipped = snapshot_edges(data, num_snapshots=None if d.window else d.num_snapshots, window=d.window,
                                    untimed=d.untimed)
    _check_windows(snaps, skipped, data, d)
    seeds = list(range(cfg.ssl.optim.seed, cfg.ssl.optim.seed + d.seeds))
    enc = cfg.ssl.encoder if d.hidden_dim is None else dataclasses.replace(cfg.ssl.encoder, hidden_dim=d.hidden_dim)
    if enc.attention and enc.hidden_dim % enc.heads:
        raise ValueError(f"dynamic.hidden_dim ({enc.hidden_dim}) must be divisible by ssl.encoder.heads ({enc.heads})")
    kw = {"epochs": d.epochs, "lr": d.lr, "test_snapshots": d.test_snapshots, "device": cfg.device,
          "normalize_state": d.normalize_state}
    if d.compare_static:
        res = compare_temporal(data.x, snaps, enc, seeds=seeds, **kw)
        last = res.pop("last_dynamic")
    else:
        runs = [train_temporal(data.x, snaps, enc, True, seed=s, **kw) for s in seeds]
        last = runs[-1]
        res = {"dynamic": {"runs": [{"seed": s, **r["test"], "train_loss": r["train_loss"], "seconds": r["seconds"]}
                                    for s, r in zip(seeds, runs)]}}
        for k in ("auc", "ap"):
            res["dynamic"][k] = sum(r[k] for r in res["dynamic"]["runs"]) / len(runs)
    res.update(data=info, nodes=int(data.x.shape[0]), snapshots=[int(e.shape[1]) for e in snaps],
               skipped_windows=skipped, test_snapshots=d.test_snapshots, seeds=seeds)
    run = {"recipe": "graph_ssl.pretrain_dynamic", "config": to_dict(cfg), "result": res}
    with atomic_files(cfg.out) as tmp:
        save_file({k: v.contiguous() for k, v in last["model"].state_dict().items()}, str(tmp / "model.safetensors"))
        save_file({"states": last["states"].contiguous()}, str(tmp / "states.safetensors"))
        (tmp / "dynamic.json").write_text(json.dumps(res, indent=1, default=str))
        (tmp / "config.yaml").write_text(to_yaml(dataclasses.replace(cfg, overwrite=False)))  # re-runs refuse
        (tmp / "run.json").write_text(json.dumps(run, indent=2, default=str))
    written = {"model.safetensors", "states.safetensors", "dynamic.json", "config.yaml", "run.json"}
    if fresh.is_dir():  # this run's cleaned file replaces OUT/clean (the old one goes with scratch)
        if (cfg.out / "clean").exists():
            os.replace(cfg.out / "clean", scratch / "old-clean")
        os.replace(fresh, cfg.out / "clean")
        fsync_dir(cfg.out)
        written.add("clean")
    _remove_stale(cfg.out, written)
    return res
