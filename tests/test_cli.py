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


def test_resume_reads_the_runs_own_settings_and_refuses_other_data(trained, tmp_path):
    """`--resume` with only --out and a longer --steps continues with OUT/config.yaml (the preset,
    corpus, vocabulary and schedule the run started with), and a resume on another corpus is
    refused: the token ids and data position would not be the run's."""
    import shutil

    root, data, out, _ = trained
    run_dir = tmp_path / "copy"
    shutil.copytree(out, run_dir)
    saved = (run_dir / "config.yaml").read_text()
    steps = int(next(ln.split(":")[1] for ln in saved.splitlines() if ln.strip().startswith("max_steps:")))
    code, output = run("train", "--out", run_dir, "--resume", "--steps", steps + 2)
    assert code == 0, output
    assert "resuming with the settings in" in output and f"{steps + 2} steps" in output
    assert "different train config" not in output  # the derived warmup is the run's, not recomputed
    other = tmp_path / "other.txt"
    other.write_text(TEXT.upper())
    code, output = run("train", "--out", run_dir, "--resume", "--steps", steps + 4, "--data", other)
    assert code == 2 and "data.path" in output and str(other) in output and "--init-from" in output
    now = (run_dir / "config.yaml").read_text().replace(f"max_steps: {steps + 2}", f"max_steps: {steps}")
    assert now.replace(f"out: {run_dir}", f"out: {out}") == saved  # only the length changed


def test_a_saved_run_is_not_overwritten_unless_asked(trained, tmp_path):
    root, data, out, _ = trained
    dest = tmp_path / "saved"
    args = ("train", "--preset", "tiny", "--data", data, "--steps", "2", "--batch-size", "4", "--seq-len", "32",
            "--vocab-size", "300", "--cache-dir", root / "cache", "--save-every", "0", "--eval-every", "0",
            "--sample-prompt", "", "--out", dest)
    assert run(*args)[0] == 0
    before = {f.name: f.read_bytes() for f in dest.iterdir() if f.is_file()}
    (dest / "notes.txt").write_text("mine")
    code, output = run(*args)
    assert code == 2 and "already holds a saved model directory" in output and "--overwrite" in output
    assert {f.name: f.read_bytes() for f in dest.iterdir() if f.is_file() and f.name != "notes.txt"} == before
    code, output = run(*args, "--overwrite", "--steps", "3")
    assert code == 0, output
    assert json.loads((dest / "run.json").read_text())["result"]["steps"] == 3
    assert not (dest / "notes.txt").exists()  # the old run's directory was replaced, not mixed into


def test_tokenizer_and_config_are_written_before_the_first_step(trained, tmp_path):
    """A run killed before its final save still resumes with its own tokenizer and settings."""
    from autoglm.recipes.pretrain import PretrainConfig, pretrain
    from autoglm.settings import load_config

    root, data, _, _ = trained
    dest = tmp_path / "early"
    seen = {}

    class Peek:
        def on_step(self, trainer, metrics):
            seen.setdefault("files", sorted(f.name for f in dest.iterdir()))

    cfg = load_config(PretrainConfig, overrides={"model.preset": "tiny", "model.vocab_size": 300, "data.path": data,
                                                 "data.cache_dir": root / "cache", "out": dest, "train.max_steps": 1,
                                                 "train.batch_size": 4, "train.seq_len": 32, "train.eval_every": 0,
                                                 "train.save_every": 0, "sample_prompt": ""})
    pretrain(cfg, progress=False, callbacks=[Peek()])
    assert {"tokenizer.json", "config.yaml"} <= set(seen["files"]) and "model.safetensors" not in seen["files"]


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

    code, output = run("train", "--steps", "-5", "--out", tmp_path / "r5")
    assert code == 2 and "max_steps (--steps)" in output


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
