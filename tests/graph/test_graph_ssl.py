"""SSL objective, pre-training through the shared Trainer, probe, save/load and the CLI."""

import json

import pytest
import torch
from typer.testing import CliRunner

from autoglm.cli import app
from autoglm.graph.datasets import sbm_graph
from autoglm.graph.experiment import ProbeCurve, embed, load_ssl_model, save_ssl_model, ssl_probe
from autoglm.graph.losses import cca_ssg, info_nce, scaled_cosine_error
from autoglm.graph.probe import linear_probe, tuned_linear_probe
from autoglm.graph.ssl import GraphSSLConfig, GraphSSLModel, GraphSSLObjective, pretrain_graph


@pytest.fixture(scope="module")
def graph():
    return sbm_graph(num_nodes=200, num_blocks=4, num_features=64, p_in=0.1, p_out=0.005, feature_signal=0.15, seed=1)


def test_objective_is_weighted_sum_of_reference_terms(graph):
    cfg = GraphSSLConfig(hidden_dim=16, num_layers=1, dropout=0.0, contrastive_weight=0.3,
                         reconstruction_weight=2.0, mask_rate=0.5, augmentations=("edge_perturb", "feature_mask"))
    model = GraphSSLModel(64, cfg)
    out = GraphSSLObjective(cfg)(model, {"x": graph.x, "edge_index": graph.edge_index, "step": 3})
    # rebuild both terms by hand with the same generator sequence
    obj = GraphSSLObjective(cfg)
    gen = torch.Generator().manual_seed(3)
    node_mask = torch.rand(200, generator=gen) < 0.5
    recon = model.reconstruct(graph.x, node_mask, model.encoder.prepare(graph.edge_index, 200))
    rec = scaled_cosine_error(recon[node_mask], graph.x[node_mask], cfg.sce_alpha)
    (x1, e1), (x2, e2) = (obj.view(graph.x, graph.edge_index, p, gen) for p in cfg.aug_p)
    con = info_nce(model.projector(model.encoder(x1, e1)), model.projector(model.encoder(x2, e2)), 0.5)
    torch.testing.assert_close(out["loss"], 0.3 * con + 2.0 * rec)
    torch.testing.assert_close(out["reconstruction_loss"], rec)


def test_decorrelation_term_uses_encoder_outputs_of_both_views(graph):
    cfg = GraphSSLConfig(hidden_dim=16, num_layers=1, dropout=0.0, contrastive_weight=0.5, reconstruction_weight=0.0,
                         decorrelation_weight=0.2, decorrelation_lambda=0.01, augmentations=("edge_drop", "feature_mask"),
                         aug_p=(0.4, 0.3), feature_p=(0.1, 0.0))
    model = GraphSSLModel(64, cfg)
    out = GraphSSLObjective(cfg)(model, {"x": graph.x, "edge_index": graph.edge_index, "step": 5})
    obj, gen = GraphSSLObjective(cfg), torch.Generator().manual_seed(5)
    (x1, e1), (x2, e2) = (obj.view(graph.x, graph.edge_index, p, gen, f) for p, f in zip((0.4, 0.3), (0.1, 0.0)))
    assert (x2 == graph.x).all() and not (x1 == graph.x).all()  # feature_p, not aug_p, sets the feature mask
    assert e1.shape[1] < graph.edge_index.shape[1]
    h1, h2 = model.encoder(x1, e1), model.encoder(x2, e2)
    dec = cca_ssg(h1, h2, 0.01)
    con = info_nce(model.projector(h1), model.projector(h2), 0.5)
    torch.testing.assert_close(out["decorrelation_loss"], dec)
    torch.testing.assert_close(out["loss"], 0.5 * con + 0.2 * dec)


def test_masked_nodes_only_see_mask_token(graph):
    cfg = GraphSSLConfig(hidden_dim=16, num_layers=1, dropout=0.0)
    model = GraphSSLModel(64, cfg).eval()
    mask = torch.zeros(200, dtype=torch.bool)
    mask[:50] = True
    g = model.encoder.prepare(graph.edge_index, 200)
    a = model.reconstruct(graph.x, mask, g)
    x2 = graph.x.clone()
    x2[:50] = torch.rand(50, 64)  # changing masked inputs must not change anything
    torch.testing.assert_close(model.reconstruct(x2, mask, g), a)


