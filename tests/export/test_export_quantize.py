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
    _, table, readers = _tied_table(out / "decode.onnx")  # the embedding gathers int8 columns of the LM head
    assert table.data_type == onnx.TensorProto.INT8 and readers == ["DequantizeLinear", "Gather"]
    batches = _heldout_batches(ids)
    f = evaluate_ort(fp32, batches)["loss"]
    s = evaluate_ort(OrtCausalLM(out, threads=1), batches)["loss"]
    assert abs(s - f) / f < 0.05
    assert info["parity_vs_fp32"]["argmax_agreement"] > 0.8


def _tied_table(path):
    """The initializer the embedding Gather reads, and the op types reading it."""
    m = onnx.load(str(path))
    inits = {t.name: t for t in m.graph.initializer}
    (gather,) = [n for n in m.graph.node if n.op_type == "Gather" and n.input[0] in inits
                 and len(inits[n.input[0]].dims) == 2]
    table = inits[gather.input[0]]
    return m, table, sorted(n.op_type for n in m.graph.node if table.name in n.input)


def test_tied_embedding_is_one_int8_table(int8_export, eager_model):
    """The embedding Gather reads the LM head's int8 table (stored once, one scale per token), and
    its rows dequantize to the eager embedding within half a quantization step."""
    W = eager_model.get_input_embeddings().weight.detach().numpy()  # (V, d)
    for graph in ("prefill", "decode"):
        m, table, readers = _tied_table(int8_export / f"{graph}.onnx")
        assert table.data_type == onnx.TensorProto.INT8 and list(table.dims) == [W.shape[1], W.shape[0]]
        assert readers == ["Gather", "MatMulInteger"]
        # no other copy of the table, float or int8 (the expert matrices have other shapes or values)
        assert not [t.name for t in m.graph.initializer if "lm_head" in t.name and t.name != table.name
                    and len(t.dims) == 2]
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    q, s = inits[table.name], inits[table.name.replace("_quantized", "_scale")]  # (d, V) int8, (V,)
    # absmax / 64 (or 63.5, by ORT version): 7-bit weights (reduce_range)
    assert np.allclose(s, np.abs(W).max(1) / 64, rtol=0.01)
    assert (np.abs(q.T * s[:, None] - W) <= 0.5 * s[:, None] + 1e-7).all()


def test_keep_lm_head_float(tmp_path, fp32_export, eager_model, caplog):
    from autoglm.export.storage import fold_weight_transposes, load_graph
    from autoglm.export.tied import gather_rows_from_transposed

    m = load_graph(fp32_export / "decode.onnx")  # what the quantizer sees
    tied = gather_rows_from_transposed(m)
    fold_weight_transposes(m)
    extra = set(float_nodes(m, keep_lm_head_float=True)) - set(float_nodes(m))
    assert {n.op_type for n in m.graph.node if n.name in extra} == {"MatMul", "Gather"}  # LM head + embedding
    assert [n.name for n in m.graph.node if n.op_type == "Gather" and n.name in extra] == tied
    out = tmp_path / "lm_head_float"
    import logging

    with caplog.at_level(logging.INFO):
        info = quantize_export(fp32_export, out, "int8", keep_lm_head_float=True)
    # ONNX Runtime's "consider pre-processing" hint (on the root logger, once per graph) is dropped;
    # this module's own lines still show, and the filter is gone afterwards
    assert not [r for r in caplog.records if "pre-processing" in r.getMessage()]
    assert any(r.name == "autoglm.export.quantize" and "quantized decode graph" in r.getMessage()
               for r in caplog.records)
    assert not logging.getLogger().filters
    _, table, readers = _tied_table(out / "decode.onnx")
    assert table.data_type == onnx.TensorProto.FLOAT and readers == ["Gather", "MatMul"]  # one float table
    assert info["parity_vs_fp32"]["argmax_agreement"] > 0.9


