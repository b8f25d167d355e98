"""Graph branch benchmark: linear probe on a Planetoid dataset, the augmentation table, and
scale checks (one pre-training epoch on a generated large graph, full-batch or
neighbour-sampled; cleaning a generated large edge file).

Every section runs the shipped code: the probe and the augmentation table call the graph SSL
recipe (`autoglm.recipes.graph_ssl.probe`, what `autoglm graph probe` runs) on the config
file, the scale section calls `pretrain_graph` / `pretrain_graph_sampled`, the clean section
`clean_graph`. The config is the same file the CLI reads, changed with `--set key=value`
(dotted paths, as in the file):

    python benchmarks/graph_ssl.py --sections probe --seeds 10                  # configs/graph-cora.yaml
    python benchmarks/graph_ssl.py --sections probe --set ssl.loss.contrastive_weight=0 \\
        --set ssl.loss.reconstruction_weight=0                                  # the CCA-SSG term alone
    python benchmarks/graph_ssl.py --sections augmentations --aug-seeds 2
    python benchmarks/graph_ssl.py --sections scale --scale-nodes 1000000 --scale-edges 10000000 \\
        --scale-mode sampled --scale-steps 5
    python benchmarks/graph_ssl.py --sections clean --clean-edges 10000000

Probe protocol: pre-train per seed on the whole graph (no labels), freeze, logistic
regression on the public split's train nodes with weight decay and standardisation chosen on
validation, test accuracy at the best validation epoch; mean +/- std over seeds. Published
anchors on Cora: GCN 81.5, GAT 83.0, DGI 82.3, GRACE 81.9, CCA-SSG 84.0, GraphMAE 84.2 +/- 0.4.
Writes docs/results/graph_ssl.{json,md} (and graph_ssl_curve.png with probe.probe_every).
"""

from __future__ import annotations

import argparse
import logging
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch

from autoglm.graph.experiment import curve_rows
from autoglm.graph.probe import linear_probe
from autoglm.graph.sampling import build_csr, pretrain_graph_sampled, sampled_steps
from autoglm.graph.ssl import pretrain_graph
from autoglm.recipes.graph_ssl import GraphProbeConfig, load_data, probe
from autoglm.settings import load_config, parse_assignments, to_dict
from results_io import pyplot, save_results

ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("graph_ssl")

AUG_STRATEGIES = [(), ("node_drop",), ("edge_drop",), ("edge_perturb",), ("feature_mask",),
                  ("edge_drop", "feature_mask"), ("node_drop", "edge_perturb", "feature_mask")]


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MB; Linux reports KB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def config(args: argparse.Namespace, **extra) -> GraphProbeConfig:
    """The recipe config: the file, then --set, then the benchmark's own options, then `extra`
    (a section's variant); all through the one loader, so every value is checked the same way."""
    over = parse_assignments(args.set)
    if args.seeds is not None:
        over["probe.seeds"] = args.seeds
    return load_config(GraphProbeConfig, args.config, {**over, **extra})


def probe_section(cfg: GraphProbeConfig, data) -> dict:
    res = probe(cfg, data)
    raw = linear_probe(data.x, data.y, data.train_mask, data.val_mask, data.test_mask, weight_decay=1e-2)
    res["raw_feature_probe"] = 100 * raw["test_acc"]
    return res


def augmentation_section(args: argparse.Namespace, data) -> list:
    """Each augmentation alone, two combinations and none (two identical views), same objective;
    cost = the recipe's measured pre-training seconds per epoch."""
    rows = []
    for augs in AUG_STRATEGIES:
        cfg = config(args, **{"ssl.views.augmentations": list(augs), "probe.seeds": args.aug_seeds,
                              "ssl.optim.epochs": args.aug_epochs, "probe.probe_every": 0, "probe.json_out": None})
        res = probe(cfg, data)
        rows.append({"augmentations": "+".join(augs) or "none", "epoch_ms": 1000 * res["seconds_per_epoch"],
                     "mean": res["mean"], "std": res["std"], "val_mean": res["val_mean"], "seeds": res["seeds"]})
        log.info("aug %s: %.2f +/- %.2f, %.0f ms/epoch", rows[-1]["augmentations"], res["mean"], res["std"],
                 rows[-1]["epoch_ms"])
    for r in rows:
        r["gain"] = r["mean"] - rows[0]["mean"]
    return rows


