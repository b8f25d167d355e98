"""`autoglm export onnx MODEL_DIR --out DIR [--quantize int8|int8-static] [--opset N]`.

Registered in `autoglm.cli` with one `app.add_typer(...)` line. The only place the export
options are read from argv; the work is done by `autoglm.export`.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.logging import RichHandler

from .common import err, fail

__all__ = ["app"]

app = typer.Typer(name="export", add_completion=False, no_args_is_help=True,
                  help="Export a saved model to ONNX (prefill + decode graphs), optionally INT8-quantized.")
console = Console()


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=err, show_path=False, show_time=False)], force=True)
    # onnxruntime's quantizer logs every tensor at INFO on the root logger; the exporter is chatty too
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("autoglm").setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("onnx_ir", "onnxscript", "torch.onnx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@app.command()
def onnx(
    model_dir: Path = typer.Argument(..., help="A saved model directory (config.json, model.safetensors)."),
    out: Path = typer.Option(..., help="Output directory (prefill.onnx, decode.onnx, weights.bin, export.json)."),
    quantize: Optional[str] = typer.Option(None, help="int8 (dynamic, weights per channel) or int8-static "
                                                      "(QDQ, activations calibrated on held-out text)."),
    opset: int = typer.Option(18, help="ONNX opset (18-23)."),
    atol: float = typer.Option(1e-4, help="Max |logit difference| allowed between ONNX Runtime (fp32) and "
                                          "eager PyTorch; the export fails past it."),
    calibration_data: Optional[Path] = typer.Option(None, help="Text file or folder for int8-static calibration "
                                                               "(its held-out 10%); default: the built-in corpus."),
    calibration_windows: int = typer.Option(32, min=1, help="Held-out windows used for calibration."),
    calibration_seq_len: int = typer.Option(128, min=2, help="Tokens per calibration window."),
    keep_lm_head_float: bool = typer.Option(False, help="Keep the LM head in float (more accurate, larger file)."),
    prefill_attention: str = typer.Option("windowed", help="Prefill attention of a sparse model: windowed "
                                                           "(O(T * window), default) or dense (a (T, T) mask)."),
    chunk: int = typer.Option(32, min=1, help="Queries per chunk of the windowed prefill attention."),
    overwrite: bool = typer.Option(False, help="Replace OUT if it exists."),
    cache_dir: Path = typer.Option(Path.home() / ".cache" / "autoglm", help="Where tokenized corpora are cached."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Export MODEL_DIR to ONNX: prefill and decode (KV cache in/out) graphs with dynamic batch and
    sequence axes, checked against eager PyTorch; with --quantize, INT8 through ONNX Runtime."""
    from ..export import QUANT_MODES, ExportError, export_onnx, load_model_dir, quantize_export
    from ..export.storage import directory_size_mb
    from ..export.wrapper import PREFILL_ATTENTION

    _setup_logging(verbose)
    try:
        if quantize is not None and quantize not in QUANT_MODES:
            raise ValueError(f"--quantize must be one of {', '.join(QUANT_MODES)}, got {quantize!r}")
        if out.exists() and any(out.iterdir()) and not overwrite:
            raise FileExistsError(f"{out} already exists and is not empty; pick another --out or pass --overwrite")
        if prefill_attention not in PREFILL_ATTENTION:
            raise ValueError(f"--prefill-attention must be one of {', '.join(PREFILL_ATTENTION)}, "
                             f"got {prefill_attention!r}")
        model = load_model_dir(model_dir)
        windows = None
        if quantize == "int8-static":  # read the calibration text before the (slow) export
            windows = _calibration(model_dir, calibration_data, cache_dir, calibration_windows, calibration_seq_len)
        if quantize is None:
            info = export_onnx(model_dir, out, opset=opset, atol=atol, overwrite=overwrite, model=model,
                               prefill_attention=prefill_attention, chunk=chunk)
        else:
            with tempfile.TemporaryDirectory(prefix="autoglm-fp32-") as tmp:
                fp32 = Path(tmp) / "fp32"
                export_onnx(model_dir, fp32, opset=opset, atol=atol, model=model,
                            prefill_attention=prefill_attention, chunk=chunk)
                info = quantize_export(fp32, out, quantize, calibration=windows,
                                       keep_lm_head_float=keep_lm_head_float, overwrite=overwrite)
    except (ValueError, FileNotFoundError, FileExistsError, ExportError) as e:
        fail(e)
    console.print_json(json.dumps({"out": str(out), "precision": info["precision"],
                                   "size_mb": round(directory_size_mb(out), 3),
                                   **{k: v for k, v in info.items() if k.startswith("parity")}}))


def _calibration(model_dir: Path, data: Optional[Path], cache_dir: Path, n: int, seq_len: int):
    from ..data import build_token_cache, read_corpus
    from ..export.quantize import calibration_windows
    from ..tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir)
    tokens = build_token_cache(read_corpus(data), tok, cache_dir)
    val = tokens.val
    if len(val) < 2:
        raise ValueError(f"the held-out split of {data or 'the built-in corpus'} has {len(val)} tokens: "
                         f"empty calibration data; pass more text with --calibration-data")
    return calibration_windows(val, n, min(seq_len, len(val)))