def _int8_absmax(export_dir, graph="decode"):
    """The largest |q| over the graph's int8 initializers."""
    m = onnx.load(str(export_dir / f"{graph}.onnx"), load_external_data=False)
    return max(int(np.abs(onnx.numpy_helper.to_array(t, base_dir=str(export_dir)).astype(np.int16)).max())
               for t in m.graph.initializer if t.data_type == onnx.TensorProto.INT8)


def test_reduce_range_off_keeps_the_full_int8_range(tmp_path, fp32_export, int8_export):
    """The default export's int8 weights fit 7 bits (|q| <= 64, ONNX Runtime's reduce_range: x86
    CPUs without VNNI saturate full-range int8 x uint8 pair sums); reduce_range=False uses the
    full range (each channel's absmax maps to 127), and export.json says which."""
    assert _int8_absmax(int8_export) <= 64
    info = quantize_export(fp32_export, tmp_path / "full", "int8", reduce_range=False)
    assert _int8_absmax(tmp_path / "full") == 127
    assert "reduce_range" in json.loads((int8_export / "export.json").read_text())["quantization"]["weights"]
    assert "reduce_range" not in info["quantization"]["weights"]


def test_empty_calibration_is_refused_and_writes_nothing(tmp_path, fp32_export):
    out = tmp_path / "q"
    for bad in (None, [], [np.zeros((1, 0), dtype=np.int64)]):
        with pytest.raises(ValueError, match="calibration"):
            quantize_export(fp32_export, out, "int8-static", calibration=bad)
    assert not out.exists() and not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="quantization mode"):
        quantize_export(fp32_export, out, "int4")
    files = sorted(p.name for p in fp32_export.iterdir())
    for into in (fp32_export, fp32_export.parent):  # OUT is replaced whole: never the source or its folder
        with pytest.raises(ValueError, match="fp32 export .* or a folder holding it"):
            quantize_export(fp32_export, into, "int8", overwrite=True)
    assert sorted(p.name for p in fp32_export.iterdir()) == files


def test_quantizing_a_quantized_export_is_refused(tmp_path, int8_export):
    with pytest.raises(ValueError, match="fp32 export"):
        quantize_export(int8_export, tmp_path / "again", "int8")


def test_int8_parity_reported_against_eager_pytorch_before_and_after(int8_export, eager_model):
    """export.json of an INT8 export holds the fp32 export's parity against eager PyTorch and the
    INT8 export's own, for the prefill and the decode graph, and the parity against the fp32
    export covers the decode graph too."""
    info = json.loads((int8_export / "export.json").read_text())
    before, after, vs_fp32 = info["fp32_parity_vs_eager"], info["parity_vs_eager"], info["parity_vs_fp32"]
    assert max(before["prefill_max_abs_diff"], before["decode_max_abs_diff"]) <= 1e-4
    for graph in ("prefill", "decode"):
        assert before[f"{graph}_max_abs_diff"] < after[f"{graph}_max_abs_diff"] < 0.1 * after[f"{graph}_logit_scale"]
        assert after[f"{graph}_argmax_agreement"] >= 0.9
        assert vs_fp32[f"{graph}_max_abs_logit_diff"] > 0 and vs_fp32[f"{graph}_argmax_agreement"] >= 0.9
    assert vs_fp32["max_abs_logit_diff"] == max(vs_fp32["prefill_max_abs_logit_diff"],
                                                vs_fp32["decode_max_abs_logit_diff"])
    # the reported prefill figure, recomputed here: batch 3 x 11 tokens drawn with seed 0
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, eager_model.config.vocab_size, (3, 11), generator=g)
    logits, _ = OrtCausalLM(int8_export, threads=1).forward(ids.numpy(), np.ones((3, 11), dtype=np.int64))
    with torch.no_grad():
        ref = eager_model(ids).logits.numpy()
    assert after["prefill_max_abs_diff"] == pytest.approx(float(np.abs(logits - ref).max()), rel=1e-5)
    assert after["prefill_argmax_agreement"] == pytest.approx(float((logits.argmax(-1) == ref.argmax(-1)).mean()))
