"""The config loader (defaults < YAML < overrides, errors naming the field) and the CLI
options generated from a config, checked against hand-written expectations."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest
import typer
from typer.testing import CliRunner

from autoglm.cli.options import add_recipe_command, option_names
from autoglm.settings import ConfigError, from_dict, load_config, section, setting, to_dict, to_yaml
from autoglm.training import TrainConfig


@dataclass
class Views:
    augmentations: tuple[str, ...] = setting(("edge_drop", "feature_mask"), "view strategies")
    p: tuple[float, float] = setting((0.4, 0.4), "strength per view")


@dataclass
class Demo:
    out: Path = setting(Path("runs/x"), "where it goes")
    mode: Literal["fast", "slow"] = setting("fast", "how")
    budget: float | None = setting(None, "minutes")
    views: Views = section(Views)
    train: TrainConfig = section(TrainConfig, max_steps=40, lr=1e-2)
    seed: int = setting(0, "top-level seed (clashes with train.seed)")


def test_defaults_file_and_overrides_in_order(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("mode: slow\ntrain:\n  batch_size: 3\n  lr: 0.5\nviews:\n  p: [0.1, 0.2]\n")
    cfg = load_config(Demo, f, {"train.lr": "0.25", "views.augmentations": "node_drop"})
    assert cfg.mode == "slow" and cfg.views.p == (0.1, 0.2) and cfg.views.augmentations == ("node_drop",)
    assert cfg.train.batch_size == 3 and cfg.train.lr == 0.25  # override beats file
    assert cfg.train.max_steps == 40  # the recipe's section default survives a partial section in the file
    assert cfg.train.warmup_steps == 4  # derived once, from the merged max_steps
    assert load_config(Demo, overrides={"train.max_steps": 1000}).train.warmup_steps == 100


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(Demo, overrides={"budget": "2.5", "views.p": "0.3"})
    assert cfg.views.p == (0.3, 0.3) and cfg.budget == 2.5
    (tmp_path / "c.yaml").write_text(to_yaml(cfg))
    assert load_config(Demo, tmp_path / "c.yaml") == cfg
    assert from_dict(Demo, to_dict(cfg)) == cfg


@pytest.mark.parametrize("overrides, message", [
    ({"train.lrr": 1}, "train.lrr: unknown field; TrainConfig has:"),
    ({"mode": "medium"}, "mode: must be one of 'fast', 'slow', got 'medium'"),
    ({"train.batch_size": "four"}, "train.batch_size: expected int, got 'four'"),
    ({"train.batch_size": True}, "train.batch_size: expected int, got True"),
    ({"views.p": "1,2,3"}, "views.p: expected 2 values, got 3"),
    ({"train.lr": -1}, "train: lr must be positive, got -1.0"),
    ({"train": 3}, "train: expected a mapping of TrainConfig fields"),
])
def test_errors_name_the_field(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(Demo, overrides=overrides)
    assert message in str(e.value)


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Demo, tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(Demo, tmp_path / "list.yaml")
    (tmp_path / "bad.yaml").write_text("train: {lr: 0.1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Demo, tmp_path / "bad.yaml")
    (tmp_path / "typo.yaml").write_text("train:\n  seq_lne: 3\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: train.seq_lne: unknown field"):
        load_config(Demo, tmp_path / "typo.yaml")


def _app(seen: list):
    app = typer.Typer()
    add_recipe_command(app, "demo", Demo, seen.append, help="A demo recipe.")
    app.command("other")(lambda: None)  # a second command so typer keeps the sub-command name
    return app


def test_cli_options_from_the_config(tmp_path):
    names = option_names(Demo)
    assert names["train.max_steps"] == "steps" and names["train.batch_size"] == "batch-size"
    assert names["seed"] == "seed" or names["seed"] == "seed"  # top-level keeps the plain name ...
    assert names["train.seed"] == "train-seed"  # ... and the clashing section field is spelt with its section
    seen: list = []
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  batch_size: 3\n  lr: 0.5\n")
    r = CliRunner().invoke(_app(seen), ["demo", "--config", str(f), "--lr", "0.125", "--steps", "7",
                                        "--mode", "slow", "--augmentations", "a", "--augmentations", "b,c",
                                        "--no-compile", "--budget", "none"])
    assert r.exit_code == 0, r.output
    (cfg,) = seen
    assert (cfg.train.lr, cfg.train.batch_size, cfg.train.max_steps, cfg.mode) == (0.125, 3, 7, "slow")
    assert cfg.views.augmentations == ("a", "b", "c") and cfg.budget is None and cfg.train.compile is False


def test_cli_print_config_and_errors():
    seen: list = []
    r = CliRunner().invoke(_app(seen), ["demo", "--steps", "5", "--print-config"])
    assert r.exit_code == 0 and not seen
    assert load_config(Demo, overrides={}).train.max_steps == 40
    assert "max_steps: 5" in r.output and "warmup_steps: 1" in r.output
    r = CliRunner().invoke(_app(seen), ["demo", "--steps", "0"])
    assert r.exit_code == 2 and "max_steps (--steps) must be a positive integer" in r.output
    r = CliRunner().invoke(_app(seen), ["demo", "--mode", "medium"])
    assert r.exit_code == 2 and "mode (--mode): must be one of 'fast', 'slow'" in r.output
    r = CliRunner().invoke(_app(seen), ["demo", "--help"])
    assert r.exit_code == 0 and "--batch-size" in r.output and "(default: 40)" in r.output
