"""Multimodal alignment on the built-in digits, side by side in one run.

1. Ablation (the alignment recipe, `autoglm align`, three variants of one config): plain
   in-batch InfoNCE; + momentum encoders with negative queues (MoCo / ALBEF); + momentum
   distillation. The variants train *interleaved*: each runs `--rounds` chunks of its steps
   in turn (the recipe's exact resume continues it), so the load of a shared machine falls on
   all three alike; time per epoch is summed over a variant's chunks (evaluation excluded).
   Each reports zero-shot accuracy (ensembled prompt templates), recall@1/5 both ways and a
   linear probe, on the validation split (where the best variant is chosen) and the test split.
2. The supervised reference: the same image encoder with a linear head, trained with
   cross-entropy on the labels with the same batches, optimiser and steps.
3. Image-conditioned generation: a tiny language model pre-trained on the training captions
   (`autoglm train` recipe), then the image projector of the best variant trained on it with
   the backbone frozen (`autoglm align projector`); the share of greedy captions of test images
   that name the right digit, with and without the image.
4. A plot of validation zero-shot accuracy against epoch (docs/results/alignment_curve.png).

Writes docs/results/alignment.{json,md,png}. Targets: zero-shot test accuracy >= 95% and within
3 points of the supervised reference.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from autoglm.recipes.align import AlignConfig, ProjectorConfig, align, load_split, train_projector, train_supervised
from autoglm.settings import load_config, parse_assignments, to_dict
from results_io import pyplot, save_figure, save_results

ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("alignment")


class StopAt:
    """Trainer callback: stop once `step` optimizer steps are done (the next chunk resumes)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step(self, trainer: Any, row: dict) -> None:
        trainer.should_stop = trainer.step >= self.step


MOMENTUM = 0.99  # of the momentum variants: ALBEF's 0.995 barely moves the momentum towers in a run this short


def variants(cfg: AlignConfig) -> dict[str, dict[str, Any]]:
    alpha = cfg.loss.distill_alpha or 0.4
    m = cfg.loss.momentum or MOMENTUM  # the config trains the plain variant (momentum 0)
    return {"InfoNCE (in-batch)": {"loss.momentum": 0.0, "loss.distill_alpha": 0.0},
            "+ momentum queue": {"loss.momentum": m, "loss.distill_alpha": 0.0},
            "+ momentum distillation": {"loss.momentum": m, "loss.distill_alpha": alpha}}


def ablation(args: argparse.Namespace, base: dict[str, Any], work: Path, split: dict) -> dict[str, Any]:
    cfgs = {name: load_config(AlignConfig, args.config, {**base, **ov, "out": str(work / f"v{i}")})
            for i, (name, ov) in enumerate(variants(load_config(AlignConfig, args.config, base)).items())}
    steps = next(iter(cfgs.values())).train.max_steps
    state = {n: {"train_s": 0.0, "steps": 0, "curve": [], "out": None} for n in cfgs}
    for r in range(1, args.rounds + 1):
        stop = round(steps * r / args.rounds)
        for name, cfg in cfgs.items():
            cfg = dataclasses.replace(cfg, resume=r > 1)
            o = align(cfg, progress=False, split=split, evaluate_at_end=r == args.rounds, callbacks=[StopAt(stop)])
            s = state[name]
            s["train_s"] += o.seconds_per_epoch * o.result.steps_run / _spe(cfg, split)
            s["steps"] = o.result.steps
            s["curve"] += o.curve
            s["out"] = o
            log.info("round %d/%d %s: step %d, %.1f s of training so far", r, args.rounds, name, o.result.steps,
                     s["train_s"])
    rows = {}
    for name, s in state.items():
        o = s["out"]
        last = next((h for h in reversed(o.result.history) if "loss" in h), {})
        rows[name] = {"steps": s["steps"], "epochs": round(s["steps"] / _spe(cfgs[name], split), 1),
                      "seconds_per_epoch": round(s["train_s"] / (s["steps"] / _spe(cfgs[name], split)), 2),
                      "final_loss": last.get("loss"), "logit_scale": last.get("logit_scale"),
                      "val": o.eval["val"], "test": o.eval["test"], "curve": s["curve"], "model_dir": str(o.out),
                      "config": to_dict(cfgs[name])}
    return rows


def _spe(cfg: AlignConfig, split: dict) -> float:
    n = len(split["train"])
    return n / min(cfg.train.batch_size, n)


def caption_section(args: argparse.Namespace, best_dir: str, work: Path, split: dict) -> dict[str, Any]:
    from autoglm.recipes.pretrain import PretrainConfig, pretrain

    corpus = work / "captions.txt"
    corpus.write_text("\n".join(c for cs in split["train"].captions for c in cs) + "\n")
    lm_cfg = load_config(PretrainConfig, overrides={
        "out": str(work / "lm"), "model.preset": "tiny", "model.vocab_size": 512, "data.path": str(corpus),
        "data.cache_dir": str(work / "cache"), "train.max_steps": args.lm_steps, "train.batch_size": 16,
        "train.seq_len": 64, "train.eval_every": 0, "train.save_every": 0, "train.lr": 3e-3, "sample_prompt": ""})
    t = time.perf_counter()
    lm = pretrain(lm_cfg, progress=False)
    lm_s = time.perf_counter() - t
    pc = load_config(ProjectorConfig, overrides={"align_dir": best_dir, "lm": str(work / "lm"),
                                                 "train.max_steps": args.projector_steps,
                                                 "train.lr": args.projector_lr,
                                                 "eval_samples": args.caption_samples})
    res = train_projector(pc, progress=False)
    res.update(lm_steps=args.lm_steps, lm_seconds=round(lm_s, 1), lm_final_eval=lm.result.final_eval,
               projector_config=to_dict(pc))
    return res