def test_attention_decoder_reconstructs_masked_nodes_from_neighbours(graph):
    """With attention the decoder propagates too: masked rows are not all the same constant
    (they were, when the decoder was a bare Linear on re-masked zeros)."""
    cfg = GraphSSLConfig(hidden_dim=16, num_layers=1, attention=True, heads=2, dropout=0.0, attn_dropout=0.0)
    model = GraphSSLModel(64, cfg).eval()
    mask = torch.zeros(200, dtype=torch.bool)
    mask[:50] = True
    out = model.reconstruct(graph.x, mask, model.encoder.prepare(graph.edge_index, 200))
    assert float(out[mask].detach().std(0).max()) > 1e-3


def test_replaced_masked_nodes_see_the_source_node_features(graph):
    """replace_from: masked node i encodes x[replace_from[i]] instead of [MASK]; equal to
    feeding that row as if it were i's own features, then masking only for the loss."""
    cfg = GraphSSLConfig(hidden_dim=16, num_layers=1, dropout=0.0)
    model = GraphSSLModel(64, cfg).eval()
    g = model.encoder.prepare(graph.edge_index, 200)
    mask = torch.zeros(200, dtype=torch.bool)
    mask[:50] = True
    rf = torch.full((200,), -1)
    rf[:10] = torch.arange(100, 110)
    x2 = graph.x.clone()
    x2[:10] = graph.x[100:110]
    mask2 = mask.clone()
    # reference: nodes 0-9 carry node 100-109's features into the encoder ...
    h = model.encoder(torch.where(mask2.unsqueeze(1) & (rf < 0).unsqueeze(1), model.mask_token.expand_as(x2), x2),
                      graph=g)
    rep = model.encoder_to_decoder(model.decoder_act(h)).masked_fill(mask.unsqueeze(1), 0.0)
    torch.testing.assert_close(model.reconstruct(graph.x, mask, g, rf), g[0] @ model.decoder(rep))


def test_l2_term_is_half_sum_of_squares(graph):
    base = dict(hidden_dim=16, num_layers=1, dropout=0.0, contrastive_weight=0.0)
    model = GraphSSLModel(64, GraphSSLConfig(**base))
    batch = {"x": graph.x, "edge_index": graph.edge_index, "step": 1}
    plain = GraphSSLObjective(GraphSSLConfig(**base))(model, batch)["loss"]
    reg = GraphSSLObjective(GraphSSLConfig(**base, l2=1e-3))(model, batch)["loss"]
    torch.testing.assert_close(reg - plain, 0.5e-3 * sum(float(p.pow(2).sum()) for p in model.parameters()) * torch.ones(()))


def test_tuned_probe_selects_on_validation_only(graph):
    emb = torch.randn(200, 8) + torch.nn.functional.one_hot(graph.y, 8).float()
    masks = (graph.y, graph.train_mask, graph.val_mask, graph.test_mask)
    grid = [(std, wd) for std in (False, True) for wd in (1e-4, 1e-1)]
    runs = [linear_probe(emb, *masks, weight_decay=wd, standardize=std) for std, wd in grid]
    best = max(range(len(runs)), key=lambda i: (runs[i]["val_acc"], -i))  # ties -> first
    got = tuned_linear_probe(emb, *masks, weight_decays=(1e-4, 1e-1))
    assert got["test_acc"] == runs[best]["test_acc"] and got["val_acc"] == max(r["val_acc"] for r in runs)
    assert (bool(got["standardize"]), got["weight_decay"]) == grid[best]


