"""Bad input: a clear error and no half-written output."""

import pytest
import torch
from typer.testing import CliRunner

from autoglm import OpenAutoGLMConfig, OpenAutoGLMForCausalLM
from autoglm.cli import app
from autoglm.export import ExportError, export_onnx
from autoglm.export.wrapper import ExportDecoder

runner = CliRunner()


def _out(res) -> str:
    return " ".join(res.output.split())  # rich wraps long error lines


def test_directory_without_model(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a saved model directory"):
        export_onnx(tmp_path / "empty", tmp_path / "out")
    res = runner.invoke(app, ["export", "onnx", str(tmp_path / "empty"), "--out", str(tmp_path / "out")])
    assert res.exit_code == 2 and "not a saved model directory" in _out(res)
    assert not (tmp_path / "out").exists()


def test_unsupported_opset_and_mode(tmp_path, export_model_dir):
    with pytest.raises(ValueError, match="opset 11 is not supported"):
        export_onnx(export_model_dir, tmp_path / "out", opset=11)
    res = runner.invoke(app, ["export", "onnx", str(export_model_dir), "--out", str(tmp_path / "o2"),
                              "--opset", "99"])
    assert res.exit_code == 2 and "opset 99 is not supported" in _out(res)
    res = runner.invoke(app, ["export", "onnx", str(export_model_dir), "--out", str(tmp_path / "o3"),
                              "--quantize", "int4"])
    assert res.exit_code == 2 and "quantize (--quantize): must be one of 'int8', 'int8-static'" in _out(res)
    res = runner.invoke(app, ["export", "onnx", str(export_model_dir), "--out", str(tmp_path / "o4"),
                              "--prefill-attention", "banded"])
    assert res.exit_code == 2 and "prefill_attention (--prefill-attention): must be one of" in _out(res)
    res = runner.invoke(app, ["export", "onnx", str(export_model_dir), "--out", str(tmp_path / "o7"),
                              "--rtol", "-1"])
    assert res.exit_code == 2 and "atol (--atol) and rtol must be >= 0" in _out(res)
    res = runner.invoke(app, ["export", "onnx", str(export_model_dir)])
    assert res.exit_code == 2 and "out is required" in _out(res)
    with pytest.raises(ValueError, match="prefill_attention"):
        export_onnx(export_model_dir, tmp_path / "o5", prefill_attention="banded")
    with pytest.raises(ValueError, match="chunk"):
        export_onnx(export_model_dir, tmp_path / "o6", chunk=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(tmp_path, export_model_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    res = runner.invoke(app, ["export", "onnx", str(export_model_dir), "--out", str(out)])
    assert res.exit_code == 2 and "--overwrite" in _out(res)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_empty_calibration_text_cli(tmp_path, export_model_dir):
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    res = runner.invoke(app, ["export", "onnx", str(export_model_dir), "--out", str(tmp_path / "q"),
                              "--quantize", "int8-static", "--calibration-data", str(empty)])
    assert res.exit_code == 2 and "is empty" in _out(res)
    assert not (tmp_path / "q").exists()


def test_drifting_export_is_refused_and_leaves_nothing(tmp_path, monkeypatch):
    """An exporter bug that changes the logits (simulated: the traced forward adds 1e-3) is caught
    by the ORT-vs-eager parity check; the output directory is never created."""
    torch.manual_seed(0)
    model = OpenAutoGLMForCausalLM(OpenAutoGLMConfig.from_name("tiny", num_hidden_layers=1)).eval()
    model.save_pretrained(tmp_path / "m")
    orig = ExportDecoder.forward

    def drifting(self, input_ids, attention_mask, *past):
        logits, *rest = orig(self, input_ids, attention_mask, *past)
        return (logits + 1e-3, *rest)

    monkeypatch.setattr(ExportDecoder, "forward", drifting)
    with pytest.raises(ExportError, match="differ from eager PyTorch"):
        export_onnx(tmp_path / "m", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_lora_adapter_or_onnx_export_as_model_dir_says_what_to_export(tmp_path):
    """A LoRA adapter is merged first (the error gives the merge command); an export directory
    is not exported again. Nothing is written either way."""
    from autoglm.training.lora import apply_lora

    torch.manual_seed(0)
    apply_lora(OpenAutoGLMForCausalLM(OpenAutoGLMConfig.from_name("tiny"))).save_pretrained(tmp_path / "ad")
    res = runner.invoke(app, ["export", "onnx", str(tmp_path / "ad"), "--out", str(tmp_path / "out")])
    assert res.exit_code == 2 and f"autoglm merge {tmp_path / 'ad'} --out" in _out(res), res.output
    (tmp_path / "onnx").mkdir()
    (tmp_path / "onnx" / "config.json").write_text("{}")
    (tmp_path / "onnx" / "export.json").write_text('{"format": "autoglm-onnx"}')
    res = runner.invoke(app, ["export", "onnx", str(tmp_path / "onnx"), "--out", str(tmp_path / "out")])
    assert res.exit_code == 2 and "is an ONNX export already" in _out(res), res.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["same", "parent"])
def test_out_holding_the_model_is_refused_even_with_overwrite(tmp_path, where):
    """The export replaces OUT as a whole: --out MODEL_DIR (or a folder holding it) with
    --overwrite would have deleted the model it exports."""
    torch.manual_seed(0)
    model_dir = tmp_path / "runs" / "a"
    OpenAutoGLMForCausalLM(OpenAutoGLMConfig.from_name("tiny")).save_pretrained(model_dir)
    before = sorted(p.name for p in model_dir.iterdir())
    out = model_dir if where == "same" else tmp_path / "runs"
    res = runner.invoke(app, ["export", "onnx", str(model_dir), "--out", str(out), "--overwrite"])
    assert res.exit_code == 2 and "or a folder holding it" in _out(res), res.output
    assert f"--out {tmp_path / 'runs' / 'a-onnx'}" in _out(res)
    with pytest.raises(ValueError, match="or a folder holding it"):
        export_onnx(model_dir, out, overwrite=True)
    assert sorted(p.name for p in model_dir.iterdir()) == before