def scale_section(args: argparse.Namespace) -> dict:
    """One pre-training epoch of the config's objective at width --scale-hidden on a uniform random
    graph, through the shipped `pretrain_graph` (full) or `pretrain_graph_sampled` (every node a
    seed once, fanouts 10,5; --scale-steps measures only the first steps and projects the epoch)."""
    n, e, f = args.scale_nodes, args.scale_edges, args.scale_features
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(n, f, generator=gen) < 0.05).float()
    edge_index = torch.randint(0, n, (2, e), generator=gen)
    sampled = args.scale_mode == "sampled"
    over = {"ssl.encoder.hidden_dim": args.scale_hidden, "ssl.loss.proj_dim": args.scale_hidden,
            "ssl.loss.contrastive_nodes": 2048, "ssl.optim.epochs": 1}
    if sampled:
        over.update({"ssl.optim.batch_size": args.scale_batch_size, "ssl.optim.fanouts": "10,5"})
    cfg = config(args, **over).ssl
    rss0 = peak_rss_mb()
    row = {"nodes": n, "edges": e, "features": f, "hidden": args.scale_hidden, "rss_before_mb": round(rss0, 1),
           "ssl_config": to_dict(cfg)}
    t = time.perf_counter()
    if not sampled:
        _, res = pretrain_graph(x, edge_index, cfg, device=args.device)
        return {**row, "mode": "full-batch", "epoch_s": round(time.perf_counter() - t, 2),
                "peak_rss_mb": round(peak_rss_mb(), 1), "loss": res.history[-1].get("loss")}
    build_csr(edge_index, n)  # timed alone: the part of the call that does not scale with the steps
    csr_s = time.perf_counter() - t
    total = sampled_steps(n, args.scale_batch_size, 1)
    t = time.perf_counter()
    _, res = pretrain_graph_sampled(x, edge_index, cfg, max_steps=args.scale_steps or None, device=args.device)
    dt = time.perf_counter() - t
    full = res.steps == total
    return {**row, "mode": f"sampled (batch {args.scale_batch_size}, fanouts 10,5)"
                           + ("" if full else f", {res.steps}/{total} steps"),
            "steps": res.steps, "total_steps": total, "csr_s": round(csr_s, 2), "steps_s": round(dt, 2),
            "epoch_s": round(dt, 2) if full else None,
            "projected_epoch_s": round(csr_s + (dt - csr_s) * total / res.steps, 1),
            "peak_rss_mb": round(peak_rss_mb(), 1), "loss": res.history[-1].get("loss")}


def clean_section(num_edges: int, num_nodes: int, workdir: Path, memory_limit: str) -> dict:
    """Generate an edge CSV with 1% duplicates, 0.1% self-loops, 0.1% missing targets; clean it."""
    from autoglm.graph.clean import clean_graph  # DuckDB only where this section runs
    path = workdir / "edges.csv"
    gen = torch.Generator().manual_seed(0)
    chunk = 1_000_000
    t = time.perf_counter()
    with open(path, "w") as f:
        f.write("source,target,relation,weight\n")
        for start in range(0, num_edges, chunk):
            n = min(chunk, num_edges - start)
            s = torch.randint(0, num_nodes, (n,), generator=gen)
            d = torch.randint(0, num_nodes, (n,), generator=gen)
            dup = torch.rand(n, generator=gen) < 0.01
            d[dup], s[dup] = d.roll(1)[dup], s.roll(1)[dup]
            loop = torch.rand(n, generator=gen) < 0.001
            d[loop] = s[loop]
            miss = (torch.rand(n, generator=gen) < 0.001).tolist()
            f.write("".join(f"{a},{'' if m else b},r{a % 3},1.0\n" for a, b, m in zip(s.tolist(), d.tolist(), miss)))
    t_gen = time.perf_counter() - t
    rep = clean_graph(workdir / "out", edges=[path], memory_limit=memory_limit)
    tot = rep["totals"]
    assert tot["rows_in"] == num_edges == tot["kept"] + tot["quarantined"]
    return {"edges_in": num_edges, "file_mb": round(path.stat().st_size / 2**20, 1), "generate_s": round(t_gen, 1),
            "ingest_s": rep["seconds"]["ingest"], "total_s": rep["seconds"]["total"], "rows_per_s": rep["rows_per_s"],
            "by_rule": tot["by_rule"], "kept": tot["kept"], "peak_rss_mb": round(peak_rss_mb(), 1),
            "duckdb_memory_limit": memory_limit}


