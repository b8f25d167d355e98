"""`autoglm export onnx MODEL_DIR --out DIR [--quantize int8|int8-static] [--config FILE]`.

Registered in `autoglm.cli` with one `app.add_typer(...)` line. The options are the fields
of `autoglm.recipes.export.ExportConfig`; the work is the recipe's `run`.
"""

from __future__ import annotations

import json
import logging

import typer

from ..recipes.export import ExportConfig
from .common import console
from .options import add_recipe_command

__all__ = ["app"]

app = typer.Typer(name="export", add_completion=False, no_args_is_help=True,
                  help="Export a saved model to ONNX (prefill + decode graphs), optionally INT8-quantized.")


def _onnx(cfg: ExportConfig) -> None:
    from ..recipes.export import run

    # onnxruntime's quantizer logs every tensor at INFO on the root logger: keep the root at
    # WARNING unless --verbose set it to DEBUG, and this package's own lines at INFO
    root = logging.getLogger()
    if root.level > logging.DEBUG:
        root.setLevel(logging.WARNING)
        logging.getLogger("autoglm").setLevel(logging.INFO)
    info = run(cfg)
    sizes = info["sizes"]
    summary = {"out": str(cfg.out), "precision": info["precision"], "size_mb": round(sizes["onnx_mb"], 3),
               **{k: round(v, 3) for k, v in sizes.items() if k.endswith("_over_onnx") and v is not None},
               **{k: v for k, v in info.items() if "parity" in k}}
    console.print_json(json.dumps(summary))


add_recipe_command(app, "onnx", ExportConfig, _onnx, quiet_loggers=("onnx_ir", "onnxscript", "torch.onnx"),
                   help="Export MODEL_DIR to ONNX: prefill and decode (KV cache in/out) graphs with dynamic batch "
                        "and sequence axes, checked against eager PyTorch (max |logit difference| <= atol + rtol "
                        "x max |logit|); with --quantize, INT8 through ONNX Runtime. Prints the sizes (and how "
                        "many times smaller than the safetensors checkpoint / the FP32 ONNX export) and the "
                        "parity.")
