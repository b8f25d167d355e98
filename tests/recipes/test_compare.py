"""The compare recipe (what `make demo` runs): equal budgets, a run per preset, table, plot, sample."""

import json
from types import SimpleNamespace
from unittest import mock

import pytest
import torch

import autoglm.recipes.compare as compare_mod
from autoglm.recipes.compare import CompareConfig, compare, steps_for_budget
from autoglm.settings import ConfigError, load_config
from autoglm.training import TrainConfig


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text(" ".join(f"the {w} returns the {o} of the call." for w in ("value", "name", "size", "path")
                             for o in ("file", "object", "list")) * 40)
    return path


def test_steps_for_budget():
    assert steps_for_budget(60.0, 0.5) == 120
    assert steps_for_budget(1.0, 10.0) == 10  # never fewer than 10


def test_step_times_are_taken_side_by_side():
    """Every model's steps are timed in alternating rounds: a slowdown while the
    first model is timed shows in the second model's rounds too."""
    calls = []

    def build(name):
        def make():
            m = torch.nn.Linear(4, 4)
            m.name, m.config = name, SimpleNamespace()
            return m
        return make

    def fake_step(model, t, tokens, objective, strategy):
        base = {"a": 0.1, "b": 0.2}[model.name]
        return lambda i: calls.append((model.name, i)) or base * (1 + i)  # rounds 1-3 time 2-4 x base

    with mock.patch.object(compare_mod, "training_step", fake_step):
        times = compare_mod.side_by_side_seconds_per_step({"a": build("a"), "b": build("b")},
                                                          TrainConfig(max_steps=1), None, "cpu", rounds=3)
    assert times == pytest.approx({"a": 0.3, "b": 0.6})  # the median round; the warm-up step is not counted
    assert calls == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("b", 2), ("a", 2), ("a", 3), ("b", 3)]


def test_bad_presets_are_refused_before_training():
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        load_config(CompareConfig, overrides={"presets": "tiny,huge"})
    with pytest.raises(ConfigError, match="minutes must be > 0"):
        load_config(CompareConfig, overrides={"minutes": 0})


def test_compare_trains_each_preset_for_the_same_budget(tmp_path, corpus):
    cfg = load_config(CompareConfig, overrides={
        "presets": "tiny,standard-tiny", "minutes": 0.05, "vocab_size": 300, "out": tmp_path / "cmp",
        "data.path": corpus, "data.cache_dir": tmp_path / "cache", "train.batch_size": 4, "train.seq_len": 32,
        "train.eval_batches": 2, "sample_tokens": 8, "latency_lengths": "64,256", "latency_repeats": 1})
    res = compare(cfg, progress=False)
    assert [r["preset"] for r in res["rows"]] == ["tiny", "standard-tiny"]
    for r in res["rows"]:
        assert 1 <= r["steps"] <= r["planned_steps"] and r["planned_steps"] >= 10 and r["val_loss"] > 0
        assert r["stop_reason"] in ("max_steps", "max_seconds")
        assert r["seconds"] < 2 * 60 * cfg.minutes + 30  # twice the budget stops a run (plus the final eval and save)
        assert (tmp_path / "cmp" / r["preset"] / "model.safetensors").is_file()
        assert res["curves"][r["preset"]], "no validation points to plot"
        assert set(r["latency_ms"]) == {64, 256} and all(v > 0 for v in r["latency_ms"].values())
    assert res["best"] == min(res["rows"], key=lambda r: r["val_loss"])["preset"]
    assert res["sample"].startswith(cfg.sample_prompt)
    saved = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert saved["best"] == res["best"] and (tmp_path / "cmp" / "val_loss.png").stat().st_size > 1000
    assert "lower validation loss" in (tmp_path / "cmp" / "compare.md").read_text()
    before = (tmp_path / "cmp" / "compare.json").read_text()
    with pytest.raises(FileExistsError, match="earlier comparison"):  # a second run into the same folder
        compare(cfg, progress=False)
    assert (tmp_path / "cmp" / "compare.json").read_text() == before