def plot_curve(curve: list[dict], title: str, path: Path) -> None:
    """Probe accuracy vs pre-training epoch, mean with a +/- std band, validation and test."""
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    ep = [c["epoch"] for c in curve]
    for split in ("val", "test"):
        m = [c[f"{split}_acc_mean"] for c in curve]
        sd = [c[f"{split}_acc_std"] for c in curve]
        ax.plot(ep, m, marker="o", label=split)
        ax.fill_between(ep, [a - b for a, b in zip(m, sd)], [a + b for a, b in zip(m, sd)], alpha=0.2)
    ax.set(xlabel="pre-training epoch", ylabel="linear-probe accuracy (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    log.info("wrote %s", path)


def markdown(res: dict) -> str:
    out = ["# Graph SSL benchmark", ""]
    if "probe" in res:
        p = res["probe"]
        seeds = p["seeds"]
        changed = " with " + ", ".join(f"`{kv}`" for kv in res["set"]) if res["set"] else ""
        out += [f"## Linear probe on {p['data']} ({p['split_name']}: {p['split']})", "",
                "| method | val (%) | test accuracy (%) |", "|---|---|---|",
                f"| Open-AutoGLM graph SSL, `{res['config_file']}`{changed} (seeds {seeds[0]}-{seeds[-1]}, "
                f"{p['epochs']} epochs) | {p['val_mean']:.2f} | **{p['mean']:.2f} +/- {p['std']:.2f}** |",
                f"| logistic regression on raw features | | {p['raw_feature_probe']:.2f} |",
                "| published: GCN (supervised) / GAT | | 81.5 / 83.0 |",
                "| published: DGI / GRACE / CCA-SSG / GraphMAE | | 82.3 / 81.9 / 84.0 / 84.2 +/- 0.4 |", "",
                "Per seed (test %): " + ", ".join(f"{r['seed']}: {100 * r['test_acc']:.1f}" for r in p["runs"])
                + f". {p['seconds_per_epoch'] * 1000:.0f} ms per pre-training epoch.", ""]
        if p.get("curve"):
            out += ["### Probe accuracy during pre-training (mean +/- std over seeds; the final row is the "
                    "reported model)", "", "| epoch | val (%) | test (%) |", "|---|---|---|"]
            out += ["| " + " | ".join(row) + " |" for row in curve_rows(p["curve"])]
            out.append("")
    if "augmentations" in res:
        out += ["## Augmentations (same objective, two views)", "",
                "| views | cost / epoch (ms) | val (%) | probe test accuracy (%) | gain vs none (pts) |",
                "|---|---|---|---|---|"]
        out += [f"| {r['augmentations']} | {r['epoch_ms']:.0f} | {r['val_mean']:.2f} | "
                f"{r['mean']:.2f} +/- {r['std']:.2f} | {r['gain']:+.2f} |" for r in res["augmentations"]]
        out.append("")
    if "scale" in res:
        s = res["scale"]
        epoch = s["epoch_s"] if s["epoch_s"] is not None else f"projected {s['projected_epoch_s']}"
        out += ["## Scale: one pre-training epoch", "", "| nodes | edges | mode | epoch (s) | peak RSS (MB) |",
                "|---|---|---|---|---|", f"| {s['nodes']:,} | {s['edges']:,} | {s['mode']} | {epoch} | "
                f"{s['peak_rss_mb']} |", ""]
    if "clean" in res:
        c = res["clean"]
        out += ["## Scale: cleaning a generated edge file", "", "| edges | file (MB) | ingest (s) | rows/s | "
                "peak RSS (MB) | rules |", "|---|---|---|---|---|---|",
                f"| {c['edges_in']:,} | {c['file_mb']} | {c['ingest_s']} | {c['rows_per_s']:,.0f} | "
                f"{c['peak_rss_mb']} | {c['by_rule']} |", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "graph-cora.yaml",
                    help="the recipe config (YAML), as for `autoglm graph probe --config`")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value by its dotted path, e.g. ssl.optim.epochs=50 (repeatable)")
    ap.add_argument("--sections", default="probe,augmentations,scale,clean")
    ap.add_argument("--seeds", type=int, default=None, help="probe.seeds (default: the config's)")
    ap.add_argument("--device", default=None, help="scale section: cpu / cuda; none = CUDA when available")
    ap.add_argument("--aug-seeds", type=int, default=2, help="seeds per augmentation row")
    ap.add_argument("--aug-epochs", type=int, default=100, help="pre-training epochs per augmentation row")
    ap.add_argument("--scale-nodes", type=int, default=1_000_000)
    ap.add_argument("--scale-edges", type=int, default=10_000_000)
    ap.add_argument("--scale-features", type=int, default=32)
    ap.add_argument("--scale-hidden", type=int, default=64)
    ap.add_argument("--scale-mode", choices=["full", "sampled"], default="full")
    ap.add_argument("--scale-batch-size", type=int, default=8192)
    ap.add_argument("--scale-steps", type=int, default=0, help="sampled mode: run only this many mini-batches of "
                                                                "the epoch (0 = all) and project the epoch time")
    ap.add_argument("--clean-edges", type=int, default=10_000_000)
    ap.add_argument("--clean-memory-limit", default="8GB")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default: docs/results)")
    for action in ap._actions:  # every option shows its default in --help
        if action.help is None:
            action.help = "(default: %(default)s)"
    args = ap.parse_args(argv)
    if any("=" not in kv for kv in args.set):
        ap.error("--set takes KEY=VALUE, e.g. --set ssl.optim.epochs=50")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sections = set(args.sections.split(","))
    cfg = config(args)  # checked before any section runs
    try:
        config_file = str(args.config.resolve().relative_to(ROOT))
    except ValueError:
        config_file = str(args.config)
    res: dict = {"config_file": config_file, "set": args.set}  # the probe's result holds the resolved config
    if sections & {"probe", "augmentations"}:
        data = load_data(cfg.data)
        if "probe" in sections:
            res["probe"] = probe_section(cfg, data)
            log.info("probe: %.2f +/- %.2f", res["probe"]["mean"], res["probe"]["std"])
            if res["probe"]["curve"]:
                out = args.out if args.out is not None else ROOT / "docs" / "results"
                plot_curve(res["probe"]["curve"], f"{cfg.data.source}: linear probe during pre-training "
                           f"({cfg.probe.seeds} seeds)", out / "graph_ssl_curve.png")
        if "augmentations" in sections:
            res["augmentations"] = augmentation_section(args, data)
    if "scale" in sections:
        res["scale"] = scale_section(args)
        log.info("scale: %s", {k: v for k, v in res["scale"].items() if k != "ssl_config"})
    if "clean" in sections:
        work = Path(tempfile.mkdtemp(prefix="autoglm-clean-"))
        try:
            res["clean"] = clean_section(args.clean_edges, max(1, args.clean_edges // 10), work,
                                         args.clean_memory_limit)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        log.info("clean: %s", res["clean"])
    save_results(args.out, "graph_ssl", res, markdown(res))


if __name__ == "__main__":
    main()