def test_pretraining_beats_raw_features_and_random_encoder_and_is_deterministic(graph):
    cfg = GraphSSLConfig(hidden_dim=32, num_layers=2, mask_rate=0.5)
    model, result = pretrain_graph(graph.x, graph.edge_index, cfg, epochs=40, lr=5e-3)
    hist = [r["loss"] for r in result.history if "loss" in r]
    assert hist[-1] < hist[0]
    masks = (graph.y, graph.train_mask, graph.val_mask, graph.test_mask)
    trained = linear_probe(embed(model, graph.x, graph.edge_index), *masks)["test_acc"]
    torch.manual_seed(0)
    untrained = linear_probe(embed(GraphSSLModel(64, cfg), graph.x, graph.edge_index), *masks)["test_acc"]
    raw = linear_probe(graph.x, *masks)["test_acc"]
    assert trained > raw + 0.08 and trained > untrained
    model2, _ = pretrain_graph(graph.x, graph.edge_index, cfg, epochs=40, lr=5e-3)
    torch.testing.assert_close(embed(model2, graph.x, graph.edge_index), embed(model, graph.x, graph.edge_index))


def test_save_load_roundtrip_and_multi_seed(tmp_path, graph):
    cfg = GraphSSLConfig(hidden_dim=16, num_layers=1, attention=True, heads=2)
    model, _ = pretrain_graph(graph.x, graph.edge_index, cfg, epochs=3)
    save_ssl_model(model, tmp_path)
    torch.testing.assert_close(embed(load_ssl_model(tmp_path), graph.x, graph.edge_index),
                               embed(model, graph.x, graph.edge_index))
    res = ssl_probe(graph, cfg, seeds=[0, 1], epochs=3)
    assert len(res["runs"]) == 2 and res["split"] == {"train_mask": 40, "val_mask": 50, "test_mask": 100}
    accs = [100 * r["test_acc"] for r in res["runs"]]
    assert res["mean"] == pytest.approx(sum(accs) / 2) and res["std"] == pytest.approx(abs(accs[0] - accs[1]) / 2)
    assert res["val_mean"] == pytest.approx(sum(100 * r["val_acc"] for r in res["runs"]) / 2)
    assert res["curve"] == []


def test_probe_curve_leaves_training_unchanged(graph):
    """Probing during pre-training (dropout on, so the RNG matters) must not change the trained
    model; points come every `probe_every` epochs plus the last, the last one is the final
    model's probe, and ssl_probe averages the curves over seeds."""
    cfg = GraphSSLConfig(hidden_dim=16, num_layers=1, dropout=0.3)
    plain, _ = pretrain_graph(graph.x, graph.edge_index, cfg, epochs=5)
    cb = ProbeCurve(graph, 2, 0, {})
    probed, _ = pretrain_graph(graph.x, graph.edge_index, cfg, epochs=5, callbacks=[cb], log_every=2)
    torch.testing.assert_close(embed(probed, graph.x, graph.edge_index), embed(plain, graph.x, graph.edge_index))
    assert [p["epoch"] for p in cb.points] == [2, 4, 5]
    res = ssl_probe(graph, cfg, seeds=[0, 1], epochs=5, probe_every=2)
    for run in res["runs"]:
        assert (run["curve"][-1]["val_acc"], run["curve"][-1]["test_acc"]) == (run["val_acc"], run["test_acc"])
    last = res["curve"][-1]
    assert [r["epoch"] for r in res["curve"]] == [2, 4, 5] and last["seeds"] == 2
    assert last["test_acc_mean"] == pytest.approx(res["mean"]) and last["test_acc_std"] == pytest.approx(res["std"])
    with pytest.raises(ValueError, match="probe every"):
        ProbeCurve(graph, 0, 0, {})


def test_config_validation():
    with pytest.raises(ValueError, match="unknown augmentations"):
        GraphSSLConfig(augmentations=("rotate",))
    with pytest.raises(ValueError, match="mask_rate"):
        GraphSSLConfig(mask_rate=1.5)
    with pytest.raises(ValueError, match="not all 0"):
        GraphSSLConfig(contrastive_weight=0, reconstruction_weight=0)
    with pytest.raises(ValueError, match="feature_p"):
        GraphSSLConfig(feature_p=(0.1,))
    with pytest.raises(ValueError, match="decorrelation_lambda"):
        GraphSSLConfig(decorrelation_lambda=-1.0)
    with pytest.raises(ValueError, match="empty"):
        pretrain_graph(torch.zeros(0, 4), torch.zeros(2, 0, dtype=torch.long), GraphSSLConfig())