def test_lr_grid_selects_on_the_first_validation_half_and_reports_the_second(tmp_path, corpus):
    import math

    from autoglm.data import prepare_corpus
    from autoglm.recipes.compare import _eval_loss, bits_per_byte

    cfg = load_config(CompareConfig, overrides={
        "presets": "tiny", "minutes": 0.03, "vocab_size": 300, "out": tmp_path / "cmp", "lrs": "1e-5,3e-3",
        "data.path": corpus, "data.cache_dir": tmp_path / "cache", "train.batch_size": 4, "train.seq_len": 32,
        "train.eval_batches": 2, "sample_prompt": "", "latency_lengths": ""})
    res = compare(cfg, progress=False)
    (row,) = res["rows"]
    assert [g["lr"] for g in row["grid"]] == [1e-5, 3e-3]
    assert row["lr"] == min(row["grid"], key=lambda g: g["select_loss"])["lr"] == 3e-3  # 1e-5 barely moves
    for g in row["grid"]:
        assert (tmp_path / "cmp" / "tiny" / f"lr-{g['lr']:g}" / "model.safetensors").is_file()
    # the reported numbers are the chosen run's on the held-out second half, recomputed here
    from autoglm import OpenAutoGLMForCausalLM

    data = prepare_corpus(corpus, tmp_path / "cache", 300, val_fraction=cfg.data.val_fraction)
    test = data.tokens.val[len(data.tokens.val) // 2:]
    model = OpenAutoGLMForCausalLM.from_pretrained(tmp_path / "cmp" / "tiny" / "lr-0.003")
    ev = _eval_loss(model, test, cfg.train)
    assert math.isclose(row["test_loss"], ev["loss"], rel_tol=1e-4)
    text = data.tokenizer.decode([int(t) for t in test[1:1 + int(ev["tokens"])]])
    assert math.isclose(row["test_bpb"], ev["loss"] * ev["tokens"] / (math.log(2) * len(text.encode())), rel_tol=1e-4)
    assert math.isclose(bits_per_byte(math.log(2), 3, [0, 1, 2, 3], data.tokenizer) * len(
        data.tokenizer.decode([1, 2, 3]).encode()), 3.0, rel_tol=1e-9)
    assert "chosen lr" in (tmp_path / "cmp" / "compare.md").read_text()


def test_transformers_twins_train_beside_the_presets_on_the_same_budget(tmp_path, corpus):
    from autoglm import OpenAutoGLMConfig
    from autoglm.baselines import baseline_objective, build_baseline, parameter_counts

    cfg = load_config(CompareConfig, overrides={
        "presets": "tiny,hf-llama,hf-mixtral", "minutes": 0.03, "vocab_size": 300, "out": tmp_path / "cmp",
        "data.path": corpus, "data.cache_dir": tmp_path / "cache", "train.batch_size": 4, "train.seq_len": 32,
        "train.eval_batches": 2, "sample_tokens": 4, "latency_lengths": "64", "latency_repeats": 1})
    res = compare(cfg, progress=False)
    rows = {r["preset"]: r for r in res["rows"]}
    assert list(rows) == ["tiny", "hf-llama", "hf-mixtral"]
    # the same total size as the preset they are built at (vocabulary, width, depth, heads, experts)
    tiny = rows["tiny"]["params_total"]
    for name in ("hf-llama", "hf-mixtral"):
        r = rows[name]
        assert abs(r["params_total"] - tiny) / tiny < 0.05, (name, r["params_total"], tiny)
        assert r["steps"] >= 1 and r["val_loss"] > 0 and r["latency_ms"][64] > 0
    assert rows["hf-llama"]["params_active"] == rows["hf-llama"]["params_total"]
    assert rows["hf-mixtral"]["params_active"] < rows["hf-mixtral"]["params_total"]
    assert res["sample_from"] == "tiny" and res["sample"].startswith(cfg.sample_prompt)  # the engine serves ours
    # Mixtral's load-balancing loss enters with its own coefficient (transformers returns it unweighted)
    import torch

    size = OpenAutoGLMConfig.from_name("tiny", vocab_size=300)
    torch.manual_seed(0)
    mix = build_baseline("hf-mixtral", size)
    x = torch.randint(2, 300, (2, 16))
    out = baseline_objective(mix)(mix, (x[:, :-1], x[:, 1:]))
    ref = mix(x[:, :-1])
    assert torch.allclose(out["aux_loss"], size.router_aux_loss_coef * ref.aux_loss)
    assert torch.allclose(out["loss"], out["lm_loss"] + out["aux_loss"])
    assert parameter_counts(build_baseline("hf-llama", size))["total"] == rows["hf-llama"]["params_total"]


def test_twins_need_a_mixture_of_experts_preset_to_size_them():
    with pytest.raises(ConfigError, match="first Mixture-of-Experts preset"):
        load_config(CompareConfig, overrides={"presets": "standard-tiny,hf-llama"})
