"""`autoglm graph clean | pretrain | probe`: options generated from the recipe config, the
config file under the command-line options, errors that name the field."""

import json

import pytest
import torch
from typer.testing import CliRunner

from autoglm.cli import app
from autoglm.graph.experiment import load_ssl_model

ONE_PROBE = ["--probe-weight-decays", "1e-3", "--probe-standardize", "false"]  # one probe fit, not the grid


def _run(*args):
    return CliRunner().invoke(app, ["graph", *map(str, args)])


def test_cli_clean_pretrain_probe(tmp_path):
    (tmp_path / "e.csv").write_text("source,target\n0,1\n1,2\n2,0\n0,0\n")
    (tmp_path / "n.csv").write_text("id,a,b\n0,1,0\n1,0,1\n2,1,1\n")
    r = _run("clean", "--out", tmp_path / "g", "--edges", tmp_path / "e.csv", "--nodes", tmp_path / "n.csv")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "g" / "report.json").read_text())["totals"]["by_rule"] == {"self_loop": 1}
    r = _run("pretrain", "--data", tmp_path / "g", "--out", tmp_path / "m", "--epochs", 2, "--hidden-dim", 8)
    assert r.exit_code == 0, r.output
    for f in ("model.safetensors", "embeddings.safetensors", "graph_ssl_config.json", "config.yaml", "run.json"):
        assert (tmp_path / "m" / f).is_file(), f
    r = _run("probe", "--seeds", 2, "--epochs", 2, "--hidden-dim", 8, "--probe-every", 1, *ONE_PROBE,
             "--json-out", tmp_path / "p.json")
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "p.json").read_text())
    assert len(res["runs"]) == 2 and [c["epoch"] for c in res["curve"]] == [1, 2] and res["seeds"] == [0, 1]
    assert res["split"] == {"train_mask": 50, "val_mask": 250, "test_mask": 500} and "split_name" in res
    assert "probe accuracy during pre-training" in r.output
    r = _run("probe", "--model-dir", tmp_path / "m", "--probe-every", 1)
    assert r.exit_code == 2 and "--probe-every" in r.output
    r = _run("probe", "--model-dir", tmp_path / "nothing")
    assert r.exit_code == 2 and "is not a graph model directory" in r.output
    r = _run("clean", "--out", tmp_path / "bad", "--edges", tmp_path / "n.csv")
    assert r.exit_code == 2 and "no source column" in r.output and "--source-col" in r.output


def test_cli_pretrain_options_reach_the_saved_model_and_probe_model_dir(tmp_path):
    args = ["pretrain", "--out", tmp_path / "m", "--epochs", 2, "--hidden-dim", 8,
            "--contrastive-weight", 0, "--decorrelation-weight", 1, "--decorrelation-lambda", 2e-3,
            "--augment", "edge_drop,feature_mask", "--aug-p", 0.4, "--feature-p", "0.1,0.2", "--dropout", 0,
            "--weight-decay", 0, "--no-propagate-input", "--no-input-projection", "--no-residual",
            "--no-final-act", "--init", "glorot"]
    r = _run(*args)
    assert r.exit_code == 0, r.output
    saved = json.loads((tmp_path / "m" / "graph_ssl_config.json").read_text())
    assert saved["loss"]["decorrelation_weight"] == 1.0 and saved["loss"]["decorrelation_lambda"] == 2e-3
    assert saved["views"]["aug_p"] == [0.4, 0.4] and saved["views"]["feature_p"] == [0.1, 0.2]
    enc = saved["encoder"]
    assert enc["dropout"] == 0.0 and enc["input_projection"] is False and enc["residual"] is False
    assert enc["final_act"] is False and enc["init"] == "glorot" and saved["optim"]["epochs"] == 2
    assert load_ssl_model(tmp_path / "m").encoder.input is None  # the saved model loads with its shape
    r = _run("probe", "--model-dir", tmp_path / "m", *ONE_PROBE, "--json-out", tmp_path / "p.json")
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "p.json").read_text())
    assert 0 <= res["test_acc"] <= 100 and res["model_dir"] == str(tmp_path / "m")


@pytest.mark.parametrize("args, message", [
    (["--propagate-input", "--no-input-projection"], "--no-propagate-input"),
    (["--init", "zeros"], "ssl.encoder.init (--init): must be one of 'torch', 'glorot', got 'zeros'"),
    (["--aug-p", "0.1,0.2,0.3"], "ssl.views.aug_p (--aug-p): expected 2 values, got 3"),
    (["--feature-p", "half"], "ssl.views.feature_p[0]: expected float, got 'half'"),
    (["--augment", "rotate"], "ssl.views: augmentations: unknown ['rotate']"),
    (["--mask-rate", "1.5"], "ssl.loss: mask_rate (--mask-rate) (1.5) must be in [0, 1)"),
    (["--data", "Cora"], "data: source (--data) Cora needs root"),
])
def test_cli_bad_options_name_the_field(tmp_path, args, message):
    r = _run("pretrain", "--out", tmp_path / "x", *args)
    assert r.exit_code == 2 and message in " ".join(r.output.split()), r.output
    assert not (tmp_path / "x").exists()  # refused before any data loads or file is written


