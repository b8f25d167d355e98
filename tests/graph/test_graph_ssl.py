"""SSL objective, pre-training through the shared Trainer, probe, save/load."""


import pytest
import torch

from autoglm.graph.config import EncoderConfig, GraphSSLConfig, LossConfig, OptimConfig, ViewConfig
from autoglm.graph.datasets import sbm_graph
from autoglm.graph.experiment import ProbeCurve, embed, load_ssl_model, save_ssl_model, ssl_probe
from autoglm.graph.losses import cca_ssg, info_nce, scaled_cosine_error
from autoglm.graph.probe import linear_probe, tuned_linear_probe
from autoglm.graph.ssl import GraphSSLModel, GraphSSLObjective, pretrain_graph

ONE_PROBE = {"weight_decays": (1e-3,), "standardize": (False,)}  # one probe fit instead of the 8-point grid


@pytest.fixture(scope="module")
def graph():
    return sbm_graph(num_nodes=200, num_blocks=4, num_features=64, p_in=0.1, p_out=0.005, feature_signal=0.15, seed=1)


def test_objective_is_weighted_sum_of_reference_terms(graph):
    cfg = GraphSSLConfig(EncoderConfig(hidden_dim=16, num_layers=1, dropout=0.0),
                         ViewConfig(augmentations=("edge_perturb", "feature_mask"), aug_p=(0.2, 0.3), feature_p=None),
                         LossConfig(contrastive_weight=0.3, reconstruction_weight=2.0, decorrelation_weight=0.0,
                                    mask_rate=0.5))
    model = GraphSSLModel(64, cfg)
    out = GraphSSLObjective(cfg)(model, {"x": graph.x, "edge_index": graph.edge_index, "step": 3})
    # rebuild both terms by hand with the same generator sequence
    obj = GraphSSLObjective(cfg)
    gen = torch.Generator().manual_seed(3)
    node_mask = torch.rand(200, generator=gen) < 0.5
    recon = model.reconstruct(graph.x, node_mask, model.encoder.prepare(graph.edge_index, 200))
    rec = scaled_cosine_error(recon[node_mask], graph.x[node_mask], cfg.loss.sce_alpha)
    (x1, e1), (x2, e2) = (obj.view(graph.x, graph.edge_index, p, gen) for p in cfg.views.aug_p)
    con = info_nce(model.projector(model.encoder(x1, e1)), model.projector(model.encoder(x2, e2)), 0.5)
    torch.testing.assert_close(out["loss"], 0.3 * con + 2.0 * rec)
    torch.testing.assert_close(out["reconstruction_loss"], rec)


def test_decorrelation_term_uses_encoder_outputs_of_both_views(graph):
    cfg = GraphSSLConfig(EncoderConfig(hidden_dim=16, num_layers=1, dropout=0.0),
                         ViewConfig(augmentations=("edge_drop", "feature_mask"), aug_p=(0.4, 0.3),
                                    feature_p=(0.1, 0.0)),
                         LossConfig(contrastive_weight=0.5, reconstruction_weight=0.0, decorrelation_weight=0.2,
                                    decorrelation_lambda=0.01))
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
    cfg = GraphSSLConfig(EncoderConfig(hidden_dim=16, num_layers=1, dropout=0.0))
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
    cfg = GraphSSLConfig(EncoderConfig(hidden_dim=16, num_layers=1, attention=True, heads=2, dropout=0.0,
                                       attn_dropout=0.0))
    model = GraphSSLModel(64, cfg).eval()
    mask = torch.zeros(200, dtype=torch.bool)
    mask[:50] = True
    out = model.reconstruct(graph.x, mask, model.encoder.prepare(graph.edge_index, 200))
    assert float(out[mask].detach().std(0).max()) > 1e-3


def test_replaced_masked_nodes_see_the_source_node_features(graph):
    """replace_from: masked node i encodes x[replace_from[i]] instead of [MASK]; equal to
    feeding that row as if it were i's own features, then masking only for the loss."""
    cfg = GraphSSLConfig(EncoderConfig(hidden_dim=16, num_layers=1, dropout=0.0))
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
    enc = EncoderConfig(hidden_dim=16, num_layers=1, dropout=0.0)
    model = GraphSSLModel(64, GraphSSLConfig(enc))
    batch = {"x": graph.x, "edge_index": graph.edge_index, "step": 1}
    plain = GraphSSLObjective(GraphSSLConfig(enc, loss=LossConfig(contrastive_weight=0.0)))(model, batch)["loss"]
    reg = GraphSSLObjective(GraphSSLConfig(enc, loss=LossConfig(contrastive_weight=0.0, l2=1e-3)))(model, batch)
    squares = sum(float(p.pow(2).sum()) for p in model.parameters())
    torch.testing.assert_close(reg["loss"] - plain, 0.5e-3 * squares * torch.ones(()))


def test_tuned_probe_selects_on_validation_only(graph):
    emb = torch.randn(200, 8) + torch.nn.functional.one_hot(graph.y, 8).float()
    masks = (graph.y, graph.train_mask, graph.val_mask, graph.test_mask)
    grid = [(std, wd) for std in (False, True) for wd in (1e-4, 1e-1)]
    runs = [linear_probe(emb, *masks, weight_decay=wd, standardize=std) for std, wd in grid]
    best = max(range(len(runs)), key=lambda i: (runs[i]["val_acc"], -i))  # ties -> first
    got = tuned_linear_probe(emb, *masks, weight_decays=(1e-4, 1e-1))
    assert got["test_acc"] == runs[best]["test_acc"] and got["val_acc"] == max(r["val_acc"] for r in runs)
    assert (bool(got["standardize"]), got["weight_decay"]) == grid[best]
    assert got["val_loss"] == min(r["val_loss"] for r in runs)  # the lowest of the grid, whichever pair wins