def plot(rows: dict[str, Any], sup: dict[str, Any] | None, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, r in rows.items():
        ax.plot([p["epoch"] for p in r["curve"]], [p["val_zero_shot_acc"] for p in r["curve"]], marker="o",
                label=name)
    if sup is not None:
        ax.axhline(sup["val_acc"], color="grey", ls="--", label="supervised (same encoder), final")
    ax.set(xlabel="epoch", ylabel="zero-shot accuracy, validation (%)", title="digits: zero-shot accuracy vs epoch")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def markdown(res: dict[str, Any]) -> str:
    rows, sup = res["ablation"], res.get("supervised")
    lines = ["# Multimodal alignment on digits", "",
             f"Split: {res['split']} images (train/val/test, stratified, seed 0). Best variant on validation: "
             f"**{res['best']}**. Load average at start / end: {res['load_start']} / {res['load_end']}.", "",
             "| variant | zero-shot val | zero-shot test | probe test | i2t R@1 | t2i R@1 | t2i R@5 | s / epoch | "
             "time vs InfoNCE |", "|---|---|---|---|---|---|---|---|---|"]
    base_t = next(iter(rows.values()))["seconds_per_epoch"]
    for name, r in rows.items():
        v, t = r["val"], r["test"]
        lines.append(f"| {name} | {v['zero_shot_acc']:.2f} | {t['zero_shot_acc']:.2f} | {t['probe_acc']:.2f} | "
                     f"{t['i2t_r1']:.2f} | {t['t2i_r1']:.2f} | {t['t2i_r5']:.2f} | {r['seconds_per_epoch']:.2f} | "
                     f"{r['seconds_per_epoch'] / base_t:.2f}x |")
    if sup is not None:
        lines += ["", f"Supervised reference (same image encoder + linear head, cross-entropy, same batches and "
                      f"steps): val {sup['val_acc']:.2f}%, test {sup['test_acc']:.2f}% "
                      f"({sup['seconds_per_epoch']:.2f} s / epoch, trained after the ablation, not interleaved)."]
        best = rows[res["best"]]["test"]["zero_shot_acc"]
        lines.append(f"Zero-shot of the best variant: {best:.2f}% test, {best - sup['test_acc']:+.2f} points "
                     f"against the supervised reference. Targets: >= 95% ({'met' if best >= 95 else 'not met'}), "
                     f"within 3 points ({'met' if best >= sup['test_acc'] - 3 else 'not met'}).")
    cap = res.get("caption")
    if cap:
        lines += ["", f"Image-conditioned generation (projector of the best variant, {cap['steps']} steps on a frozen "
                      f"tiny LM pre-trained {cap['lm_steps']} steps on the training captions): "
                      f"**{cap['caption_acc']:.1f}%** of greedy captions of {cap['eval_images']} test images name the "
                      f"right digit; without the image {cap['caption_acc_no_image']:.1f}%.", "",
                  "| label | caption |", "|---|---|"]
        lines += [f"| {s['label']} | {s['caption']} |" for s in cap.get("samples", [])[:6]]
    lines += ["", "Recall: every caption of every held-out image is a candidate; a caption text that several images "
                  "share (one template, two sevens) counts as correct for each of them.",
              "![zero-shot accuracy vs epoch](alignment_curve.png)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "align-digits.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe overrides, e.g. "
                                                                                    "train.max_steps=100")
    ap.add_argument("--rounds", type=int, default=4, help="chunks each variant's training is interleaved in")
    ap.add_argument("--sections", default="ablation,supervised,caption")
    ap.add_argument("--lm-steps", type=int, default=300)
    ap.add_argument("--projector-steps", type=int, default=1000)
    ap.add_argument("--projector-lr", type=float, default=1e-2, help="chosen on validation captions "
                                                                     "(autoglm align projector --eval-split val)")
    ap.add_argument("--caption-samples", type=int, default=200)
    ap.add_argument("--out", type=Path, default=None, help="results folder (default: docs/results)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("autoglm.training", "autoglm.tokenizer", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    base = parse_assignments(args.set)
    cfg = load_config(AlignConfig, args.config, base)
    sections = set(args.sections.split(","))
    work = Path(tempfile.mkdtemp(prefix="autoglm-align-"))
    res: dict[str, Any] = {"config_file": str(args.config.relative_to(ROOT)) if args.config.is_relative_to(ROOT)
                           else str(args.config), "set": args.set, "load_start": [round(x, 2) for x in os.getloadavg()]}
    try:
        split = load_split(cfg.data, cfg.image.channels, cfg.image.image_size)
        res["split"] = "/".join(str(len(split[k])) for k in ("train", "val", "test"))
        rows = ablation(args, base, work, split)
        res["ablation"] = rows
        res["best"] = max(rows, key=lambda n: rows[n]["val"]["zero_shot_acc"])
        if "supervised" in sections:
            best_cfg = load_config(AlignConfig, args.config, {**base, **variants(cfg)[res["best"]]})
            res["supervised"] = train_supervised(best_cfg, split)
            log.info("supervised: %s", res["supervised"])
        if "caption" in sections:
            res["caption"] = caption_section(args, rows[res["best"]]["model_dir"], work, split)
            log.info("caption accuracy %.1f%% (no image %.1f%%)", res["caption"]["caption_acc"],
                     res["caption"]["caption_acc_no_image"])
        res["load_end"] = [round(x, 2) for x in os.getloadavg()]
        out = args.out if args.out is not None else ROOT / "docs" / "results"
        plot(rows, res.get("supervised"), out / "alignment_curve.png")
        save_results(args.out, "alignment", res, markdown(res))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