def test_cli_options_override_the_config_file(tmp_path):
    (tmp_path / "c.yaml").write_text("ssl:\n  encoder:\n    hidden_dim: 16\n    num_layers: 3\n"
                                     "  optim:\n    epochs: 7\nprobe:\n  seeds: 3\n")
    r = _run("probe", "--config", tmp_path / "c.yaml", "--hidden-dim", 8, "--feature-p", "none", "--print-config")
    assert r.exit_code == 0, r.output
    import yaml

    cfg = yaml.safe_load(r.output)
    assert cfg["ssl"]["encoder"]["hidden_dim"] == 8  # the option beats the file
    assert cfg["ssl"]["encoder"]["num_layers"] == 3 and cfg["ssl"]["optim"]["epochs"] == 7  # the file beats defaults
    assert cfg["probe"]["seeds"] == 3 and cfg["ssl"]["loss"]["mask_rate"] == 0.5  # untouched: the default
    assert cfg["ssl"]["views"]["feature_p"] is None  # an optional list option takes 'none'
    r = _run("pretrain", "--config", tmp_path / "c.yaml", "--print-config")
    assert r.exit_code == 2 and "probe: unknown field" in r.output  # pretrain has no probe section


def test_cli_clean_reads_an_export_guards_the_folder_and_feeds_pretrain(tmp_path):
    e, n, out = tmp_path / "e.csv", tmp_path / "n.csv", tmp_path / "g"
    e.write_bytes(b"\xef\xbb\xbffrom;to;when\r\n0;1;2024-01-01\r\n1;2;2024-01-06T10:00:00Z\r\n2;0;1704067200123\r\n"
                  b"0;0;2024-01-01\r\n")  # ';' sniffed, BOM, CRLF, ISO dates and epoch ms
    n.write_text("node,a,b\n0,1,0\n1,0,1\n2,1,1\n")
    args = ["clean", "--out", out, "--edges", e, "--nodes", n, "--time-col", "WHEN", "--node-id-col", "node"]
    r = _run(*args, "--dry-run")
    assert r.exit_code == 0, r.output
    assert "dry run: nothing was written" in r.output and "self_loop" in r.output and not out.exists()
    r = _run(*args)
    assert r.exit_code == 0, r.output
    for row in ("rows in", "kept", "quarantined", "self_loop", "nodes", "edges"):
        assert row in r.output, row
    rep = json.loads((out / "report.json").read_text())
    assert rep["totals"]["by_rule"] == {"self_loop": 1} and rep["graph"]["num_edges"] == 3
    r = _run("pretrain", "--data", out, "--out", tmp_path / "m", "--epochs", 2, "--hidden-dim", 8)
    assert r.exit_code == 0, r.output
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (tmp_path / "bad.csv").write_text("source,target\n5,5\n6,6\n")
    r = _run("clean", "--out", out, "--edges", tmp_path / "bad.csv")
    assert r.exit_code == 2 and "no row of 2 was kept" in " ".join(r.output.split()) and "self_loop" in r.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the folder is as it was
    r = _run("clean", "--out", out, "--edges", tmp_path / "bad.csv", "--max-quarantine", 2)
    assert r.exit_code == 2 and "--max-quarantine" in r.output
    r = _run("clean", "--out", tmp_path / "x", "--edges", e, "--source-col", "src_id")
    assert r.exit_code == 2 and "no column 'src_id' (given by --source-col); columns found: 'from', 'to', 'when'" \
        in " ".join(r.output.split())


def test_cli_edge_only_export_pretrains_on_degree_profile_features(tmp_path):
    """An export with edges and no node table: pretrain falls back to structural features."""
    from autoglm.graph.datasets import load_graph, structural_features

    (tmp_path / "e.csv").write_text("source,target\n0,1\n1,2\n2,0\n2,3\n")
    assert _run("clean", "--out", tmp_path / "g", "--edges", tmp_path / "e.csv").exit_code == 0
    data = load_graph(str(tmp_path / "g"))
    assert data.x.shape == (4, 5)
    deg = torch.tensor([2.0, 2.0, 3.0, 1.0])  # the undirected graph's degrees, counted by hand
    assert torch.allclose(data.x[:, 0], torch.log1p(deg)) and torch.equal(data.x, structural_features(data))
    r = _run("pretrain", "--data", tmp_path / "g", "--out", tmp_path / "m", "--epochs", 2, "--hidden-dim", 8)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "m" / "embeddings.safetensors").is_file()


def test_cli_sampled_pretrain_runs_the_neighbour_sampled_trainer(tmp_path):
    """--sampled: mini-batches of 1024 seed nodes by default (sbm has 1000 nodes: one step per
    epoch); --batch-size sets it (and implies --sampled); the saved config records both."""
    r = _run("pretrain", "--out", tmp_path / "m", "--epochs", 2, "--hidden-dim", 8, "--sampled", "--fanouts", "3,3")
    assert r.exit_code == 0, r.output and "2 steps" in r.output
    assert "2 steps" in r.output
    r = _run("pretrain", "--out", tmp_path / "b", "--epochs", 2, "--hidden-dim", 8, "--batch-size", 250)
    assert r.exit_code == 0 and "8 steps" in r.output, r.output  # 4 mini-batches per epoch
    cfg = json.loads((tmp_path / "b" / "graph_ssl_config.json").read_text())
    assert cfg["optim"]["sampled"] is True and cfg["optim"]["batch_size"] == 250
