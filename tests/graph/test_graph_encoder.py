"""Encoder vs a dense reference; attention vs a naive per-node loop; dynamic-graph mode."""

import pytest
import torch

from autoglm.graph.encoder import GraphEncoder, input_linear, normalized_adjacency


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


@pytest.mark.parametrize("residual,final_act", [(False, True), (True, True), (False, False)])
def test_no_input_projection_matches_pyg_gcnconv(residual, final_act):
    """input_projection=False: layer 1 reads x directly (F -> D, never residual), later layers
    follow `residual`; final_act=False: no activation after the last layer; checked against
    PyG's GCNConv with the same weights."""
    from torch_geometric.nn import GCNConv

    x, ei = _graph()
    ei = ei[:, ei[0] != ei[1]]  # GCNConv adds one self-loop per node; ours does the same
    enc = GraphEncoder(5, 8, num_layers=3, residual=residual, input_projection=False, final_act=final_act).eval()
    assert enc.input is None and enc.layers[0].lin.weight.shape == (8, 5)
    h = x
    for i, layer in enumerate(enc.layers):
        conv = GCNConv(layer.lin.in_features, 8)
        with torch.no_grad():
            conv.lin.weight.copy_(layer.lin.weight)
            conv.bias.copy_(layer.bias)
        out = conv(h, ei)
        out = layer.act(out) if final_act or i < 2 else out
        h = h + out if residual and i > 0 else out
    torch.testing.assert_close(enc(x, ei), h)
    states = enc.forward_sequence([(x, ei), (x, ei)])  # the state is added to layer 1's output
    assert states[1].shape == (12, 8) and not torch.allclose(states[1], states[0])


def test_glorot_init_scale():
    """init="glorot": Var = 2 / (fan_in + fan_out) (Xavier-uniform); "torch": nn.Linear's
    kaiming-uniform, Var = 1 / (3 fan_in)."""
    for init, var in (("glorot", 2 / (300 + 200)), ("torch", 1 / (3 * 300))):
        enc = GraphEncoder(300, 200, num_layers=2, residual=False, input_projection=False, init=init)
        w = enc.layers[0].lin.weight.detach()
        assert w.shape == (200, 300)
        assert abs(float(w.var()) / var - 1) < 0.05, (init, float(w.var()), var)
    with pytest.raises(ValueError, match="init 'he'"):
        GraphEncoder(5, 8, init="he")


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
    with pytest.raises(ValueError, match="needs input_projection=True"):
        GraphEncoder(5, 8, propagate_input=True, input_projection=False)


# --- sparse first projection (input_linear): the dense product is the reference ----------------
def _bag_of_words(n=300, f=400, density=0.02, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, f, generator=g) < density).float() * torch.rand(n, f, generator=g)


@pytest.mark.parametrize("input_projection", [False, True])
def test_sparse_input_matches_dense(monkeypatch, input_projection):
    """Bag-of-words features through the sparse matmul give the dense encoder's output and
    parameter gradients; masked rows read through `replace` equal the materialised copy."""
    import autoglm.graph.encoder as encm

    x = _bag_of_words()
    ei = torch.randint(0, 300, (2, 1200), generator=torch.Generator().manual_seed(1))
    mask = torch.rand(300, generator=torch.Generator().manual_seed(2)) < 0.5
    token = torch.nn.Parameter(torch.randn(1, 400) * 0.1)
    torch.manual_seed(0)
    enc = GraphEncoder(400, 32, num_layers=2, residual=False, input_projection=input_projection)

    def run(dense: bool):
        monkeypatch.setattr(encm, "SPARSE_INPUT_DENSITY", -1.0 if dense else 0.1)
        enc.zero_grad()
        token.grad = None
        if dense:  # the reference: the masked copy of x, built in full
            out = enc(torch.where(mask[:, None], token.expand_as(x), x), ei)
        else:
            out = enc(x, ei, replace=(mask, token))
        (out.pow(2).sum()).backward()
        return out.detach(), [p.grad.clone() for p in enc.parameters() if p.grad is not None], token.grad.clone()

    calls = []
    real = torch.sparse.mm
    monkeypatch.setattr(torch.sparse, "mm", lambda *a: calls.append(1) or real(*a))
    ref, ref_grads, ref_tok = run(dense=True)
    assert not calls
    out, grads, tok = run(dense=False)
    assert calls, "the sparse path did not run"
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tok, ref_tok, rtol=1e-4, atol=1e-5)
    assert len(grads) == len(ref_grads)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_dense_input_stays_dense(monkeypatch):
    """Features that are not mostly zeros, or that need a gradient, take the dense product."""
    calls = []
    real = torch.sparse.mm
    monkeypatch.setattr(torch.sparse, "mm", lambda *a: calls.append(1) or real(*a))
    lin = torch.nn.Linear(400, 8)
    x = torch.randn(300, 400)
    torch.testing.assert_close(input_linear(x, lin), lin(x))
    xs = _bag_of_words().requires_grad_()
    torch.testing.assert_close(input_linear(xs, lin), lin(xs))
    assert not calls
