"""Masked edge reconstruction (MaskGAE): edge masking, non-edge sampling, the BCE loss against
a hand computation, and the objective's edge / degree terms rebuilt by hand."""

import math

import pytest
import torch

from autoglm.graph.augment import mask_edges, sample_non_edges
from autoglm.graph.config import EncoderConfig, GraphSSLConfig, LossConfig
from autoglm.graph.datasets import sbm_graph
from autoglm.graph.losses import masked_edge_loss
from autoglm.graph.ssl import GraphSSLModel, GraphSSLObjective, pretrain_graph
from autoglm.settings import ConfigError, load_config


@pytest.fixture(scope="module")
def graph():
    return sbm_graph(num_nodes=200, num_blocks=4, num_features=32, p_in=0.1, p_out=0.005, seed=2)


def _pairs(ei):
    return {(min(a, b), max(a, b)) for a, b in ei.t().tolist()}


def test_mask_edges_removes_both_directions_of_a_share_of_the_pairs(graph):
    ei = graph.edge_index
    kept, masked = mask_edges(ei, 200, p=0.3, generator=torch.Generator().manual_seed(0))
    all_pairs, kept_pairs, masked_pairs = _pairs(ei), _pairs(kept), _pairs(masked)
    assert masked_pairs <= all_pairs and not (masked_pairs & kept_pairs)  # a masked pair is gone both ways
    assert kept_pairs | masked_pairs == all_pairs and len(masked_pairs) == masked.shape[1]
    assert kept.shape[1] + 2 * masked.shape[1] == ei.shape[1]  # undirected input: nothing else dropped
    assert abs(masked.shape[1] / len(all_pairs) - 0.3) < 0.06
    assert mask_edges(ei, 200, p=0.3, training=False)[0] is ei
    with pytest.raises(ValueError, match="probability"):
        mask_edges(ei, 200, p=1.5)


def test_sample_non_edges_are_not_edges_in_either_direction(graph):
    neg = sample_non_edges(graph.edge_index, 200, 500, generator=torch.Generator().manual_seed(0))
    assert neg.shape == (2, 500) and bool((neg[0] != neg[1]).all())
    assert not (_pairs(neg) & _pairs(graph.edge_index))
    # a complete graph has no non-edge: fewer (here none) rather than wrong ones
    full = torch.tensor([[0, 1, 0, 2, 1, 2], [1, 0, 2, 0, 2, 1]])
    assert sample_non_edges(full, 3, 4, generator=torch.Generator().manual_seed(0)).shape == (2, 0)


def test_masked_edge_loss_matches_hand_computed_bce():
    pos, neg = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([-3.0, 0.0])
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    hand = (-(math.log(sig(2.0)) + math.log(sig(-1.0)) + math.log(sig(0.5))) / 3
            - (math.log(1 - sig(-3.0)) + math.log(1 - sig(0.0))) / 2)
    assert float(masked_edge_loss(pos, neg)) == pytest.approx(hand, rel=1e-6)
    assert float(masked_edge_loss(pos, neg[:0])) == pytest.approx(-sum(math.log(sig(v)) for v in (2, -1, .5)) / 3,
                                                                  rel=1e-6)


