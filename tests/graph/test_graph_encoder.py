"""Encoder vs a dense reference; attention vs a naive per-node loop; dynamic-graph mode."""

import pytest
import torch

from autoglm.graph.encoder import GraphEncoder, normalized_adjacency


def _graph(n=12, e=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    ei = torch.randint(0, n, (2, e), generator=g)
    return torch.randn(n, 5, generator=g), ei


def _dense_norm_adj(ei, n):
    a = torch.zeros(n, n)
    for s, t in ei.t().tolist():
        if s != t:
            a[t, s] += 1.0
    a += torch.eye(n)
    d = a.sum(1).pow(-0.5)
    return d[:, None] * a * d[None, :]


def test_normalized_adjacency_matches_dense():
    x, ei = _graph()
    adj = normalized_adjacency(ei, 12)
    assert adj.layout == torch.sparse_csr
    torch.testing.assert_close(adj.to_dense(), _dense_norm_adj(ei, 12))


@pytest.mark.parametrize("propagate_input", [False, True])
def test_gcn_encoder_matches_dense_reference(propagate_input):
    x, ei = _graph()
    enc = GraphEncoder(5, 8, num_layers=3, propagate_input=propagate_input).eval()
    a = _dense_norm_adj(ei, 12)
    h = a @ enc.input(x) if propagate_input else enc.input(x)
    for layer in enc.layers:  # h_l = h_{l-1} + act(A h_{l-1} W_l + b)
        h = h + layer.act(a @ h @ layer.lin.weight.t() + layer.bias)
    torch.testing.assert_close(enc(x, ei), h)


def _naive_attention(hw, ei, att_src, att_dst, n):
    """GAT aggregation as a per-node, per-head loop. hw (n, H*C) -> (n, H*C)."""
    heads = att_src.shape[0]
    hw = hw.view(n, heads, -1)
    edges = [(s, t) for s, t in ei.t().tolist() if s != t] + [(i, i) for i in range(n)]
    out = torch.zeros_like(hw)
    for i in range(n):
        nbrs = [s for s, t in edges if t == i]
        for hd in range(heads):
            e = torch.stack([torch.nn.functional.leaky_relu(
                (hw[j, hd] * att_src[hd]).sum() + (hw[i, hd] * att_dst[hd]).sum(), 0.2) for j in nbrs])
            a = e.softmax(0)
            out[i, hd] = sum(a[k] * hw[j, hd] for k, j in enumerate(nbrs))
    return out.view(n, -1)


def test_attention_encoder_matches_naive_loop():
    x, ei = _graph(n=7, e=20, seed=1)
    enc = GraphEncoder(5, 8, num_layers=1, attention=True, heads=2).eval()
    layer = enc.layers[0]
    h = enc.input(x)
    out = _naive_attention(h @ layer.lin.weight.t(), ei, layer.att_src, layer.att_dst, 7)
    ref = h + layer.act(out + layer.bias)
    torch.testing.assert_close(enc(x, ei), ref)


def test_attention_input_propagation_and_plain_layers_match_naive_loop():
    """propagate_input with attention: h_0 = attention-weighted mean of x W_in; residual=False:
    h_l = act(aggregate(h_{l-1}) W_l) with no identity path (GraphMAE's plain GAT)."""
    x, ei = _graph(n=7, e=20, seed=2)
    enc = GraphEncoder(5, 8, num_layers=2, attention=True, heads=2, propagate_input=True, residual=False).eval()
    ia = enc.input_attention
    h = _naive_attention(enc.input(x), ei, ia.att_src, ia.att_dst, 7)
    for layer in enc.layers:
        h = layer.act(_naive_attention(h @ layer.lin.weight.t(), ei, layer.att_src, layer.att_dst, 7) + layer.bias)
    torch.testing.assert_close(enc(x, ei), h)


def test_plain_gcn_layers_match_dense_reference():
    x, ei = _graph()
    enc = GraphEncoder(5, 8, num_layers=2, residual=False).eval()
    a = _dense_norm_adj(ei, 12)
    h = enc.input(x)
    for layer in enc.layers:
        h = layer.act(a @ h @ layer.lin.weight.t() + layer.bias)
    torch.testing.assert_close(enc(x, ei), h)


def test_gradients_flow_and_no_dense_matrix():
    x, ei = _graph()
    enc = GraphEncoder(5, 8, 2)
    enc(x, ei).sum().backward()
    assert all(p.grad is not None for p in enc.parameters())


def test_dynamic_mode_carries_state():
    x, ei = _graph()
    _, ei2 = _graph(seed=5)
    enc = GraphEncoder(5, 8, 2).eval()
    states = enc.forward_sequence([(x, ei), (x, ei2)])
    first = enc(x, ei)
    torch.testing.assert_close(states[0], first)
    torch.testing.assert_close(states[1], enc(x, ei2, state=first))
    assert not torch.allclose(states[1], enc(x, ei2))  # the carried state matters


def test_bad_inputs():
    x, ei = _graph()
    enc = GraphEncoder(5, 8, 2)
    with pytest.raises(ValueError, match="outside"):
        enc(x, ei.clamp(max=11) + 1)
    with pytest.raises(ValueError, match="5 input features"):
        enc(torch.randn(12, 4), ei)
    with pytest.raises(ValueError, match="divisible"):
        GraphEncoder(5, 6, attention=True, heads=4)
    with pytest.raises(ValueError, match="node set"):
        enc.forward_sequence([(x, ei), (x[:5], ei[:, :0])])
