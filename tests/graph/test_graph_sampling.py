"""Neighbour sampling: real edges only, fanout bounds, seeds first; sampled pre-training runs."""

import pytest
import torch

from autoglm.graph.config import EncoderConfig, GraphSSLConfig, OptimConfig
from autoglm.graph.datasets import sbm_graph
from autoglm.graph.sampling import build_csr, pretrain_graph_sampled, sample_subgraph, sampled_steps, step_seeds


def test_csr_matches_edge_list():
    ei = torch.randint(0, 30, (2, 200))
    rowptr, col = build_csr(ei, 30)
    for i in range(30):
        assert sorted(col[rowptr[i]:rowptr[i + 1]].tolist()) == sorted(ei[0, ei[1] == i].tolist())


def test_sampled_subgraph_is_real_and_bounded():
    g = sbm_graph(300, 3, 8, 0.05, 0.01, seed=2)
    edges = set(map(tuple, g.edge_index.t().tolist()))
    seeds = torch.tensor([5, 17, 42])
    nodes, sub = sample_subgraph(build_csr(g.edge_index, 300), seeds, [4, 3], torch.Generator().manual_seed(0))
    assert nodes[:3].tolist() == sorted(seeds.tolist()) and nodes.unique().numel() == nodes.numel()
    assert all((int(nodes[s]), int(nodes[t])) in edges for s, t in sub.t().tolist())
    assert nodes.numel() <= 3 + 3 * 4 + 3 * 4 * 3
    into_seeds = (sub[1] < 3).sum().item()
    assert 0 < into_seeds <= 3 * 4
    a = sample_subgraph(build_csr(g.edge_index, 300), seeds, [4, 3], torch.Generator().manual_seed(0))
    assert torch.equal(a[0], nodes) and torch.equal(a[1], sub)


def test_sampled_pretraining_reduces_loss():
    g = sbm_graph(400, 4, 32, 0.05, 0.005, feature_signal=0.3, seed=3)
    cfg = GraphSSLConfig(EncoderConfig(hidden_dim=16, num_layers=2),
                         optim=OptimConfig(epochs=5, lr=5e-3, batch_size=64, fanouts=(5, 5)))
    model, res = pretrain_graph_sampled(g.x, g.edge_index, cfg)
    assert res.steps == sampled_steps(400, 64, 5) == 35  # ceil(400 / 64) = 7 steps per epoch
    losses = [r["loss"] for r in res.history if "loss" in r]
    assert losses[-1] < losses[0]
    assert model(g.x, g.edge_index).shape == (400, 16)


def test_each_epoch_visits_every_node_once_in_a_new_order():
    epochs = [torch.cat([step_seeds(100, 30, 0, e * 4 + k) for k in range(4)]) for e in range(2)]
    assert [len(step_seeds(100, 30, 0, k)) for k in range(4)] == [30, 30, 30, 10]
    for order in epochs:
        assert sorted(order.tolist()) == list(range(100))
    assert not torch.equal(epochs[0], epochs[1])
    assert torch.equal(step_seeds(100, 30, 0, 5), step_seeds(100, 30, 0, 5))  # a pure function of the step


def test_max_steps_stops_early_and_batch_size_is_required():
    g = sbm_graph(100, 2, 8, 0.1, 0.01, seed=0)
    cfg = GraphSSLConfig(EncoderConfig(hidden_dim=8, num_layers=1), optim=OptimConfig(epochs=2, batch_size=30))
    _, res = pretrain_graph_sampled(g.x, g.edge_index, cfg, max_steps=3)
    assert res.steps == 3 < sampled_steps(100, 30, 2) == 8
    with pytest.raises(ValueError, match="batch_size"):
        pretrain_graph_sampled(g.x, g.edge_index, GraphSSLConfig())
