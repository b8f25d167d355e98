"""The `autoglm` command end to end on a tiny model, and its errors on bad input."""

import json

import pytest
from typer.testing import CliRunner

from autoglm.cli import app

runner = CliRunner()

TEXT = "\n".join(
    f"Return the {w} of the {o}. The {o} is {a} and the {w} is computed lazily when it is first needed."
    for w in ("value", "length", "name", "size", "hash", "path", "mode")
    for o in ("object", "file", "socket", "buffer", "stream", "module")
    for a in ("closed", "open", "empty", "valid")
)


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output + (result.stderr if result.stderr_bytes is not None else "")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    data = root / "corpus.txt"
    data.write_text(TEXT)
    out = root / "run"
    code, output = run("train", "--preset", "tiny", "--data", data, "--out", out, "--steps", "12",
                       "--batch-size", "4", "--seq-len", "32", "--eval-every", "6", "--save-every", "6",
                       "--vocab-size", "300", "--cache-dir", root / "cache")
    assert code == 0, output
    return root, data, out, output


def test_info_prints_counts():
    code, out = run("info", "small")
    assert code == 0, out
    assert "total params" in out and "active params" in out and "window 128" in out


def test_info_unknown_preset():
    code, out = run("info", "huge")
    assert code == 2 and "unknown preset 'huge'" in out and "small" in out


def test_train_writes_a_loadable_run(trained):
    root, data, out, output = trained
    assert "validation loss" in output and "sample:" in output
    for f in ("config.json", "model.safetensors", "tokenizer.json", "run.json", "metrics.jsonl"):
        assert (out / f).is_file(), f
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in r for r in rows)
    assert (out / "checkpoints" / "latest").is_file()

    import autoglm  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == "OpenAutoGLMForCausalLM" and len(tok) == model.config.vocab_size


def test_eval_and_generate(trained):
    root, data, out, _ = trained
    code, output = run("eval", out, "--data", data, "--seq-len", "32", "--batch-size", "4",
                       "--cache-dir", root / "cache")
    assert code == 0, output
    res = json.loads(output[output.index("{"):output.rindex("}") + 1])
    assert 0 <= res["accuracy"] <= 1 and res["loss"] > 0 and res["perplexity"] > 1
    code, output = run("generate", out, "--prompt", "Return the", "--max-new-tokens", "8", "--greedy")
    assert code == 0, output
    assert "Return the" in output and "8 tokens in" in output


def test_resume_continues_from_latest(trained):
    root, data, out, _ = trained
    code, output = run("train", "--preset", "tiny", "--data", data, "--out", out, "--steps", "14",
                       "--batch-size", "4", "--seq-len", "32", "--eval-every", "6", "--save-every", "6",
                       "--vocab-size", "300", "--cache-dir", root / "cache", "--resume", "--sample-prompt", "")
    assert code == 0, output
    assert "14 steps" in output


def test_bad_inputs_give_clear_errors(tmp_path, trained):
    root, data, out, _ = trained
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    code, output = run("train", "--preset", "tiny", "--data", empty, "--out", tmp_path / "r1")
    assert code == 2 and "empty" in output.lower()

    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 au lait".encode("latin-1"))
    code, output = run("train", "--preset", "tiny", "--data", latin, "--out", tmp_path / "r2")
    assert code == 2 and "utf-8" in output.lower()

    code, output = run("train", "--preset", "tiny", "--data", data, "--out", tmp_path / "r3", "--resume")
    assert code == 2 and "--resume" in output and "does not exist" in output

    code, output = run("generate", tmp_path / "nowhere")
    assert code == 2 and "not a saved model directory" in output

    code, output = run("generate", out, "--prompt", "the " * 300, "--max-new-tokens", "10")
    assert code == 2 and "exceeds the model's context" in output and "shorten the prompt" in output

    code, output = run("train", "--preset", "tiny", "--data", data, "--out", tmp_path / "r4", "--seq-len", "4096")
    assert code == 2 and "max_position_embeddings" in output


def test_train_with_early_exit_from_a_config_file(trained, tmp_path):
    """`autoglm train --config FILE` with command-line overrides, continuing from a run
    (--init-from) with exits trained after layer 1; run.json records the exit layers that
    `autoglm serve` then tries."""
    root, data, out, _ = trained
    cfg = tmp_path / "ee.yaml"
    cfg.write_text(f"model: {{preset: tiny}}\ndata: {{path: {data}, cache_dir: {root / 'cache'}}}\n"
                   f"train: {{batch_size: 4, seq_len: 32, max_steps: 50, eval_every: 0, save_every: 0}}\n"
                   f"early_exit: {{enabled: true, layers: [1], weight: 2.0}}\nsample_prompt: ''\n")
    code, output = run("train", "--config", cfg, "--steps", "3", "--init-from", out, "--out", tmp_path / "ee",
                       "--print-config")
    assert code == 0 and "max_steps: 3" in output and "layers:\n  - 1" in output, output
    code, output = run("train", "--config", cfg, "--steps", "3", "--init-from", out, "--out", tmp_path / "ee")
    assert code == 0, output
    info = json.loads((tmp_path / "ee" / "run.json").read_text())
    assert info["early_exit"] == {"layers": [1], "weight": 2.0, "target": "labels"}
    assert info["config"]["train"]["max_steps"] == 3 and info["config"]["init_from"] == str(out)
    rows = [json.loads(line) for line in (tmp_path / "ee" / "metrics.jsonl").read_text().splitlines()]
    assert any("exit_loss" in r for r in rows)
    code, output = run("train", "--config", cfg, "--exit-layers", "2", "--out", tmp_path / "bad")
    assert code == 2 and "must be < the model's 2 layers" in output
