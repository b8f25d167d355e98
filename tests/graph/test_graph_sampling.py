"""Neighbour sampling: real edges only, fanout bounds, seeds first; sampled pre-training runs."""

import torch

from autoglm.graph.datasets import sbm_graph
from autoglm.graph.sampling import build_csr, pretrain_graph_sampled, sample_subgraph
from autoglm.graph.ssl import GraphSSLConfig


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
    cfg = GraphSSLConfig(hidden_dim=16, num_layers=2, mask_rate=0.5)
    model, res = pretrain_graph_sampled(g.x, g.edge_index, cfg, steps=30, batch_size=64, fanouts=(5, 5), lr=5e-3)
    losses = [r["loss"] for r in res.history if "loss" in r]
    assert losses[-1] < losses[0]
    assert model(g.x, g.edge_index).shape == (400, 16)
