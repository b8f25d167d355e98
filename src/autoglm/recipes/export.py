"""Export recipe: a saved model to ONNX (prefill + decode graphs), optionally INT8-quantized.

`autoglm export onnx MODEL_DIR --out DIR [--quantize int8|int8-static]` and
`benchmarks/quantization.py` both run this recipe. Steps:

1. export the fp32 graphs, checked against eager PyTorch (`export_fp32`);
2. with `quantize`, quantize that export with ONNX Runtime's tools (`quantize_fp32`):
   dynamic INT8, or static QDQ calibrated on held-out windows of the corpus the model was
   trained on (`calibration_data`);
3. report the sizes: the export against the FP32 safetensors checkpoint and, for INT8,
   against the FP32 ONNX directory.

The config behind the documented INT8 result is `configs/export-int8.yaml`.

Example:
    >>> from autoglm.settings import load_config
    >>> cfg = load_config(ExportConfig, overrides={"model_dir": "runs/a", "out": "runs/a-int8",
    ...                                            "quantize": "int8-static", "calibration.windows": "8"})
    >>> cfg.quantize, cfg.calibration.windows, cfg.parity.rtol
    ('int8-static', 8, 0.0001)
    >>> load_config(ExportConfig, overrides={"model_dir": "runs/a"})
    Traceback (most recent call last):
    ...
    autoglm.settings.ConfigError: out is required: the directory to write the export to, e.g. --out runs/a-onnx
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..settings import section, setting
from .common import DEFAULT_CACHE

__all__ = ["ExportConfig", "ParitySettings", "CalibrationSettings", "run", "export_fp32", "quantize_fp32",
           "calibration_data"]

log = logging.getLogger(__name__)


@dataclass
class ParitySettings:
    """How close ONNX Runtime's fp32 logits must be to eager PyTorch's for the export to be kept."""

    atol: float = setting(1e-4, "absolute part of the tolerance on max |logit difference| vs eager PyTorch")
    rtol: float = setting(1e-4, "relative part: times the graph's max |logit| (float32 reordering errs in "
                                "proportion to the logits' scale)")

    def __post_init__(self) -> None:
        if not (self.atol >= 0 and self.rtol >= 0):
            raise ValueError(f"atol and rtol must be >= 0, got {self.atol} and {self.rtol}")


@dataclass
class CalibrationSettings:
    """Held-out text for static (QDQ) INT8: the activation ranges are measured on it."""

    data: Path | None = setting(None, "text file or folder (or a .jsonl of {prompt, completion} records) whose "
                                      "held-out 10% calibrates int8-static; none = the data the model was trained "
                                      "or fine-tuned on (run.json), else the built-in corpus",
                                flag="calibration-data")
    windows: int = setting(32, "held-out windows used for calibration", flag="calibration-windows")
    seq_len: int = setting(128, "tokens per calibration window", flag="calibration-seq-len")
    method: Literal["minmax", "percentile", "entropy"] = setting("minmax", "how activation ranges are chosen",
                                                                 flag="calibration-method")

    def __post_init__(self) -> None:
        if self.windows < 1 or self.seq_len < 2:
            raise ValueError(f"calibration needs windows >= 1 and seq_len >= 2, got {self.windows} and "
                             f"{self.seq_len}")


@dataclass
class ExportConfig:
    model_dir: Path | None = setting(None, "a saved model directory (config.json, model.safetensors)",
                                     argument=True)
    out: Path | None = setting(None, "output directory (prefill.onnx, decode.onnx, weights.bin, export.json)")
    quantize: Literal["int8", "int8-static"] | None = setting(
        None, "none = fp32; int8 = dynamic (weights per channel); int8-static = QDQ, activations calibrated "
              "on held-out text")
    keep_lm_head_float: bool = setting(False, "keep the LM head in float when quantizing (more accurate, "
                                              "larger file)")
    reduce_range: bool = setting(True, "quantize weights to a 7-bit range: accurate on every x86 CPU (without VNNI, "
                                       "AVX2 saturates full-range int8 x uint8 products); off = the full int8 range, "
                                       "for CPUs with VNNI")
    opset: int = setting(18, "ONNX opset (18-23)")
    prefill_attention: Literal["windowed", "dense"] = setting(
        "windowed", "prefill attention of a sparse model: windowed (O(T * window)) or dense (a (T, T) mask)")
    chunk: int = setting(32, "queries per chunk of the windowed prefill attention")
    parity: ParitySettings = section(ParitySettings, "the fp32 export's check against eager PyTorch")
    calibration: CalibrationSettings = section(CalibrationSettings, "calibration of int8-static")
    overwrite: bool = setting(False, "replace OUT if it exists")
    cache_dir: Path = setting(DEFAULT_CACHE, "where tokenized corpora are cached")

    def __post_init__(self) -> None:
        if self.model_dir is None:
            raise ValueError("model_dir is required: give the saved model directory to export, e.g. "
                             "`autoglm export onnx runs/a --out runs/a-onnx`")
        if self.out is None:
            raise ValueError("out is required: the directory to write the export to, e.g. --out runs/a-onnx")
        if self.chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {self.chunk}")
        if self.quantize is None and self.calibration.data is not None:
            raise ValueError("calibration.data (--calibration-data) is read only by --quantize int8-static; add "
                             "--quantize int8-static or drop --calibration-data (without --quantize the export "
                             "is fp32)")
        changed = [option for option, is_changed in (
            ("keep_lm_head_float (--keep-lm-head-float)", self.keep_lm_head_float),
            ("reduce_range (--no-reduce-range)", not self.reduce_range)) if is_changed]
        if self.quantize is None and changed:
            raise ValueError(f"{changed[0]} applies only when quantizing; add --quantize int8 or int8-static, or "
                             f"drop it (without --quantize every weight is fp32)")


def calibration_data(cfg: ExportConfig):
    """Held-out calibration windows (1, seq_len) int64 for int8-static, from `cfg.calibration.data`,
    else the corpus the model trained on, else the built-in corpus."""
    from ..data import build_token_cache, read_corpus
    from ..export.quantize import calibration_windows
    from ..rundir import RunDir
    from .finetune import is_jsonl

    run_dir = RunDir.open(cfg.model_dir)
    data = cfg.calibration.data if cfg.calibration.data is not None else run_dir.data_source
    if data is not None and is_jsonl(data):  # {prompt, completion} records (a fine-tuned model's data)
        from ..training.sft_data import read_sft_jsonl

        texts = [r["prompt"] + r["completion"] for r in read_sft_jsonl(data)]  # the text, not the JSON syntax
    else:
        texts = read_corpus(data)
    tokens = build_token_cache(texts, run_dir.load_tokenizer(), cfg.cache_dir)
    val = tokens.val
    if len(val) < 2:
        raise ValueError(f"the held-out split of {data or 'the built-in corpus'} has {len(val)} tokens: empty "
                         f"calibration data; pass more text with --calibration-data")
    return calibration_windows(val, cfg.calibration.windows, min(cfg.calibration.seq_len, len(val)))


def export_fp32(cfg: ExportConfig, out: Path | None = None, model=None) -> dict:
    """The fp32 export of `cfg.model_dir` into `out` (default `cfg.out`), checked against eager
    PyTorch with `cfg.parity`. Returns its export info (export.json)."""
    from ..export import export_onnx

    return export_onnx(cfg.model_dir, out if out is not None else cfg.out, opset=cfg.opset, atol=cfg.parity.atol,
                       rtol=cfg.parity.rtol, overwrite=cfg.overwrite, model=model,
                       prefill_attention=cfg.prefill_attention, chunk=cfg.chunk)


def quantize_fp32(cfg: ExportConfig, fp32_dir: Path, out: Path | None = None, windows=None, model=None) -> dict:
    """Quantize the fp32 export in `fp32_dir` into `out` (default `cfg.out`) as `cfg.quantize` says.
    windows: calibration windows for int8-static (default: `calibration_data(cfg)`).
    model: the eager model exported; when given, the INT8 export's parity against it is
    reported too (`parity_vs_eager`, prefill and decode)."""
    from ..export import quantize_export

    if cfg.quantize is None:
        raise ValueError("quantize is none: there is nothing to quantize; set --quantize int8 or int8-static")
    if cfg.quantize == "int8-static" and windows is None:
        windows = calibration_data(cfg)
    return quantize_export(fp32_dir, out if out is not None else cfg.out, cfg.quantize, calibration=windows,
                           keep_lm_head_float=cfg.keep_lm_head_float, calibrate_method=cfg.calibration.method,
                           reduce_range=cfg.reduce_range, overwrite=cfg.overwrite, reference_model=model)


def run(cfg: ExportConfig) -> dict:
    """Export (and quantize) as `cfg` says; returns the export info written to OUT/export.json
    (precision, sizes, parity vs eager PyTorch; with `quantize`, the INT8 export's parity vs
    eager PyTorch and vs the fp32 export, and the fp32 export's as `fp32_parity_vs_eager`)."""
    from ..export import load_model_dir
    from ..export.onnx_export import check_out_dir
    from ..rundir import RunDir

    src = Path(cfg.model_dir)
    check_out_dir(cfg.out, src)
    if RunDir.detect(src) == "lora":
        raise ValueError(f"{src} is a LoRA adapter, not a model: fold it into its base model first with "
                         f"`autoglm merge {src} --out {src}-merged`, then export that directory")
    if (src / "export.json").is_file() and not (src / "model.safetensors").is_file():
        raise ValueError(f"{src} is an ONNX export already; export the model directory it was made from "
                         f"(config.json + model.safetensors)")

    if cfg.out.exists() and (not cfg.out.is_dir() or any(cfg.out.iterdir())) and not cfg.overwrite:
        raise FileExistsError(f"{cfg.out} already exists and is not empty; pick another --out or pass --overwrite")
    if cfg.quantize == "int8" and cfg.calibration.data is not None:
        log.warning("--calibration-data %s is not used: dynamic INT8 (--quantize int8) measures activations at "
                    "run time; static QDQ (--quantize int8-static) is the mode that calibrates", cfg.calibration.data)
    model = load_model_dir(cfg.model_dir)  # a clear error for a wrong directory before any slow step
    if cfg.quantize is None:
        return export_fp32(cfg, model=model)
    windows = calibration_data(cfg) if cfg.quantize == "int8-static" else None  # bad text fails before the export
    with tempfile.TemporaryDirectory(prefix="autoglm-fp32-") as tmp:
        fp32 = Path(tmp) / "fp32"
        export_fp32(cfg, fp32, model=model)
        return quantize_fp32(cfg, fp32, windows=windows, model=model)
