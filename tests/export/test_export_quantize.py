"""INT8: dynamic (weights per channel) and static QDQ (calibrated) through onnxruntime.quantization."""

import json

import numpy as np
import onnx
import pytest
import torch

from autoglm.export import OrtCausalLM, quantize_export
from autoglm.export.quantize import CausalLMCalibrationReader, calibration_windows, float_nodes
from autoglm.export.runtime import evaluate_ort
from autoglm.training import evaluate


def _ops(path):
    m = onnx.load(str(path), load_external_data=False)
    return m, [n.op_type for n in m.graph.node]


def _heldout_batches(ids, n=4, T=64):
    val = ids[int(0.9 * len(ids)):]
    x = np.stack([val[i * T:(i + 1) * T + 1] for i in range(n)])
    return [(torch.from_numpy(x[:, :-1]), torch.from_numpy(x[:, 1:]))]


def test_dynamic_int8_weights_per_channel_router_float(int8_export, fp32_export, eager_model):
    cfg = eager_model.config
    for graph in ("prefill", "decode"):
        m, ops = _ops(int8_export / f"{graph}.onnx")
        assert "DynamicQuantizeLinear" in ops or "DynamicQuantizeMatMul" in ops
        # the router MatMul still reads its float weight
        router = [n for n in m.graph.node if any(".router." in i for i in n.input)]
        assert router and all(n.op_type == "MatMul" for n in router)
        # per-channel: the int8 weights of the experts (the dense dispatch's two wide matrices:
        # every expert's gate|up, and every expert's down) have one scale per output column
        scales = [list(t.dims) for t in m.graph.initializer
                  if ".layers.0.mlp." in t.name and ".router." not in t.name and t.name.endswith("_scale")]
        E, h, d = cfg.num_experts, cfg.expert_intermediate_size, cfg.hidden_size
        assert sorted(scales) == sorted([[2 * E * h], [d]])
    info = json.loads((int8_export / "export.json").read_text())
    assert info["precision"] == "int8"
    ratio = (fp32_export / "weights.bin").stat().st_size / (int8_export / "weights.bin").stat().st_size
    assert ratio > 3.0  # tiny model: the float router, norms and scales keep it under 4x


def test_int8_held_out_loss_close_to_fp32(int8_export, fp32_export, eager_model, export_corpus_tokens):
    _, ids = export_corpus_tokens
    batches = _heldout_batches(ids)
    ref = evaluate(eager_model, batches)["loss"]  # independent: the training evaluator on eager PyTorch
    fp32 = evaluate_ort(OrtCausalLM(fp32_export, threads=1), batches)["loss"]
    int8 = evaluate_ort(OrtCausalLM(int8_export, threads=1), batches)["loss"]
    assert abs(fp32 - ref) < 1e-4
    assert abs(int8 - fp32) / fp32 < 0.02


def test_static_qdq_with_calibration(tmp_path, fp32_export, export_corpus_tokens):
    _, ids = export_corpus_tokens
    val = ids[int(0.9 * len(ids)):]
    windows = calibration_windows(val, 4, 48)
    assert len(windows) == 4 and all(w.shape == (1, 48) for w in windows)
    assert np.array_equal(windows[0][0], val[-48:])  # taken from the end of the held-out split
    fp32 = OrtCausalLM(fp32_export, threads=1)
    reader = CausalLMCalibrationReader(fp32, "decode", windows)
    feed = reader.get_next()
    assert feed["input_ids"].shape == (1, 8) and feed["past_key_values.0.key"].shape[2] == 40
    out = tmp_path / "static"
    info = quantize_export(fp32_export, out, "int8-static", calibration=windows)
    m, ops = _ops(out / "decode.onnx")
    assert ops.count("QuantizeLinear") > 10 and ops.count("DequantizeLinear") > 10
    assert info["quantization"]["calibration_windows"] == 4
    batches = _heldout_batches(ids)
    f = evaluate_ort(fp32, batches)["loss"]
    s = evaluate_ort(OrtCausalLM(out, threads=1), batches)["loss"]
    assert abs(s - f) / f < 0.05
    assert info["parity_vs_fp32"]["argmax_agreement"] > 0.8


def test_keep_lm_head_float(fp32_export):
    m = onnx.load(str(fp32_export / "decode.onnx"), load_external_data=False)
    names = float_nodes(m, keep_lm_head_float=True)
    assert len(names) == len(float_nodes(m)) + 1  # router nodes + the LM head MatMul


def test_empty_calibration_is_refused_and_writes_nothing(tmp_path, fp32_export):
    out = tmp_path / "q"
    for bad in (None, [], [np.zeros((1, 0), dtype=np.int64)]):
        with pytest.raises(ValueError, match="calibration"):
            quantize_export(fp32_export, out, "int8-static", calibration=bad)
    assert not out.exists() and not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="quantization mode"):
        quantize_export(fp32_export, out, "int4")


def test_quantizing_a_quantized_export_is_refused(tmp_path, int8_export):
    with pytest.raises(ValueError, match="fp32 export"):
        quantize_export(int8_export, tmp_path / "again", "int8")