def test_cli_clean_pretrain_probe(tmp_path):
    (tmp_path / "e.csv").write_text("source,target\n0,1\n1,2\n2,0\n0,0\n")
    (tmp_path / "n.csv").write_text("id,a,b\n0,1,0\n1,0,1\n2,1,1\n")
    r = CliRunner().invoke(app, ["graph", "clean", "--out", str(tmp_path / "g"), "--edges", str(tmp_path / "e.csv"),
                                 "--nodes", str(tmp_path / "n.csv")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "g" / "report.json").read_text())["totals"]["by_rule"] == {"self_loop": 1}
    r = CliRunner().invoke(app, ["graph", "pretrain", "--data", str(tmp_path / "g"), "--out", str(tmp_path / "m"),
                                 "--epochs", "2", "--hidden-dim", "8"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "m" / "model.safetensors").is_file() and (tmp_path / "m" / "embeddings.safetensors").is_file()
    r = CliRunner().invoke(app, ["graph", "probe", "--seeds", "2", "--epochs", "2", "--hidden-dim", "8",
                                 "--probe-every", "1", "--json-out", str(tmp_path / "p.json")])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "p.json").read_text())
    assert len(res["runs"]) == 2 and [c["epoch"] for c in res["curve"]] == [1, 2]
    assert "probe accuracy during pre-training" in r.output
    r = CliRunner().invoke(app, ["graph", "probe", "--model-dir", str(tmp_path / "m"), "--probe-every", "1"])
    assert r.exit_code == 2 and "--probe-every" in r.output
    r = CliRunner().invoke(app, ["graph", "clean", "--out", str(tmp_path / "bad"), "--edges", str(tmp_path / "n.csv")])
    assert r.exit_code == 2 and "lacks" in r.output


def test_cli_pretrain_cca_options(tmp_path):
    args = ["graph", "pretrain", "--out", str(tmp_path / "m"), "--epochs", "2", "--hidden-dim", "8",
            "--contrastive-weight", "0", "--decorrelation-weight", "1", "--decorrelation-lambda", "2e-3",
            "--augment", "edge_drop,feature_mask", "--aug-p", "0.4", "--feature-p", "0.1,0.2", "--dropout", "0",
            "--weight-decay", "0", "--no-propagate-input", "--no-input-projection", "--no-residual",
            "--no-final-act", "--init", "glorot"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    saved = json.loads((tmp_path / "m" / "graph_ssl_config.json").read_text())
    assert saved["decorrelation_weight"] == 1.0 and saved["decorrelation_lambda"] == 2e-3
    assert saved["aug_p"] == [0.4, 0.4] and saved["feature_p"] == [0.1, 0.2] and saved["dropout"] == 0.0
    assert saved["input_projection"] is False and saved["residual"] is False
    assert saved["final_act"] is False and saved["init"] == "glorot"
    from autoglm.graph.experiment import load_ssl_model
    assert load_ssl_model(tmp_path / "m").encoder.input is None  # the saved model loads with its shape
    r = CliRunner().invoke(app, ["graph", "pretrain", "--out", str(tmp_path / "x"), "--propagate-input",
                                 "--no-input-projection"])
    assert r.exit_code == 2 and "--no-propagate-input" in r.output
    r = CliRunner().invoke(app, ["graph", "pretrain", "--out", str(tmp_path / "x"), "--init", "zeros"])
    assert r.exit_code == 2 and "init 'zeros'" in r.output
    r = CliRunner().invoke(app, ["graph", "pretrain", "--out", str(tmp_path / "x"), "--aug-p", "0.1,0.2,0.3"])
    assert r.exit_code == 2 and "one or two numbers" in r.output
    r = CliRunner().invoke(app, ["graph", "pretrain", "--out", str(tmp_path / "x"), "--feature-p", "half"])
    assert r.exit_code == 2 and "--feature-p" in r.output
    assert not (tmp_path / "x").exists()
