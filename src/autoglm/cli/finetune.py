"""`autoglm distill`, `autoglm finetune [--lora]`, `autoglm merge`, `autoglm adapters train|list`.

Registered in `autoglm.cli` with `app.add_typer(...)` (no group name, so the commands sit
at the top level next to `train`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ..recipes.classify import ClassifyConfig
from ..recipes.distill import DistillRecipeConfig
from ..recipes.finetune import FinetuneConfig
from .common import console, err, fail, setup_logging, user_errors
from .options import add_recipe_command

__all__ = ["app"]

app = typer.Typer(add_completion=False)
adapters_app = typer.Typer(add_completion=False, no_args_is_help=True,
                           help="Task adapters (e.g. sequence classification) on a frozen backbone.")
app.add_typer(adapters_app, name="adapters")


def run_distill(cfg: DistillRecipeConfig) -> None:
    from ..recipes.distill import distill

    ev = distill(cfg, console=err).result
    console.print(f"[bold green]done[/]: {ev.steps} steps; student validation loss {ev.final_eval['loss']:.3f}, "
                  f"next-token accuracy {ev.final_eval['accuracy'] * 100:.1f}%; saved to {cfg.out}")


def run_finetune(cfg: FinetuneConfig) -> None:
    from ..recipes.finetune import finetune

    out = finetune(cfg, console=err)
    info = out.info
    pct = 100 * info["trainable_params"] / info["total_params"]
    msg = (f"[bold green]done[/]: {out.result.steps} steps, {info['trainable_params']:,} trainable params "
           f"({pct:.2f}%)")
    if info["eval_after"]:
        msg += f"; held-out loss {info['eval_before']['loss']:.3f} -> {info['eval_after']['loss']:.3f}"
    console.print(msg + f"; saved to {cfg.out}")


def run_classify(cfg: ClassifyConfig) -> None:
    from ..recipes.classify import classify

    res = classify(cfg)
    console.print(f"adapter {cfg.name!r} ({len(res['labels'])} labels) saved to {res['path']}; train accuracy "
                  f"{res['train_accuracy'] * 100:.1f}%")


add_recipe_command(app, "distill", DistillRecipeConfig, run_distill,
                   help="Train a student from one or two teachers (progressive KD, reference loss).")
add_recipe_command(app, "finetune", FinetuneConfig, run_finetune,
                   help="Fine-tune a saved model fully or with LoRA; with --lora only the adapter is saved. "
                        "Checkpoints (with --lora: adapter, optimizer, scheduler, step) go to OUT/checkpoints.")
add_recipe_command(adapters_app, "train", ClassifyConfig, run_classify,
                   help="Train a sequence-classification adapter with the backbone frozen and save it by name.")


@app.command()
def merge(
    adapter: Path = typer.Argument(..., help="LoRA adapter directory (from `autoglm finetune --lora`)."),
    out: Path = typer.Option(..., help="Where to write the merged, plain model."),
    base: Optional[Path] = typer.Option(None, help="Base model directory (default: the one the adapter records)."),
    overwrite: bool = typer.Option(False, help="Replace a model already saved in OUT (deleted first)."),
) -> None:
    """Fold a LoRA adapter into its base model and save a plain model (loads without PEFT)."""
    from ..training.lora import merge_lora

    setup_logging()
    try:
        if base is None:
            _check_recorded_base(adapter)
        merge_lora(adapter, out, base, overwrite=overwrite)
    except user_errors() as e:
        fail(e)
    console.print(f"merged model saved to {out}")


def _check_recorded_base(adapter: Path) -> None:
    """The base model the adapter's run.json records must still be a model directory; a moved
    or deleted base is named with the option that points at its new place."""
    from ..rundir import RunDir

    recorded = RunDir.open(adapter, "lora").base_model
    if recorded is not None and RunDir.detect(recorded) != "model":
        raise FileNotFoundError(f"the base model {adapter} was trained from, {recorded}, is no longer a saved model "
                                f"directory (moved or deleted?); pass its current place with --base DIR")


@adapters_app.command("list")
def adapters_list(model_dir: Path = typer.Argument(..., help="Model directory.")) -> None:
    """List the adapters saved with a model (MODEL_DIR/adapters/*)."""
    from ..rundir import RunDir
    from ..training.task_adapters import list_saved_adapters

    try:
        RunDir.open(model_dir)
    except user_errors() as e:
        fail(e)
    items = list_saved_adapters(model_dir)
    if not items:
        console.print(f"no adapters saved in {model_dir / 'adapters'}")
        return
    t = Table(title=f"adapters of {model_dir}")
    for col in ("name", "type", "labels", "kwargs"):
        t.add_column(col)
    for a in items:
        t.add_row(a["name"], str(a["type"]), ", ".join(a["labels"] or []), json.dumps(a["kwargs"]))
    console.print(t)
