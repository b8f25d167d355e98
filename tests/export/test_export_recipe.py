"""The export recipe's config: the shipped YAML, --config / --print-config and overrides on the
command line, errors that name the field, and the calibration text it picks by default."""

import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from autoglm.cli import app
from autoglm.recipes.export import ExportConfig, calibration_data, quantize_fp32
from autoglm.settings import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


def _out(res) -> str:
    return " ".join(res.output.split())


def test_shipped_int8_config_loads():
    cfg = load_config(ExportConfig, ROOT / "configs" / "export-int8.yaml", {"model_dir": "m", "out": "o"})
    assert cfg.quantize == "int8" and cfg.prefill_attention == "windowed" and cfg.chunk == 32
    assert (cfg.parity.atol, cfg.parity.rtol) == (1e-4, 1e-4)
    assert cfg.calibration.windows == 32 and cfg.calibration.data is None


def test_print_config_merges_defaults_file_and_options(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("quantize: int8-static\ncalibration:\n  windows: 8\n  seq_len: 64\nparity:\n  rtol: 1.0e-4\n")
    res = runner.invoke(app, ["export", "onnx", "runs/a", "--out", "runs/b", "--config", str(f),
                              "--calibration-windows", "3", "--atol", "0.001", "--print-config"])
    assert res.exit_code == 0, res.output
    cfg = yaml.safe_load(res.output)
    assert cfg["model_dir"] == "runs/a" and cfg["out"] == "runs/b" and cfg["quantize"] == "int8-static"
    assert cfg["calibration"] == {"data": None, "windows": 3, "seq_len": 64, "method": "minmax"}  # option > file
    assert cfg["parity"] == {"atol": 0.001, "rtol": 1e-4}
    assert cfg["opset"] == 18 and cfg["overwrite"] is False  # defaults


@pytest.mark.parametrize("text,expected", [
    ("quantise: int8\n", "quantise: unknown field"),
    ("calibration:\n  windows: 0\n", "calibration: calibration needs windows >= 1"),
    ("quantize: int4\n", "quantize: must be one of 'int8', 'int8-static'"),
    ("parity:\n  atol: lots\n", "parity.atol: expected float"),
])
def test_config_errors_name_the_field(tmp_path, text, expected):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=expected):
        load_config(ExportConfig, f, {"model_dir": "m", "out": "o"})
    res = runner.invoke(app, ["export", "onnx", "m", "--out", str(tmp_path / "o"), "--config", str(f)])
    assert res.exit_code == 2 and expected.split(":")[0] in _out(res) and not (tmp_path / "o").exists()


@pytest.mark.parametrize("args,expected", [
    (["--calibration-data", "held-out.txt"], "read only by --quantize int8-static"),
    (["--keep-lm-head-float"], "applies only when quantizing"),
    (["--no-reduce-range"], "applies only when quantizing"),
])
def test_quantization_options_without_quantize_are_refused(tmp_path, export_model_dir, args, expected):
    """An option only a quantized export reads is refused when nothing is quantized (it was
    silently ignored: the user got an fp32 export); no model is loaded, nothing is written."""
    res = runner.invoke(app, ["export", "onnx", str(export_model_dir), "--out", str(tmp_path / "o"), *args])
    assert res.exit_code == 2 and expected in _out(res), res.output
    assert not (tmp_path / "o").exists()
    assert load_config(ExportConfig, overrides={"model_dir": "m", "out": "o", "quantize": "int8-static",
                                                "calibration.data": "held-out.txt",
                                                "keep_lm_head_float": "true"}).keep_lm_head_float


def test_quantize_fp32_needs_a_mode(tmp_path):
    cfg = load_config(ExportConfig, overrides={"model_dir": "m", "out": tmp_path / "o"})
    with pytest.raises(ValueError, match="nothing to quantize"):
        quantize_fp32(cfg, tmp_path / "fp32")


def test_calibration_defaults_to_the_corpus_the_model_trained_on(tmp_path, export_model_dir):
    """run.json records the training corpus; int8-static calibrates on its held-out tail."""
    model = tmp_path / "m"
    shutil.copytree(export_model_dir, model)
    text = "The quick brown fox jumps over the lazy dog near the river bank. " * 200
    (tmp_path / "novel.txt").write_text(text)
    (model / "run.json").write_text(json.dumps({"data": str(tmp_path / "novel.txt")}))
    cfg = load_config(ExportConfig, overrides={"model_dir": model, "out": tmp_path / "o", "quantize": "int8-static",
                                               "calibration.windows": 2, "calibration.seq_len": 16,
                                               "cache_dir": tmp_path / "cache"})
    windows = calibration_data(cfg)
    assert len(windows) == 2 and all(w.shape == (1, 16) for w in windows)
    from autoglm.tokenizer import load_tokenizer

    decoded = load_tokenizer(model).decode(windows[0][0].tolist())
    assert decoded.strip() and decoded.strip() in text  # from the novel, not the built-in corpus


def test_calibration_reads_the_text_of_a_finetuned_models_jsonl(tmp_path, export_model_dir):
    """A model fine-tuned on {prompt, completion} records records that .jsonl as its data; the
    calibration windows hold the records' text, not their JSON syntax."""
    model = tmp_path / "m"
    shutil.copytree(export_model_dir, model)
    records = [{"prompt": f"Question {i}: what is {i} plus {i}?", "completion": f" The answer is {2 * i}."}
               for i in range(80)]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (model / "run.json").write_text(json.dumps({"recipe": "finetune-full", "data": str(tmp_path / "sft.jsonl")}))
    cfg = load_config(ExportConfig, overrides={"model_dir": model, "out": tmp_path / "o", "quantize": "int8-static",
                                               "calibration.windows": 2, "calibration.seq_len": 24,
                                               "cache_dir": tmp_path / "cache"})
    windows = calibration_data(cfg)
    assert len(windows) == 2
    from autoglm.tokenizer import load_tokenizer

    decoded = " ".join(load_tokenizer(model).decode(w[0].tolist()) for w in windows)
    assert "answer is" in decoded and "Question" in decoded
    assert not any(s in decoded for s in ('"prompt"', '"completion"', "{", "}"))


def test_int8_cli_reports_size_ratios(int8_export, fp32_export):
    """The INT8 export records how many times smaller it is than the FP32 safetensors checkpoint
    and than the FP32 ONNX export (the two honest denominators)."""
    sizes = json.loads((int8_export / "export.json").read_text())["sizes"]
    fp32 = json.loads((fp32_export / "export.json").read_text())["sizes"]
    assert sizes["fp32_onnx_mb"] == pytest.approx(fp32["onnx_mb"], rel=1e-6)
    assert sizes["safetensors_mb"] == pytest.approx(fp32["safetensors_mb"])
    assert sizes["fp32_onnx_over_onnx"] == pytest.approx(fp32["onnx_mb"] / sizes["onnx_mb"])
    assert sizes["safetensors_over_onnx"] == pytest.approx(fp32["safetensors_mb"] / sizes["onnx_mb"])
    assert sizes["safetensors_over_onnx"] > 2.5
