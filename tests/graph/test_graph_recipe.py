"""The graph SSL recipe (autoglm.recipes.graph_ssl) and its config: YAML round trip, the
Cora recipe file, errors naming the field, the run directory pretrain writes, the probe."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from autoglm.graph.config import GraphSSLConfig
from autoglm.graph.experiment import embed, load_ssl_model, save_ssl_model
from autoglm.recipes.graph_ssl import GraphPretrainConfig, GraphProbeConfig, pretrain, probe, seeds_of
from autoglm.rundir import RunDir
from autoglm.settings import ConfigError, from_dict, load_config, to_dict, to_yaml

CORA = Path(__file__).resolve().parents[2] / "configs" / "graph-cora.yaml"
TINY = {"ssl.encoder.hidden_dim": 8, "ssl.optim.epochs": 2, "probe.weight_decays": [1e-3], "probe.standardize": [False]}


def test_yaml_round_trip(tmp_path):
    cfg = load_config(GraphProbeConfig, overrides={"ssl.views.aug_p": "0.3,0.2", "ssl.views.feature_p": "none",
                                                   "ssl.optim.batch_size": "256", "probe.seeds": 3})
    assert cfg.ssl.views.aug_p == (0.3, 0.2) and cfg.ssl.views.feature_p is None and cfg.ssl.optim.batch_size == 256
    (tmp_path / "c.yaml").write_text(to_yaml(cfg))
    assert load_config(GraphProbeConfig, tmp_path / "c.yaml") == cfg
    assert from_dict(GraphProbeConfig, to_dict(cfg)) == cfg


def test_cora_file_is_the_builtin_ssl_default_on_cora():
    """configs/graph-cora.yaml pins every SSL value; they equal the code's defaults, so the
    built-in default (no file) runs the same recipe on the generated graph."""
    for cls in (GraphProbeConfig, GraphPretrainConfig):
        cfg = load_config(cls, CORA)
        assert cfg.ssl == GraphSSLConfig() and cfg.data.source == "Cora" and cfg.data.root is not None


def test_errors_name_the_field_and_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("ssl:\n  encoder:\n    hidden_dimm: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: ssl.encoder.hidden_dimm: unknown field; EncoderConfig has"):
        load_config(GraphProbeConfig, bad)
    bad.write_text("ssl:\n  loss:\n    mask_rate: 1.5\n")
    with pytest.raises(ConfigError, match=r"ssl.loss: mask_rate \(1.5\) must be in \[0, 1\)"):
        load_config(GraphProbeConfig, bad)
    for overrides, message in [
        ({"ssl.loss.contrastive_weight": 0, "ssl.loss.reconstruction_weight": 0, "ssl.loss.decorrelation_weight": 0},
         "ssl.loss: contrastive_weight, reconstruction_weight, decorrelation_weight, edge_weight and degree_weight"),
        ({"ssl.encoder.attention": True, "ssl.encoder.hidden_dim": 6}, "ssl.encoder: hidden_dim (6) must be divisible"),
        ({"ssl.views.augmentations": "rotate"}, "ssl.views: augmentations: unknown ['rotate']"),
        ({"ssl.views.feature_p": "0.1,2"}, "ssl.views: feature_p (0.1, 2.0) must be two probabilities"),
        ({"ssl.loss.decorrelation_lambda": -1}, "ssl.loss: decorrelation_lambda (-1.0) must be >= 0"),
        ({"ssl.optim.fanouts": "10,0"}, "ssl.optim: fanouts (10, 0) must be one or more positive counts"),
        ({"probe.seeds": 0}, "probe: seeds (0) must be >= 1"),
        ({"probe.model_dir": "m", "probe.probe_every": 2}, "probe: probe_every=2 follows a pre-training run"),
        ({"data.source": "PubMed"}, "data: source PubMed needs root"),
    ]:
        with pytest.raises(ConfigError) as e:
            load_config(GraphProbeConfig, overrides=overrides)
        assert str(e.value).startswith(message), (str(e.value), message)


def test_override_beats_file_beats_default(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("ssl:\n  encoder: {hidden_dim: 16, num_layers: 3}\n  optim: {lr: 0.01}\n")
    cfg = load_config(GraphProbeConfig, f, {"ssl.encoder.hidden_dim": "8", "ssl.optim.seed": 4})
    assert (cfg.ssl.encoder.hidden_dim, cfg.ssl.encoder.num_layers, cfg.ssl.optim.lr) == (8, 3, 0.01)
    assert cfg.ssl.encoder.init == "glorot" and seeds_of(cfg) == [4, 5, 6, 7, 8]


def test_pretrain_writes_a_run_directory_that_loads_and_reruns(tmp_path):
    cfg = load_config(GraphPretrainConfig, overrides={"out": tmp_path / "m", "ssl.encoder.hidden_dim": 8,
                                                      "ssl.optim.epochs": 2})
    out = pretrain(cfg)
    run = RunDir.open(tmp_path / "m", "graph")
    model = load_ssl_model(run.path)
    assert model.cfg == cfg.ssl and load_config(GraphPretrainConfig, run.path / "config.yaml") == cfg
    saved = load_file(str(run.path / "embeddings.safetensors"))["embeddings"]
    from autoglm.recipes.graph_ssl import load_data

    g = load_data(cfg.data)
    torch.testing.assert_close(saved, embed(model, g.x, g.edge_index))
    torch.testing.assert_close(saved, embed(out.model, g.x, g.edge_index))
    info = json.loads((run.path / "run.json").read_text())
    assert info["data"] == "sbm" and info["result"]["steps"] == 2 and info["config"]["ssl"]["optim"]["epochs"] == 2


def test_probe_full_batch_and_sampled_seeds_and_split(tmp_path):
    cfg = load_config(GraphProbeConfig, overrides={**TINY, "probe.seeds": 2, "ssl.optim.seed": 3,
                                                   "probe.json_out": tmp_path / "p.json"})
    res = probe(cfg)
    assert res["seeds"] == [3, 4] == [r["seed"] for r in res["runs"]] and res["data"] == "sbm"
    assert res["split"] == {"train_mask": 50, "val_mask": 250, "test_mask": 500} and "seed 0" in res["split_name"]
    assert json.loads((tmp_path / "p.json").read_text())["mean"] == pytest.approx(res["mean"])
    sampled = load_config(GraphProbeConfig, overrides={**TINY, "probe.seeds": 1, "ssl.optim.batch_size": 400,
                                                       "ssl.optim.fanouts": "5,5"})
    res = probe(sampled)  # ceil(1000 / 400) = 3 steps per epoch
    assert res["config"]["optim"]["batch_size"] == 400 and 0 < res["mean"] <= 100


def test_model_saved_with_the_flat_config_of_earlier_versions_loads(tmp_path):
    from autoglm.graph.config import EncoderConfig
    from autoglm.graph.ssl import GraphSSLModel

    cfg = GraphSSLConfig(EncoderConfig(hidden_dim=8, num_layers=1, residual=True, input_projection=True))
    save_ssl_model(GraphSSLModel(5, cfg), tmp_path)
    meta = json.loads((tmp_path / "graph_ssl_config.json").read_text())
    flat = {"in_dim": 5, **{k: v for section in ("encoder", "views", "loss") for k, v in meta[section].items()},
            "seed": 0}
    (tmp_path / "graph_ssl_config.json").write_text(json.dumps(flat))
    assert load_ssl_model(tmp_path).cfg == cfg
