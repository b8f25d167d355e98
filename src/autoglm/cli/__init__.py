"""The `autoglm` command. The only package that reads argv; everything below gets explicit
arguments. Thin: each command parses (options generated from its recipe's config), calls
the recipe, and prints.

    train / eval / generate / info / compare      cli/train.py
    consolidate (distributed checkpoint -> model) cli/train.py
    distill / finetune / merge / adapters         cli/finetune.py
    serve                                         cli/serve.py
    export onnx                                   cli/export.py
    graph clean | pretrain | probe                cli/graph.py
    align [train] | eval | projector              cli/align.py
    ops forecast | scrape                         cli/ops.py
"""

from __future__ import annotations

import sys

import typer

from . import align, export, finetune, graph, ops, serve, train

__all__ = ["app", "main"]

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Open-AutoGLM: train, fine-tune, serve and export a sparse-attention MoE language model; "
                       "pre-train graph encoders; align images and text; forecast serving load. Every training "
                       "command takes --config FILE and --print-config.")

train.register(app)
app.add_typer(finetune.app)
app.add_typer(serve.app)
app.add_typer(export.app, name="export")
app.add_typer(graph.app, name="graph")
app.add_typer(align.app, name="align")
app.add_typer(ops.app, name="ops")


def main() -> None:
    app(prog_name="autoglm")


if __name__ == "__main__":
    sys.exit(main())