def test_probe_val_loss_is_the_lowest_validation_cross_entropy_and_separates_tied_accuracies():
    # two classes on a line: both embeddings classify every node right (a tie at 100%), one with a
    # wider margin; the loss tells them apart
    y = torch.arange(40) % 2
    masks = [(torch.arange(40) // 2) % 2 == r for r in range(2)]
    masks.append(masks[1])
    near = (y.float() * 2 - 1).unsqueeze(1) * 0.5
    far = near * 4
    a, b = linear_probe(near, y, *masks, epochs=50), linear_probe(far, y, *masks, epochs=50)
    assert a["val_acc"] == b["val_acc"] == 1.0 and b["val_loss"] < a["val_loss"]
    # hand-computed reference: the same probe trained step by step, cross-entropy after each step
    clf = torch.nn.Linear(1, 2)
    with torch.no_grad():
        clf.weight.uniform_(-1, 1, generator=torch.Generator().manual_seed(0))
        clf.bias.zero_()
    opt = torch.optim.Adam(clf.parameters(), lr=0.01, weight_decay=1e-4)
    losses = []
    for _ in range(50):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(clf(near[masks[0]]), y[masks[0]]).backward()
        opt.step()
        with torch.no_grad():
            losses.append(float(torch.nn.functional.cross_entropy(clf(near[masks[1]]), y[masks[1]])))
    assert a["val_loss"] == pytest.approx(min(losses), rel=1e-6)


def test_pretraining_beats_raw_features_and_random_encoder_and_is_deterministic(graph):
    cfg = GraphSSLConfig(EncoderConfig(hidden_dim=32, num_layers=2), optim=OptimConfig(epochs=40, lr=5e-3))
    model, result = pretrain_graph(graph.x, graph.edge_index, cfg)
    hist = [r["loss"] for r in result.history if "loss" in r]
    assert hist[-1] < hist[0]
    masks = (graph.y, graph.train_mask, graph.val_mask, graph.test_mask)
    trained = linear_probe(embed(model, graph.x, graph.edge_index), *masks)["test_acc"]
    torch.manual_seed(0)
    untrained = linear_probe(embed(GraphSSLModel(64, cfg), graph.x, graph.edge_index), *masks)["test_acc"]
    raw = linear_probe(graph.x, *masks)["test_acc"]
    assert trained > raw + 0.08 and trained > untrained
    model2, _ = pretrain_graph(graph.x, graph.edge_index, cfg)
    torch.testing.assert_close(embed(model2, graph.x, graph.edge_index), embed(model, graph.x, graph.edge_index))


def test_save_load_roundtrip_and_multi_seed(tmp_path, graph):
    cfg = GraphSSLConfig(EncoderConfig(hidden_dim=16, num_layers=1, attention=True, heads=2),
                         optim=OptimConfig(epochs=3))
    model, _ = pretrain_graph(graph.x, graph.edge_index, cfg)
    save_ssl_model(model, tmp_path)
    assert load_ssl_model(tmp_path).cfg == cfg
    torch.testing.assert_close(embed(load_ssl_model(tmp_path), graph.x, graph.edge_index),
                               embed(model, graph.x, graph.edge_index))
    res = ssl_probe(graph, cfg, seeds=[0, 1], **{f"probe_{k}": v for k, v in ONE_PROBE.items()})
    assert len(res["runs"]) == 2 and res["split"] == {"train_mask": 40, "val_mask": 50, "test_mask": 100}
    accs = [100 * r["test_acc"] for r in res["runs"]]
    assert res["mean"] == pytest.approx(sum(accs) / 2) and res["std"] == pytest.approx(abs(accs[0] - accs[1]) / 2)
    assert res["val_mean"] == pytest.approx(sum(100 * r["val_acc"] for r in res["runs"]) / 2)
    assert res["curve"] == [] and res["seeds"] == [0, 1] and res["epochs"] == 3


def test_probe_curve_leaves_training_unchanged(graph):
    """Probing during pre-training (dropout on, so the RNG matters) must not change the trained
    model; points come every `probe_every` epochs plus the last, the last one is the final
    model's probe, and ssl_probe averages the curves over seeds."""
    cfg = GraphSSLConfig(EncoderConfig(hidden_dim=16, num_layers=1, dropout=0.3), optim=OptimConfig(epochs=5))
    plain, _ = pretrain_graph(graph.x, graph.edge_index, cfg)
    cb = ProbeCurve(graph, 2, 0, ONE_PROBE)
    probed, _ = pretrain_graph(graph.x, graph.edge_index, cfg, callbacks=[cb], log_every=2)
    torch.testing.assert_close(embed(probed, graph.x, graph.edge_index), embed(plain, graph.x, graph.edge_index))
    assert [p["epoch"] for p in cb.points] == [2, 4, 5]
    res = ssl_probe(graph, cfg, seeds=[0, 1], probe_every=2, **{f"probe_{k}": v for k, v in ONE_PROBE.items()})
    for run in res["runs"]:
        assert (run["curve"][-1]["val_acc"], run["curve"][-1]["test_acc"]) == (run["val_acc"], run["test_acc"])
    last = res["curve"][-1]
    assert [r["epoch"] for r in res["curve"]] == [2, 4, 5] and last["seeds"] == 2
    assert last["test_acc_mean"] == pytest.approx(res["mean"]) and last["test_acc_std"] == pytest.approx(res["std"])
    with pytest.raises(ValueError, match="probe every"):
        ProbeCurve(graph, 0, 0, {})


def test_empty_graph_is_refused():
    with pytest.raises(ValueError, match="empty"):
        pretrain_graph(torch.zeros(0, 4), torch.zeros(2, 0, dtype=torch.long), GraphSSLConfig())
