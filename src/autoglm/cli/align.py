"""`autoglm align [train] | eval | projector` (registered in cli/__init__.py).

All three are the alignment recipe (`autoglm.recipes.align`): options generated from its
configs (`--config configs/align-digits.yaml`, `--print-config`). `autoglm align` with
training options and no sub-command trains, as `autoglm align train` does.
"""

from __future__ import annotations

import inspect
import json
from typing import Any

import typer

from ..recipes.align import AlignConfig, AlignEvalConfig, ProjectorConfig
from .common import console, err, run_under_torchrun
from .options import add_recipe_command

__all__ = ["app"]

app = typer.Typer(add_completion=False, no_args_is_help=False,
                  help="Multimodal alignment: images and captions in one embedding space (CLIP loss, momentum "
                       "encoders, negative queues); zero-shot / retrieval / probe evaluation; an image prefix "
                       "for the language model. Without a sub-command: train (see `autoglm align train --help`).")


def _train(cfg: AlignConfig) -> None:
    from ..recipes.align import align

    if run_under_torchrun(cfg, "align", strategies="ddp or zero1"):  # --nproc N: torchrun ran it on every process
        return
    out = align(cfg, progress=True, console=err)
    if out.model is None:  # not the main rank: it printed nothing and saved nothing
        return
    res = out.result
    last = next((r for r in reversed(res.history) if "loss" in r), {})
    console.print(f"[bold green]done[/]: {res.steps} steps in {res.elapsed:.0f}s ({out.seconds_per_epoch:.1f} s per "
                  f"epoch), final loss {last.get('loss', float('nan')):.4f}, logit scale "
                  f"{last.get('logit_scale', float('nan')):.1f}; saved to {cfg.out}")
    _print_eval(out.eval)


def _print_eval(ev: dict[str, Any]) -> None:
    from rich.table import Table

    rows = [r for r in (ev.values() if "split" not in ev else [ev])]
    keys = ["zero_shot_acc", "probe_acc", "i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5"]
    table = Table("split", "images", *keys, title="alignment (percent)")
    for r in rows:
        table.add_row(r["split"], str(r["images"]), *(f"{r[k]:.2f}" if k in r else "-" for k in keys))
    console.print(table)


def _eval(cfg: AlignEvalConfig) -> None:
    from ..recipes.align import evaluate

    res = evaluate(cfg)
    _print_eval(res)
    console.print_json(json.dumps(res))


def _projector(cfg: ProjectorConfig) -> None:
    from ..recipes.align import train_projector

    res = train_projector(cfg, progress=True, console=err)
    score = (f"; caption accuracy on {res['eval_images']} {res['eval_split']} images: {res['caption_acc']:.1f}% "
             f"(without the image: {res['caption_acc_no_image']:.1f}%)" if "caption_acc" in res else
             " (the data has no classes: no caption accuracy)")
    console.print(f"[bold green]done[/]: projector saved to {res['adapter_dir']}{score}", soft_wrap=True)  # whole path
    console.print_json(json.dumps({k: v for k, v in res.items() if k != "samples"}, default=str))


add_recipe_command(app, "train", AlignConfig, _train,
                   help="Align a ViT-style image encoder and the text backbone (symmetric InfoNCE with a learnable "
                        "temperature; momentum encoders + queues; optional momentum distillation) on image-caption "
                        "pairs (default: the built-in digits; or a CSV/TSV/JSONL, a folder of image + .txt pairs, "
                        "COCO captions JSON); saves the aligned model to --out and reports "
                        "zero-shot accuracy, recall@1/5 and a linear probe on the val and test splits.")
add_recipe_command(app, "eval", AlignEvalConfig, _eval,
                   help="Evaluate an aligned model directory: zero-shot accuracy with ensembled prompt templates, "
                        "image->text and text->image recall@1/5, and a supervised linear probe; on the run's own "
                        "data, split, class names and templates unless --data names another data set.")
add_recipe_command(app, "projector", ProjectorConfig, _projector,
                   help="Train the image projector of a language model (LLaVA-style prefix tokens from the aligned "
                        "image encoder; the language model stays frozen); saves it under LM/adapters/NAME so that "
                        "`autoglm generate LM --image FILE` and `autoglm serve LM` accept images.")

# `autoglm align --steps 50 ...` (no sub-command) trains: the group callback is the train command
_train_cmd = next(c.callback for c in app.registered_commands if c.name == "train")


def _callback(ctx: typer.Context, **values: Any) -> None:
    if ctx.invoked_subcommand is None:
        _train_cmd(**values)
    elif any(v not in (None, False) for v in values.values()):
        raise typer.BadParameter(f"training options go after `autoglm align` only when no sub-command follows; "
                                 f"move them after `{ctx.invoked_subcommand}`")


_sig = inspect.signature(_train_cmd)
_callback.__signature__ = _sig.replace(parameters=[inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                                     annotation=typer.Context),
                                                   *_sig.parameters.values()])
_callback.__annotations__ = {**_train_cmd.__annotations__, "ctx": typer.Context}
app.callback(invoke_without_command=True)(_callback)