def test_objective_edge_and_degree_terms_by_hand(graph):
    cfg = GraphSSLConfig(EncoderConfig(hidden_dim=16, num_layers=2),
                         loss=LossConfig(contrastive_weight=0.0, reconstruction_weight=0.0, decorrelation_weight=0.0,
                                         edge_weight=1.5, edge_mask_rate=0.2, degree_weight=0.1))
    model = GraphSSLModel(32, cfg)
    out = GraphSSLObjective(cfg)(model, {"x": graph.x, "edge_index": graph.edge_index, "step": 4})
    gen = torch.Generator().manual_seed(4)  # optim.seed 0 * 1_000_003 + step
    kept, pos = mask_edges(graph.edge_index, 200, 0.2, generator=gen)
    neg = sample_non_edges(graph.edge_index, 200, pos.shape[1], generator=gen)
    h = model.encoder(x=graph.x, edge_index=kept)
    h = (h - h.mean(-1, keepdim=True)) / (h.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()  # layer norm
    lp = model.edge_decoder(h[pos[0]] * h[pos[1]]).squeeze(-1)
    ln = model.edge_decoder(h[neg[0]] * h[neg[1]]).squeeze(-1)
    edge = (-torch.log(torch.sigmoid(lp))).mean() + (-torch.log(1 - torch.sigmoid(ln))).mean()
    target = torch.zeros(200).index_add_(0, pos.reshape(-1), torch.ones(pos.numel()))
    deg = (model.degree_decoder(h).squeeze(-1) - target).pow(2).mean()
    torch.testing.assert_close(out["edge_loss"], edge.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["degree_loss"], deg.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["loss"], 1.5 * edge + 0.1 * deg, rtol=1e-5, atol=1e-6)


def test_edge_term_leaves_other_terms_and_default_model_unchanged(graph):
    base = GraphSSLConfig(EncoderConfig(hidden_dim=16, num_layers=1))
    with_edge = load_config(GraphSSLConfig, overrides={"encoder.hidden_dim": 16, "encoder.num_layers": 1,
                                                       "loss.edge_weight": 1.0})
    assert not hasattr(GraphSSLModel(32, base), "edge_decoder") or GraphSSLModel(32, base).edge_decoder is None
    torch.manual_seed(0)
    m1 = GraphSSLModel(32, base)
    torch.manual_seed(0)
    m2 = GraphSSLModel(32, with_edge)
    m2.load_state_dict({k: v for k, v in m1.state_dict().items()}, strict=False)
    batch = {"x": graph.x, "edge_index": graph.edge_index, "step": 1}
    a, b = GraphSSLObjective(base)(m1, batch), GraphSSLObjective(with_edge)(m2, batch)
    for k in ("contrastive_loss", "reconstruction_loss", "decorrelation_loss"):
        torch.testing.assert_close(a[k], b[k])  # the edge term draws its masks after the others
    torch.testing.assert_close(b["loss"], a["loss"] + b["edge_loss"], rtol=1e-5, atol=1e-5)


def test_edge_only_pretraining_learns_to_score_held_out_edges(graph):
    cfg = load_config(GraphSSLConfig, overrides={"encoder.hidden_dim": 32, "loss.contrastive_weight": 0,
                                                 "loss.reconstruction_weight": 0, "loss.decorrelation_weight": 0,
                                                 "loss.edge_weight": 1, "optim.epochs": 30, "optim.lr": 0.01})
    model, res = pretrain_graph(graph.x, graph.edge_index, cfg, device="cpu")
    first, last = res.history[0]["edge_loss"], res.history[-1]["edge_loss"]
    assert last < first
    kept, pos = mask_edges(graph.edge_index, 200, 0.2, generator=torch.Generator().manual_seed(99))
    neg = sample_non_edges(graph.edge_index, 200, pos.shape[1], generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        h = model.encoder(graph.x, kept)
        sp, sn = model.score_edges(h, pos), model.score_edges(h, neg)
    auc = (sp.unsqueeze(1) > sn.unsqueeze(0)).float().mean()
    assert auc > 0.7, auc  # random scores give 0.5; an SBM's held-out edges are mostly within a block


def test_config_checks_of_the_edge_term():
    with pytest.raises(ConfigError, match="edge_mask_rate must be > 0"):
        load_config(GraphSSLConfig, overrides={"loss.edge_weight": 1, "loss.edge_mask_rate": 0})
    with pytest.raises(ConfigError, match="must be >= 0 and not all 0"):
        load_config(GraphSSLConfig, overrides={"loss.contrastive_weight": 0, "loss.reconstruction_weight": 0,
                                               "loss.decorrelation_weight": 0})
