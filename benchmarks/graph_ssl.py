"""Graph branch benchmark: linear probe on a Planetoid dataset, the augmentation table, and
scale checks (one pre-training epoch on a generated large graph; cleaning a generated
large edge file).

    python benchmarks/graph_ssl.py                                   # all sections, default sizes
    python benchmarks/graph_ssl.py --sections probe --dataset CiteSeer --root ../shared/data/planetoid
    python benchmarks/graph_ssl.py --sections scale,clean --scale-nodes 100000 --scale-edges 1000000

Probe protocol: pre-train per seed on the whole graph (no labels), freeze, logistic
regression on the public split's train nodes, test accuracy at the best validation epoch;
mean +/- std over seeds. Published anchors on Cora: GCN 81.5, GAT 83.0, DGI 82.3,
GRACE 81.9, CCA-SSG 84.0, GraphMAE 84.2 +/- 0.4. Writes benchmarks/results/graph_ssl.{json,md}.

Default pre-training config (the best mean validation accuracy of the configs tried on Cora):
the issue's InfoNCE (weight 0.1) + masked feature reconstruction (weight 1, mask rate 0.5,
SCE alpha 3) plus the CCA-SSG term (weight 1, lambda 1e-3) on CCA-SSG's encoder and views: a
plain 2-layer GCN 512 wide (no input projection, no activation on the last layer, Xavier
init), views by edge drop 0.4 and feature column masking 0.1, row-normalised features,
AdamW lr 1e-3 without decay, 100 epochs. CCA-SSG alone: --contrastive-weight 0
--reconstruction-weight 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from autoglm.graph.datasets import load_graph
from autoglm.graph.encoder import INITS
from autoglm.graph.experiment import curve_rows, ssl_probe
from autoglm.graph.probe import linear_probe
from autoglm.graph.ssl import GraphSSLConfig, GraphSSLModel, GraphSSLObjective
from autoglm.graph_recipes import CORA_RECIPE as R
from autoglm.graph_recipes import CORA_TRAINING as T
from results_io import pyplot, save_results

ROOT = Path(__file__).resolve().parent
PLANETOID = ROOT.parent.parent / "shared" / "data" / "planetoid"
log = logging.getLogger("graph_ssl")


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MB; Linux reports KB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def probe_section(data, cfg: GraphSSLConfig, seeds: int, epochs: int, lr: float, first_seed: int = 0,
                  weight_decay: float = 2e-4, device: str | None = None, probe_every: int = 0) -> dict:
    res = ssl_probe(data, cfg, seeds=list(range(first_seed, first_seed + seeds)), epochs=epochs, lr=lr,
                    weight_decay=weight_decay, device=device, probe_every=probe_every)
    raw = linear_probe(data.x, data.y, data.train_mask, data.val_mask, data.test_mask, weight_decay=1e-2)
    res["raw_feature_probe"] = 100 * raw["test_acc"]
    return res


def epoch_ms(data, cfg: GraphSSLConfig, epochs: int) -> float:
    """Median wall time (ms) of one full-batch objective forward + backward + Adam step."""
    model = GraphSSLModel(data.x.shape[1], cfg)
    obj, opt = GraphSSLObjective(cfg), torch.optim.Adam(model.parameters(), lr=1e-3)
    graph = model.encoder.prepare(data.edge_index, data.x.shape[0])
    times = []
    for step in range(epochs + 1):
        t = time.perf_counter()
        opt.zero_grad()
        obj(model, {"x": data.x, "edge_index": data.edge_index, "graph": graph, "step": step})["loss"].backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times[1:])


AUG_STRATEGIES = [(), ("node_drop",), ("edge_drop",), ("edge_perturb",), ("feature_mask",),
                  ("edge_drop", "feature_mask"), ("node_drop", "edge_perturb", "feature_mask")]


def augmentation_section(data, base: GraphSSLConfig, seeds: int, epochs: int, lr: float, timing_epochs: int,
                         weight_decay: float = 2e-4) -> list:
    """Each augmentation alone, two combinations, and none (two identical views), same objective."""
    rows = []
    for augs in AUG_STRATEGIES:
        cfg = GraphSSLConfig(**{**base.to_dict(), "augmentations": augs})
        res = ssl_probe(data, cfg, seeds=list(range(seeds)), epochs=epochs, lr=lr, weight_decay=weight_decay)
        rows.append({"augmentations": "+".join(augs) or "none", "epoch_ms": epoch_ms(data, cfg, timing_epochs),
                     "mean": res["mean"], "std": res["std"], "val_mean": res["val_mean"]})
        log.info("aug %s: %.2f +/- %.2f, %.0f ms/epoch", rows[-1]["augmentations"], res["mean"], res["std"],
                 rows[-1]["epoch_ms"])
    for r in rows:
        r["gain"] = r["mean"] - rows[0]["mean"]
    return rows


def sampled_epoch(x, edge_index, cfg: GraphSSLConfig, batch_size: int, fanouts: list[int],
                  max_steps: int = 0) -> dict:
    """One epoch of neighbour-sampled mini-batches (ceil(N / batch_size) steps), or only its
    first `max_steps` steps (a measured fraction). -> {"loss", "steps", "total_steps",
    "csr_s" (building the CSR), "steps_s" (the steps run)}."""
    from autoglm.graph.sampling import build_csr, sample_subgraph

    model = GraphSSLModel(x.shape[1], cfg)
    obj, opt = GraphSSLObjective(cfg), torch.optim.Adam(model.parameters(), lr=1e-3)
    t = time.perf_counter()
    csr = build_csr(edge_index, x.shape[0])
    csr_s = time.perf_counter() - t
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    starts = list(range(0, x.shape[0], batch_size))
    run = starts[:max_steps] if max_steps else starts
    loss, t = float("nan"), time.perf_counter()
    for step, start in enumerate(run):
        nodes, sub = sample_subgraph(csr, perm[start:start + batch_size], fanouts, torch.Generator().manual_seed(step))
        opt.zero_grad()
        out = obj(model, {"x": x[nodes], "edge_index": sub, "step": step})
        out["loss"].backward()
        opt.step()
        loss = float(out["loss"])
        if step % 10 == 0:
            log.info("sampled step %d/%d (%d nodes in the subgraph): %.1f s, peak RSS %.0f MB", step + 1, len(run),
                     nodes.numel(), time.perf_counter() - t, peak_rss_mb())
    return {"loss": loss, "steps": len(run), "total_steps": len(starts), "csr_s": round(csr_s, 2),
            "steps_s": round(time.perf_counter() - t, 2)}


def scale_section(num_nodes: int, num_edges: int, num_features: int, hidden: int, mode: str = "full",
                  batch_size: int = 8192, max_steps: int = 0, base: GraphSSLConfig | None = None) -> dict:
    """One pre-training epoch of `base`'s objective (default: GraphSSLConfig()) at width `hidden`
    on a uniform random graph: full-batch, or neighbour-sampled mini-batches (fanouts 10, 5)
    over every node once."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(num_nodes, num_features, generator=gen) < 0.05).float()
    edge_index = torch.randint(0, num_nodes, (2, num_edges), generator=gen)
    cfg = GraphSSLConfig(**{**(base or GraphSSLConfig()).to_dict(), "hidden_dim": hidden, "proj_dim": hidden,
                            "contrastive_nodes": 2048})
    model = GraphSSLModel(num_features, cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    rss0 = peak_rss_mb()
    t = time.perf_counter()
    if mode == "sampled":
        r = sampled_epoch(x, edge_index, cfg, batch_size, [10, 5], max_steps)
        full = r["steps"] == r["total_steps"]
        return {"nodes": num_nodes, "edges": num_edges, "features": num_features, "hidden": hidden,
                "mode": f"sampled (batch {batch_size}, fanouts 10,5)" + ("" if full else
                                                                         f", {r['steps']}/{r['total_steps']} steps"),
                "epoch_s": round(time.perf_counter() - t, 2) if full else None,
                "projected_epoch_s": round(r["csr_s"] + r["steps_s"] * r["total_steps"] / r["steps"], 1),
                "peak_rss_mb": round(peak_rss_mb(), 1), "rss_before_mb": round(rss0, 1), **r}
    graph = model.encoder.prepare(edge_index, num_nodes)
    t_prep = time.perf_counter() - t
    opt.zero_grad()
    out = GraphSSLObjective(cfg)(model, {"x": x, "edge_index": edge_index, "graph": graph, "step": 0})
    out["loss"].backward()
    opt.step()
    dt = time.perf_counter() - t
    return {"nodes": num_nodes, "edges": num_edges, "features": num_features, "hidden": hidden, "mode": "full-batch",
            "epoch_s": round(dt, 2), "adjacency_build_s": round(t_prep, 2), "peak_rss_mb": round(peak_rss_mb(), 1),
            "rss_before_mb": round(rss0, 1), "loss": float(out["loss"])}


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
    out = ["# Graph SSL benchmark", "", f"Machine: {res['machine']}", ""]
    if "probe" in res:
        p = res["probe"]
        out += [f"## Linear probe on {res['dataset']} (public split {p['split']})", "",
                "| method | test accuracy (%) |", "|---|---|",
                f"| Open-AutoGLM graph SSL ({len(p['runs'])} seeds, {p['epochs']} epochs; validation mean "
                f"{p['val_mean']:.2f}) | {p['mean']:.2f} +/- {p['std']:.2f} |",
                f"| logistic regression on raw features | {p['raw_feature_probe']:.2f} |",
                "| published: GCN (supervised) / GAT | 81.5 / 83.0 |",
                "| published: DGI / GRACE / CCA-SSG / GraphMAE | 82.3 / 81.9 / 84.0 / 84.2 +/- 0.4 |", "",
                f"Config: `{json.dumps(p['config'])}`, lr {res['args']['lr']}; "
                f"{p['seconds_per_epoch'] * 1000:.0f} ms/epoch.", ""]
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
                f"{r['mean']:.2f} +/- {r['std']:.2f} | {r['gain']:+.2f} |"
                for r in res["augmentations"]]
        out.append("")
    if "scale" in res:
        s = res["scale"]
        out += ["## Scale: one pre-training epoch", "", "| nodes | edges | mode | epoch (s) | peak RSS (MB) |",
                "|---|---|---|---|---|", f"| {s['nodes']:,} | {s['edges']:,} | {s['mode']} | "
                f"{s['epoch_s'] if s['epoch_s'] is not None else 'projected %s' % s['projected_epoch_s']} | "
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
    ap.add_argument("--sections", default="probe,augmentations,scale,clean")
    ap.add_argument("--dataset", default="Cora")
    ap.add_argument("--root", type=Path, default=PLANETOID, help="folder holding <dataset>/raw")
    ap.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "autoglm-planetoid")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--first-seed", type=int, default=0, help="seeds are first_seed .. first_seed + seeds - 1")
    ap.add_argument("--probe-every", type=int, default=0,
                    help="also probe every N pre-training epochs: a table and graph_ssl_curve.png of accuracy "
                         "vs epoch (0 = off; the reported accuracy is always the final model's)")
    ap.add_argument("--epochs", type=int, default=T["epochs"])
    ap.add_argument("--lr", type=float, default=T["lr"])
    ap.add_argument("--weight-decay", type=float, default=T["weight_decay"], help="AdamW (decoupled) weight decay")
    ap.add_argument("--l2", type=float, default=0.0, help="coupled L2 in the loss (torch Adam's weight_decay)")
    ap.add_argument("--attention", action=argparse.BooleanOptionalAction, default=False)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--residual", action=argparse.BooleanOptionalAction, default=R["residual"])
    ap.add_argument("--input-projection", action=argparse.BooleanOptionalAction, default=R["input_projection"],
                    help="a linear input projection before the layers (off: the first layer reads x; "
                         "needs --no-propagate-input)")
    ap.add_argument("--final-act", action=argparse.BooleanOptionalAction, default=R["final_act"],
                    help="activation on the last encoder layer (off: CCA-SSG's linear last layer)")
    ap.add_argument("--init", choices=INITS, default=R["init"],
                    help="layer weight init: nn.Linear's default or Xavier-uniform (GCN papers, PyG)")
    ap.add_argument("--dropout", type=float, default=R["dropout"])
    ap.add_argument("--input-dropout", type=float, default=0.0)
    ap.add_argument("--attn-dropout", type=float, default=0.1)
    ap.add_argument("--replace-rate", type=float, default=0.0)
    ap.add_argument("--normalize-features", action=argparse.BooleanOptionalAction, default=True,
                    help="row-normalise the features (sum 1, as DGL's Cora that GraphMAE reads)")
    ap.add_argument("--device", default=None, help="cpu / cuda; None = CUDA when available")
    ap.add_argument("--hidden-dim", type=int, default=R["hidden_dim"])
    ap.add_argument("--num-layers", type=int, default=R["num_layers"])
    ap.add_argument("--mask-rate", type=float, default=R["mask_rate"])
    ap.add_argument("--contrastive-weight", type=float, default=R["contrastive_weight"])
    ap.add_argument("--propagate-input", action=argparse.BooleanOptionalAction, default=R["propagate_input"])
    ap.add_argument("--reconstruction-weight", type=float, default=R["reconstruction_weight"])
    ap.add_argument("--decorrelation-weight", type=float, default=R["decorrelation_weight"],
                    help="weight of the CCA-SSG term (view invariance + decorrelation) on the encoder outputs")
    ap.add_argument("--decorrelation-lambda", type=float, default=R["decorrelation_lambda"])
    ap.add_argument("--augmentations", default=",".join(R["augmentations"]),
                    help="how the two views are made (node_drop, edge_perturb, edge_drop, feature_mask)")
    ap.add_argument("--aug-p", default=",".join(map(str, R["aug_p"])), help="strength of view 1 and view 2")
    ap.add_argument("--feature-p", default=",".join(map(str, R["feature_p"])),
                    help="feature-masking rate of view 1 and 2 ('' = --aug-p)")
    ap.add_argument("--contrastive-nodes", type=int, default=R["contrastive_nodes"])
    ap.add_argument("--aug-seeds", type=int, default=2)
    ap.add_argument("--aug-epochs", type=int, default=100)
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
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(torch.get_num_threads())
    sections = set(args.sections.split(","))
    res: dict = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                 "dataset": args.dataset, "machine": f"{torch.get_num_threads()} torch threads, CPU (shared)"}
    cfg = GraphSSLConfig(hidden_dim=args.hidden_dim, num_layers=args.num_layers, mask_rate=args.mask_rate,
                         sce_alpha=R["sce_alpha"], contrastive_weight=args.contrastive_weight,
                         reconstruction_weight=args.reconstruction_weight, contrastive_nodes=args.contrastive_nodes,
                         propagate_input=args.propagate_input, attention=args.attention, heads=args.heads,
                         residual=args.residual, input_projection=args.input_projection,
                         final_act=args.final_act, init=args.init,
                         dropout=args.dropout, input_dropout=args.input_dropout, attn_dropout=args.attn_dropout,
                         replace_rate=args.replace_rate, l2=args.l2,
                         decorrelation_weight=args.decorrelation_weight,
                         decorrelation_lambda=args.decorrelation_lambda,
                         augmentations=tuple(args.augmentations.split(",")),
                         aug_p=tuple(float(p) for p in args.aug_p.split(",")),
                         feature_p=tuple(float(p) for p in args.feature_p.split(",")) if args.feature_p else None)
    if sections & {"probe", "augmentations"}:
        data = load_graph(args.dataset, args.root, args.cache_dir, normalize_features=args.normalize_features)
        if "probe" in sections:
            res["probe"] = probe_section(data, cfg, args.seeds, args.epochs, args.lr, args.first_seed,
                                         args.weight_decay, args.device, args.probe_every)
            log.info("probe: %.2f +/- %.2f", res["probe"]["mean"], res["probe"]["std"])
            if res["probe"]["curve"]:
                plot_curve(res["probe"]["curve"], f"{args.dataset}: linear probe during pre-training "
                           f"({args.seeds} seeds)", args.out / "graph_ssl_curve.png")
        if "augmentations" in sections:
            res["augmentations"] = augmentation_section(data, cfg, args.aug_seeds, args.aug_epochs, args.lr, 5,
                                                           args.weight_decay)
    if "scale" in sections:
        res["scale"] = scale_section(args.scale_nodes, args.scale_edges, args.scale_features, args.scale_hidden,
                                     args.scale_mode, args.scale_batch_size, args.scale_steps, cfg)
        log.info("scale: %s", res["scale"])
    if "clean" in sections:
        work = Path(tempfile.mkdtemp(prefix="autoglm-clean-"))
        try:
            res["clean"] = clean_section(args.clean_edges, max(1, args.clean_edges // 10), work, args.clean_memory_limit)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        log.info("clean: %s", res["clean"])
    save_results(args.out, "graph_ssl", res, markdown(res))


if __name__ == "__main__":
    main()
