"""The finetune CLI: end-to-end on tiny models, and bad input refused before training."""

import json

from typer.testing import CliRunner

from autoglm.cli import app

from helpers import make_model_dir, make_tokenizer, write_text

runner = CliRunner()


def test_distill_finetune_merge_adapters_commands(tmp_path):
    make_tokenizer(tmp_path / "tok")
    t1 = make_model_dir(tmp_path / "t1", tmp_path / "tok", seed=1)
    t2 = make_model_dir(tmp_path / "t2", tmp_path / "tok", preset="standard-tiny", seed=2)
    data = write_text(tmp_path / "d.txt")
    common = ["--data", str(data), "--steps", "4", "--batch-size", "2", "--seq-len", "32",
              "--cache-dir", str(tmp_path / "cache")]
    r = runner.invoke(app, ["distill", "--teacher", str(t1), "--teacher", str(t2), "--out", str(tmp_path / "s"),
                            "--combine", "confidence", "--cache-top-k", "16", "--epoch-batches", "2",
                            "--rounds", "2", "--alpha-end", "0.5", *common])
    assert r.exit_code == 0, r.output
    run = json.loads((tmp_path / "s" / "run.json").read_text())
    assert run["logit_cache"]["hits"] == 2 and run["logit_cache"]["misses"] == 2
    r = runner.invoke(app, ["finetune", str(t1), "--lora", "--out", str(tmp_path / "ad"), *common])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "ad" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "ad" / "checkpoints" / "latest").read_text().strip() == "step-000004"
    r = runner.invoke(app, ["finetune", str(t1), "--lora", "--out", str(tmp_path / "ad"), *common])
    assert r.exit_code == 2 and "--resume" in r.output  # an existing run is not silently overwritten
    more = [a if a != "4" else "6" for a in common]
    r = runner.invoke(app, ["finetune", str(t1), "--lora", "--out", str(tmp_path / "ad"), "--resume", *more])
    assert r.exit_code == 0 and "6 steps" in r.output, r.output
    r = runner.invoke(app, ["merge", str(tmp_path / "ad"), "--out", str(tmp_path / "merged")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    labeled = tmp_path / "cls.jsonl"
    labeled.write_text("".join(json.dumps({"text": w, "label": w[0]}) + "\n" for w in ["to be", "sea", "to", "slings"]))
    r = runner.invoke(app, ["adapters", "train", str(t1), "--name", "first", "--data", str(labeled), "--steps", "3"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["adapters", "list", str(t1)])
    assert r.exit_code == 0 and "first" in r.output and "sequence-classification" in r.output


def test_bad_input_is_refused_before_training(tmp_path):
    make_tokenizer(tmp_path / "tok")
    make_tokenizer(tmp_path / "tok2", vocab_size=280, text="completely different words here " * 50)
    t1 = make_model_dir(tmp_path / "t1", tmp_path / "tok")
    t2 = make_model_dir(tmp_path / "t2", tmp_path / "tok2")
    r = runner.invoke(app, ["distill", "--teacher", str(t1), "--teacher", str(t2), "--out", str(tmp_path / "s"),
                            "--steps", "2"])
    assert r.exit_code == 2 and "different tokenizer" in r.output
    assert not (tmp_path / "s").exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n')
    r = runner.invoke(app, ["finetune", str(t1), "--lora", "--data", str(bad), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "completion" in r.output
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "a", "completion": "b"}\n')
    r = runner.invoke(app, ["finetune", str(t1), "--lora", "--target", "q_proj", "--target", "qq_proj",
                            "--data", str(good), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "qq_proj" in r.output and "matches no linear layer" in r.output
    assert not (tmp_path / "o").exists()


def test_merge_names_a_moved_base_model_and_takes_base(tmp_path):
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from autoglm.training.lora import load_lora

    make_tokenizer(tmp_path / "tok")
    base = make_model_dir(tmp_path / "base", tmp_path / "tok")
    r = runner.invoke(app, ["finetune", str(base), "--lora", "--data", str(write_text(tmp_path / "d.txt")),
                            "--out", str(tmp_path / "ad"), "--steps", "2", "--batch-size", "2", "--seq-len", "32",
                            "--cache-dir", str(tmp_path / "cache")])
    assert r.exit_code == 0, r.output
    shutil.move(base, tmp_path / "moved")
    r = runner.invoke(app, ["merge", str(tmp_path / "ad"), "--out", str(tmp_path / "m")])
    out = " ".join(r.output.split())
    assert r.exit_code == 2 and f"{(tmp_path / 'base').resolve()}, is no longer a saved model directory" in out, out
    assert "--base DIR" in out and not (tmp_path / "m").exists()
    r = runner.invoke(app, ["merge", str(tmp_path / "ad"), "--out", str(tmp_path / "m"),
                            "--base", str(tmp_path / "moved")])
    assert r.exit_code == 0, r.output
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    x = torch.randint(0, merged.config.vocab_size, (1, 10))
    with torch.no_grad():
        ref = load_lora(tmp_path / "ad", tmp_path / "moved")(x).logits
        torch.testing.assert_close(merged(x).logits, ref, rtol=1e-5, atol=1e-5)


def test_distill_on_the_builtin_corpus_warns_when_the_teachers_learned_other_text(tmp_path, monkeypatch, caplog):
    import pytest

    import autoglm.data
    from autoglm.recipes.distill import DistillRecipeConfig, distill
    from autoglm.settings import load_config

    make_tokenizer(tmp_path / "tok")
    t1 = make_model_dir(tmp_path / "t1", tmp_path / "tok", seed=1)
    (t1 / "run.json").write_text(json.dumps({"recipe": "pretrain", "data": "/corpora/shakespeare.txt"}))

    class Stop(Exception):
        pass

    def stop(*a, **k):
        raise Stop

    monkeypatch.setattr(autoglm.data, "prepare_corpus", stop)  # the warning comes before the corpus is read
    cfg = load_config(DistillRecipeConfig, overrides={"teachers": str(t1), "out": str(tmp_path / "s")})
    with caplog.at_level("WARNING"), pytest.raises(Stop):
        distill(cfg, progress=False)
    assert "/corpora/shakespeare.txt; pass --data" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"), pytest.raises(Stop):
        distill(load_config(DistillRecipeConfig, overrides={"teachers": str(t1), "out": str(tmp_path / "s2"),
                                                            "data.path": str(write_text(tmp_path / "d.txt"))}),
                progress=False)
    assert "pass --data" not in caplog.text
