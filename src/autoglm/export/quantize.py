"""INT8 quantization of an export directory with ONNX Runtime's quantization tools.

Two modes, both writing a new export directory with the same layout (`onnx_export`):

* `int8` (dynamic): weights of every MatMul with a constant weight (projections, experts,
  LM head) become int8 **per output channel**; activations are quantized on the fly per
  tensor. No calibration data. The tied embedding reads the LM head's int8 table (stored
  once, one scale per token: `export.tied`).
* `int8-static` (QDQ): weights int8 per channel, activations uint8 with ranges calibrated
  on held-out text (a `CalibrationDataReader` that runs prefill windows and, for the
  decode graph, multi-token decode chunks after a cached prefix).

Known accuracy traps (see USER_EXPECTATIONS): per-tensor weight quantization of an LM can
collapse accuracy, so weights are per channel; the MoE router (tiny, and its top-k
decision flips on small errors) always stays in float; activation x activation MatMuls
(attention scores) are never quantized (`MatMulConstBOnly`). `keep_lm_head_float=True`
keeps the LM head in float too (costs size: it is the largest matrix of a small model).
x86 CPUs without VNNI (AVX2) multiply uint8 activations by int8 weights with an instruction
whose 16-bit pair sums saturate, so full-range int8 weights lose accuracy there: by default
the weights use a 7-bit range (`reduce_range`, ONNX Runtime's advice for such CPUs), so one
export is accurate on any x86 CPU (measurements: docs/notes/export.md). `reduce_range=False`
keeps the full range, for CPUs with VNNI.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                      quantize_dynamic, quantize_static)

from ..atomic import atomic_dir
from .onnx_export import check_out_dir, copy_side_files
from .runtime import OrtCausalLM, read_export_info
from .storage import directory_size_mb, fold_weight_transposes, load_graph, save_graphs, size_report
from .tied import gather_quantized_rows, gather_rows_from_transposed

__all__ = ["QUANT_MODES", "quantize_export", "CausalLMCalibrationReader", "float_nodes", "calibration_windows"]

log = logging.getLogger(__name__)

QUANT_MODES = ("int8", "int8-static")


def float_nodes(model: onnx.ModelProto, keep_lm_head_float: bool = False) -> list[str]:
    """Names of the nodes that must stay in float: those reading a router weight (and the
    LM head's, when asked)."""
    keys = (".router.",) + (("lm_head.",) if keep_lm_head_float else ())
    inits = {t.name for t in model.graph.initializer}
    return [n.name for n in model.graph.node
            if any(i in inits and any(k in i for k in keys) for i in n.input)]


@contextlib.contextmanager
def _no_preprocess_hint() -> Iterator[None]:
    """ONNX Runtime's quantizer suggests its pre-processing (symbolic shape inference + graph
    optimisation) on every call, through the root logger; the graphs here are quantized as
    exported, with the weight layout this module set up, so the hint is dropped."""
    def keep(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Please consider to run pre-processing before quantization")

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def calibration_windows(tokens: np.ndarray, num_windows: int, seq_len: int) -> list[np.ndarray]:
    """The last `num_windows` non-overlapping windows (1, seq_len) of a held-out token array
    (taken from the end, so evaluation windows from the start of the split stay unseen)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    if seq_len < 2 or num_windows < 1:
        raise ValueError(f"calibration needs seq_len >= 2 and num_windows >= 1, got {seq_len} and {num_windows}")
    n = min(num_windows, len(tokens) // seq_len)
    return [tokens[len(tokens) - (i + 1) * seq_len: len(tokens) - i * seq_len][None] for i in range(n)]


class CausalLMCalibrationReader(CalibrationDataReader):
    """Feeds held-out token windows to one graph of an fp32 export.

    windows: arrays (B, S) int64 of held-out tokens. For the prefill graph each window
    is fed whole; for the decode graph the fp32 prefill runs on the first S - `chunk`
    tokens and the last `chunk` tokens are fed as one decode step with that cache.
    """

    def __init__(self, fp32: OrtCausalLM, graph: str, windows: Sequence[np.ndarray], chunk: int = 8) -> None:
        self.fp32, self.graph, self.windows, self.chunk = fp32, graph, list(windows), chunk
        self._it: Iterator[dict] | None = None

    def _feeds(self) -> Iterator[dict]:
        for w in self.windows:
            w = np.asarray(w, dtype=np.int64)
            if self.graph == "prefill":
                yield {"input_ids": w, "attention_mask": np.ones_like(w)}
                continue
            c = min(self.chunk, w.shape[1] - 1)
            head, tail = w[:, :-c], w[:, -c:]
            _, past = self.fp32.forward(head, np.ones_like(head))
            feed = {"input_ids": tail, "attention_mask": np.ones_like(w)}
            feed.update(zip(self.fp32._past_names, past))
            yield feed

    def get_next(self) -> dict | None:
        if self._it is None:
            self._it = self._feeds()
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = None


def quantize_export(src_dir: str | Path, out_dir: str | Path, mode: str = "int8",
                    calibration: Sequence[np.ndarray] | None = None, keep_lm_head_float: bool = False,
                    calibrate_method: str = "minmax", reduce_range: bool = True, overwrite: bool = False,
                    reference_model=None) -> dict:
    """Quantize the fp32 export in `src_dir` into `out_dir` (same layout).

    calibration: held-out token windows (B, S) int64 with S >= 2, required for `int8-static`.
    reduce_range: weights in a 7-bit range (see the module docstring); False = full int8 range.
    reference_model: the eager PyTorch model the export came from; when given, the INT8
    export's parity against it (prefill and decode graphs, `check_parity`) is reported as
    `parity_vs_eager`, next to the fp32 export's own (`fp32_parity_vs_eager`).
    Returns the export info written to out_dir/export.json (with the parity vs fp32: max
    |logit difference| and next-token agreement on random prompts, prefill and decode).
    """
    if mode not in QUANT_MODES:
        raise ValueError(f"unknown quantization mode {mode!r}; use one of {QUANT_MODES}")
    check_out_dir(out_dir, src_dir, "fp32 export")
    info = read_export_info(src_dir)
    if info.get("precision") != "fp32":
        raise ValueError(f"{src_dir} holds a {info.get('precision')} export; quantize the fp32 export instead")
    windows: list[np.ndarray] = []
    if mode == "int8-static":
        windows = [np.asarray(w, dtype=np.int64) for w in (calibration or [])]
        windows = [w if w.ndim == 2 else w[None] for w in windows if w.size]
        if not windows:
            raise ValueError("int8-static needs calibration data, but none was given (or every window was empty); "
                             "pass held-out text with --calibration-data FILE, or use --quantize int8 (dynamic)")
        if any(w.shape[1] < 2 for w in windows):
            raise ValueError("calibration windows need at least 2 tokens each; use longer held-out text")
    method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
              "entropy": CalibrationMethod.Entropy}.get(calibrate_method)
    if method is None:
        raise ValueError(f"calibrate_method must be minmax, percentile or entropy, got {calibrate_method!r}")
    fp32 = OrtCausalLM(src_dir, threads=0)
    with _no_preprocess_hint(), atomic_dir(out_dir, overwrite) as tmp, tempfile.TemporaryDirectory() as work:
        graphs = {}
        for name, fname in info["graphs"].items():
            model = load_graph(Path(src_dir) / fname)
            # the fp32 export stores the tied LM head as Transpose(embedding table); the quantizer
            # only quantizes a MatMul whose weight is an initializer. The embedding Gather reads
            # the same transposed table (one copy) and is rewritten to its int8 form afterwards
            tied = gather_rows_from_transposed(model)
            fold_weight_transposes(model)
            exclude = float_nodes(model, keep_lm_head_float) + tied
            q_path = Path(work) / f"{name}.onnx"
            if mode == "int8":
                quantize_dynamic(model, q_path, op_types_to_quantize=["MatMul", "Gather"], per_channel=True,
                                 weight_type=QuantType.QInt8, nodes_to_exclude=exclude, reduce_range=reduce_range,
                                 extra_options={"MatMulConstBOnly": True})
            else:
                reader = CausalLMCalibrationReader(fp32, name, windows)
                quantize_static(model, q_path, reader, quant_format=QuantFormat.QDQ,
                                op_types_to_quantize=["MatMul", "Gather"], per_channel=True,
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                nodes_to_exclude=exclude, calibrate_method=method, reduce_range=reduce_range,
                                extra_options={"MatMulConstBOnly": True, "WeightSymmetric": True})
            graphs[name] = onnx.load(str(q_path), load_external_data=True)
            shared = gather_quantized_rows(graphs[name], tied)
            embedding = ("the LM head's int8 table (stored once, one scale per token)" if shared else
                         "the LM head's float table (stored once)" if tied else "its own table")
            log.info("quantized %s graph (%s, %d nodes kept in float); embedding: %s", name, mode,
                     len(exclude) - len(tied), embedding)
        save_graphs(graphs, tmp)
        copy_side_files(src_dir, tmp)
        weights = "int8 per output channel (symmetric" + (", 7-bit range: reduce_range)" if reduce_range else ")")
        q_info = {**info, "precision": mode, "quantization": {
            "weights": weights, "activations":
                "dynamic uint8 per tensor" if mode == "int8" else f"static uint8 QDQ ({calibrate_method})",
            "float_nodes": "router" + (" + lm_head" if keep_lm_head_float else ""),
            "embedding": embedding,
            "calibration_windows": len(windows)}}
        if "parity_vs_eager" in q_info:  # the fp32 export's check, kept for the record
            q_info["fp32_parity_vs_eager"] = q_info.pop("parity_vs_eager")
        q_info["sizes"] = size_report(tmp, info.get("sizes", {}).get("safetensors_mb"), directory_size_mb(src_dir))
        (tmp / "export.json").write_text(json.dumps(q_info, indent=2))
        q_info["parity_vs_fp32"] = _parity(fp32, OrtCausalLM(tmp, threads=0), info["vocab_size"])
        if reference_model is not None:
            from .onnx_export import check_parity

            q_info["parity_vs_eager"] = check_parity(reference_model, tmp)
        (tmp / "export.json").write_text(json.dumps(q_info, indent=2))
        log.info("quantized export in %s; parity vs fp32: %s", out_dir, q_info["parity_vs_fp32"])
    return q_info


def _parity(ref: OrtCausalLM, other: OrtCausalLM, vocab: int, batch: int = 2, length: int = 16,
            decode_steps: int = 4, seed: int = 0) -> dict[str, float]:
    """Max |logit difference| and next-token (argmax) agreement on random prompts: the prefill
    graph, then `decode_steps` single-token steps of the decode graph, each export reading its
    own KV cache. The first two keys cover both graphs; the others give each graph's share."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, vocab, size=(batch, length))
    mask = np.ones_like(ids)
    a, past_a = ref.forward(ids, mask)
    b, past_b = other.forward(ids, mask)
    res = {"prefill_max_abs_logit_diff": float(np.abs(a - b).max()),
           "prefill_argmax_agreement": float((a.argmax(-1) == b.argmax(-1)).mean())}
    diffs, agree = [], []
    for _ in range(decode_steps):
        nxt = rng.integers(2, vocab, size=(batch, 1))
        mask = np.concatenate([mask, np.ones((batch, 1), dtype=mask.dtype)], axis=1)
        a, past_a = ref.forward(nxt, mask, past_a)
        b, past_b = other.forward(nxt, mask, past_b)
        diffs.append(float(np.abs(a - b).max()))
        agree.append(float((a.argmax(-1) == b.argmax(-1)).mean()))
    res["decode_max_abs_logit_diff"] = max(diffs, default=0.0)
    res["decode_argmax_agreement"] = float(np.mean(agree)) if agree else 1.0
    n_pre, n_dec = batch * length, batch * decode_steps
    return {"max_abs_logit_diff": max(res["prefill_max_abs_logit_diff"], res["decode_max_abs_logit_diff"]),
            "argmax_agreement": (res["prefill_argmax_agreement"] * n_pre + res["decode_argmax_agreement"] * n_dec)
            / (n_pre + n_dec), **res}
