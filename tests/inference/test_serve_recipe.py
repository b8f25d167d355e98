"""`autoglm serve` as a recipe: typed config (file, options, --print-config) and the exit
layers it gives the engine (the run's trained ones by default)."""

import json
import shutil

import pytest
from typer.testing import CliRunner

from autoglm.cli import app
from autoglm.recipes.serve import ServeConfig, build_server
from autoglm.settings import ConfigError, load_config

from inference_helpers import make_model

CONFIG = __import__("pathlib").Path(__file__).resolve().parents[2] / "configs" / "serve.yaml"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_tokenizer_dir):
    d = tmp_path_factory.mktemp("run")
    make_model("tiny", num_hidden_layers=4).save_pretrained(d)
    for f in tiny_tokenizer_dir.iterdir():
        shutil.copy2(f, d / f.name)
    return d


def exit_layers_of(cfg):
    app_, served = build_server(cfg)
    return app_.state.server.engine._core.runner.exit_layers, served


def test_config_file_options_and_print_config(run_dir):
    cfg = load_config(ServeConfig, CONFIG, {"run": str(run_dir), "port": "9001", "engine.num_blocks": "64"})
    assert (cfg.port, cfg.engine.num_blocks, cfg.engine.block_size, cfg.engine.exit_layers) == (9001, 64, 16, None)
    r = CliRunner().invoke(app, ["serve", str(run_dir), "--config", str(CONFIG), "--exit-layers", "1,2",
                                 "--max-num-seqs", "8", "--lora", "a=x", "--print-config"])
    assert r.exit_code == 0, r.output
    printed = r.output
    assert "exit_layers:\n  - 1\n  - 2" in printed and "max_num_seqs: 8" in printed and "- a=x" in printed
    for bad, msg in [({"engine.block_size": "0"}, "block_size must be >= 1"), ({"port": "-1"}, "port"),
                     ({"engine.exit_layers": "0"}, "exit_layers")]:
        with pytest.raises(ConfigError, match=msg):
            load_config(ServeConfig, overrides={"run": str(run_dir), **bad})
    r = CliRunner().invoke(app, ["serve"])
    assert r.exit_code == 2 and "run (RUN): required" in " ".join(r.output.split())


def test_exit_layers_default_to_the_runs_trained_exits(run_dir, tmp_path):
    cfg = load_config(ServeConfig, overrides={"run": str(run_dir), "engine.num_blocks": "64"})
    assert exit_layers_of(cfg) == ((1, 2, 3), [run_dir.name])  # no run.json: every layer
    trained = tmp_path / "trained"
    shutil.copytree(run_dir, trained)
    (trained / "run.json").write_text(json.dumps({"early_exit": {"layers": [2]}}))
    cfg = load_config(ServeConfig, overrides={"run": str(trained), "engine.num_blocks": "64",
                                              "served_model_name": "m"})
    assert exit_layers_of(cfg) == ((2,), ["m"])
    cfg = load_config(ServeConfig, overrides={"run": str(trained), "engine.num_blocks": "64",
                                              "engine.exit_layers": "1,3"})
    assert exit_layers_of(cfg)[0] == (1, 3)  # the option wins
    with pytest.raises(ValueError, match="exit_layers"):
        build_server(load_config(ServeConfig, overrides={"run": str(run_dir), "engine.exit_layers": "4"}))


def test_drain_timeout_reaches_the_server(run_dir, monkeypatch):
    """`--drain-timeout` is how long a SIGTERM'd server lets requests in flight finish (the
    deployment sizes its grace period from it): it must reach `serve_app`, and a negative or
    infinite value is refused before anything loads."""
    import autoglm.inference.server as server_mod

    seen = {}
    monkeypatch.setattr(server_mod, "serve_app", lambda app_, host, port, **kw: seen.update(kw, port=port))
    r = CliRunner().invoke(app, ["serve", str(run_dir), "--num-blocks", "64", "--port", "9002",
                                 "--drain-timeout", "300"])
    assert r.exit_code == 0, r.output
    assert seen == {"drain_timeout": 300.0, "port": 9002}
    assert load_config(ServeConfig, CONFIG, {"run": str(run_dir)}).drain_timeout == 30.0
    for bad in ("-1", "inf"):
        with pytest.raises(ConfigError, match="drain_timeout"):
            load_config(ServeConfig, overrides={"run": str(run_dir), "drain_timeout": bad})
