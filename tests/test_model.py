"""The causal LM against independent references: other kernels, dense attention, a full
forward vs incremental decoding, HF save/load, hand-computed losses, finite differences
of behaviour (checkpointing, autocast)."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, DynamicCache

import autoglm  # noqa: F401  (registers the Auto* classes)
from autoglm import OpenAutoGLMConfig, OpenAutoGLMForCausalLM

# Large init so that a random model has non-degenerate (non-repeating) greedy outputs and
# clear argmax margins; the relative-position bias starts at zero, so randomise it too.
INIT = 0.2


def make_model(name: str = "tiny", seed: int = 0, **overrides) -> OpenAutoGLMForCausalLM:
    torch.manual_seed(seed)
    if name.endswith("-relative"):  # the learned windowed relative bias instead of rotary
        name, overrides = name.removesuffix("-relative"), {**overrides, "position": "relative"}
    model = OpenAutoGLMForCausalLM(OpenAutoGLMConfig.from_name(name, initializer_range=INIT, **overrides))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "rel_bias" in n:
                p.normal_(0.0, 0.05)  # x scale 10 -> ~0.5 logits of positional bias
    return model.eval()


def clone_with(model: OpenAutoGLMForCausalLM, **overrides) -> OpenAutoGLMForCausalLM:
    """Same weights, different config fields (e.g. kernel or dispatch)."""
    cfg = OpenAutoGLMConfig.from_dict({**model.config.to_dict(), **overrides})
    other = OpenAutoGLMForCausalLM(cfg)
    other.load_state_dict(model.state_dict(), strict=True)
    return other.eval()


def ids(B, T, vocab=512, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (B, T), generator=g)  # avoid eos (0) and pad (1)


def logits_of(model, x, **kw):
    with torch.no_grad():
        return model(x, **kw).logits


# ------------------------------------------------------------------ kernels agree
@pytest.mark.parametrize("T", [45, 77])
@pytest.mark.parametrize("chunk", [0, 12])
@pytest.mark.parametrize("position", ["rope", "relative"])
def test_attn_impls_agree_on_whole_model(T, chunk, position):
    base = make_model("tiny", attn_impl="dense", attn_chunk_size=chunk, position=position)
    x = ids(2, T)
    ref = logits_of(base, x)
    for impl in ("chunked", "flex"):
        other = clone_with(base, attn_impl=impl)
        torch.testing.assert_close(logits_of(other, x), ref, atol=1e-4, rtol=1e-4)


def test_sparse_with_full_window_equals_dense():
    T = 50
    sparse = make_model("tiny", window_size=64, num_global_tokens=0, position="absolute",
                        max_position_embeddings=64)
    dense = clone_with(sparse, attention="dense")
    assert dense.model.layers[0].self_attn.window is None
    x = ids(2, T)
    ref = logits_of(dense, x)
    for impl in ("chunked", "flex", "dense"):
        torch.testing.assert_close(logits_of(clone_with(sparse, attn_impl=impl), x), ref, atol=1e-4, rtol=1e-4)
    # window == T exactly
    x = ids(1, 64, seed=3)
    torch.testing.assert_close(logits_of(sparse, x), logits_of(dense, x), atol=1e-4, rtol=1e-4)
    # control: a smaller window really changes the function
    narrow = clone_with(sparse, window_size=8)
    assert (logits_of(narrow, x) - logits_of(dense, x)).abs().max() > 1e-2


def test_moe_dispatch_sorted_equals_dense():
    model = make_model("tiny", moe_dispatch="sorted")
    other = clone_with(model, moe_dispatch="dense")
    assert other.model.layers[0].mlp.dispatch == "dense"
    x = ids(3, 40)
    a, b = model(x), other(x)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a.aux_loss, b.aux_loss)


# ------------------------------------------------------------------- save / load
def test_save_load_round_trip(tmp_path):
    model = make_model("tiny")
    model.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert "model.safetensors" in files and "config.json" in files
    assert not any(f.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")) for f in files), files
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, OpenAutoGLMForCausalLM)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    for (n, p), (n2, p2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n == n2
        assert torch.equal(p, p2), n
    x = ids(2, 45)
    assert torch.equal(logits_of(model, x), logits_of(loaded, x))


# ---------------------------------------------------------------------- generate
def _count_forward_lengths(model):
    lengths = []
    handle = model.model.register_forward_pre_hook(lambda mod, args: lengths.append(args[0].shape[1]))
    return lengths, handle


GEN = dict(max_new_tokens=40, eos_token_id=None, pad_token_id=1)


@pytest.mark.parametrize("name", ["tiny", "standard-tiny"])
def test_greedy_generate_cache_equals_no_cache(name):
    model = make_model(name)
    prompt = ids(1, 12, seed=5)  # 12 + 40 tokens crosses the window of 32
    assert prompt.shape[1] + GEN["max_new_tokens"] > model.config.window_size
    lengths, h = _count_forward_lengths(model)
    with_cache = model.generate(prompt, do_sample=False, use_cache=True, **GEN)
    h.remove()
    assert lengths[0] == 12 and set(lengths[1:]) == {1}  # the cache really was used
    no_cache = model.generate(prompt, do_sample=False, use_cache=False, **GEN)
    assert with_cache.shape == (1, 52)
    assert with_cache.tolist() == no_cache.tolist()
    assert len(set(with_cache[0, 12:].tolist())) > 5  # not a degenerate repetition
    # and each greedy token is the argmax of a full forward over everything before it
    full = logits_of(model, with_cache[:, :-1])
    assert torch.equal(full[0, 11:].argmax(-1), with_cache[0, 12:])


@pytest.mark.parametrize("name", ["tiny", "standard-tiny"])
def test_sampled_generate_cache_equals_no_cache(name):
    model = make_model(name)
    prompt = ids(1, 12, seed=6)
    kw = dict(do_sample=True, top_k=50, top_p=0.9, temperature=0.8, **GEN)
    torch.manual_seed(123)
    a = model.generate(prompt, use_cache=True, **kw)
    torch.manual_seed(123)
    b = model.generate(prompt, use_cache=False, **kw)
    assert a.shape == (1, 52)
    assert a.tolist() == b.tolist()


@pytest.mark.parametrize("name", ["tiny", "standard-tiny"])
def test_left_padded_batch_equals_alone(name):
    model = make_model(name)
    pad = model.config.pad_token_id
    prompts = [ids(1, 14, seed=7)[0], ids(1, 5, seed=8)[0], ids(1, 9, seed=9)[0]]
    T = max(len(p) for p in prompts)
    batch = torch.full((len(prompts), T), pad)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        batch[i, T - len(p):] = p
        mask[i, T - len(p):] = 1
    out = model.generate(batch, attention_mask=mask, do_sample=False, **GEN)
    for i, p in enumerate(prompts):
        alone = model.generate(p[None], do_sample=False, **GEN)
        assert out[i, T - len(p):].tolist() == alone[0].tolist(), f"row {i}"


@pytest.mark.parametrize("name,impl", [("tiny", "chunked"), ("tiny", "flex"), ("tiny", "dense"),
                                       ("tiny-relative", "chunked"), ("tiny-relative", "dense"),
                                       ("standard-tiny", "auto")])
def test_incremental_dynamic_cache_equals_full_forward(name, impl):
    model = make_model(name, attn_impl=impl)
    x = ids(2, 70)
    full = logits_of(model, x)
    cache = DynamicCache(config=model.config)
    steps = [20, 7] + [1] * 13 + [30]  # crosses the window (32) in the single-token phase
    parts, start = [], 0
    with torch.no_grad():
        for n in steps:
            out = model(x[:, start:start + n], past_key_values=cache, use_cache=True)
            parts.append(out.logits)
            start += n
    assert start == x.shape[1] and cache.get_seq_length() == x.shape[1]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- context length
@pytest.mark.parametrize("name", ["tiny", "standard-tiny"])
def test_too_long_raises_then_extend_context(name):
    model = make_model(name, max_position_embeddings=64)
    L = model.config.max_position_embeddings
    x = ids(1, L + 10)
    with pytest.raises(ValueError, match="extend_context"):
        model(x)
    model.extend_context(2 * L)
    assert model.config.max_position_embeddings == 2 * L
    out = logits_of(model, ids(1, 2 * L))
    assert out.shape == (1, 2 * L, model.config.vocab_size) and torch.isfinite(out).all()
    with pytest.raises(ValueError):
        model.extend_context(L)  # only grows


def _periodic_batch(B, T, vocab, period, gen):
    pattern = torch.randint(0, vocab, (B, period), generator=gen)
    offset = torch.randint(0, period, (B, 1), generator=gen)
    col = (torch.arange(T)[None] + offset) % period
    return pattern.gather(1, col)


@pytest.mark.slow  # trains two models for ~20 s each
@pytest.mark.parametrize("position", ["rope", "relative"])
def test_position_encoding_extends_to_twice_the_trained_length(position):
    V, L, period = 64, 64, 9
    torch.manual_seed(0)
    cfg = OpenAutoGLMConfig.from_name("tiny", vocab_size=V, max_position_embeddings=L, window_size=16,
                                      position=position)
    model = OpenAutoGLMForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(300):
        x = _periodic_batch(16, L, V, period, gen)
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()

    def eval_loss(T):  # per-position next-token loss, (T - 1,)
        x = _periodic_batch(64, T, V, period, torch.Generator().manual_seed(1))
        logits = logits_of(model, x)
        per = F.cross_entropy(logits[:, :-1].reshape(-1, V), x[:, 1:].reshape(-1), reduction="none")
        return per.view(64, T - 1).mean(0)

    per_L = eval_loss(L)
    model.extend_context(2 * L)
    per_2L = eval_loss(2 * L)
    loss_L, loss_2L = float(per_L.mean()), float(per_2L.mean())
    assert loss_L < 0.5 * math.log(V), loss_L
    assert loss_2L < 0.5 * math.log(V), loss_2L
    assert loss_2L <= loss_L * 1.15 + 0.05, (loss_L, loss_2L)
    # the positions never seen in training (L .. 2L-1) are predicted as well as the trained
    # ones once the first period has been seen
    seen, unseen = float(per_L[period:].mean()), float(per_2L[L - 1:].mean())
    assert unseen <= seen * 1.15 + 0.05, (seen, unseen)


# ------------------------------------------------------------------- training
def _grads(model, x):
    model.zero_grad(set_to_none=True)
    model(x, labels=x).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_same_grads():
    model = make_model("tiny").train()
    x = ids(2, 45)
    ref = _grads(model, x)
    calls = []
    import autoglm.model as backbone_module

    real = backbone_module.checkpoint

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    backbone_module.checkpoint = spy
    try:
        model.model.gradient_checkpointing = True
        got = _grads(model, x)
    finally:
        backbone_module.checkpoint = real
    assert len(calls) == model.config.num_hidden_layers  # checkpointing really ran
    assert ref.keys() == got.keys() and len(ref) == len(list(model.parameters()))
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], atol=1e-6, rtol=1e-5, msg=n)


def test_hf_activation_checkpointing_api_sets_the_flag():
    """The transformers API (used by Trainer(gradient_checkpointing=True) and PEFT) must work too."""
    model = make_model("tiny").train()
    x = ids(2, 45)
    ref = _grads(model, x)
    model.activation_checkpointing_enable()
    assert model.model.gradient_checkpointing is True
    got = _grads(model, x)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], atol=1e-6, rtol=1e-5, msg=n)
    model.activation_checkpointing_disable()
    assert model.model.gradient_checkpointing is False


def _hand_aux(routing, cfg):
    E = cfg.num_experts
    total = 0.0
    for r in routing:
        probs = r.logits.float().softmax(-1)  # (N, E)
        N, k = r.topk_idx.shape
        frac = torch.stack([(r.topk_idx == e).sum() for e in range(E)]).float() / (N * k)
        balance = E * (frac * probs.mean(0)).sum()
        z = (r.logits.float().exp().sum(-1).log() ** 2).mean()
        total = total + cfg.router_aux_loss_coef * balance + cfg.router_z_loss_coef * z
    return total / len(routing)


def test_aux_loss_and_lm_loss_hand_computed():
    model = make_model("tiny", router_aux_loss_coef=0.1, router_z_loss_coef=0.01)
    x = ids(2, 33)
    labels = x.clone()
    labels[0, 5:9] = -100
    out = model(x, labels=labels)
    n_moe = sum(model.config.is_moe_layer(i) for i in range(model.config.num_hidden_layers))
    assert len(out.routing) == n_moe == 2
    assert out.routing[0].logits.shape == (2 * 33, model.config.num_experts)
    aux = _hand_aux(out.routing, model.config)
    torch.testing.assert_close(out.aux_loss, aux, atol=1e-6, rtol=1e-5)
    V = model.config.vocab_size
    ce = F.cross_entropy(out.logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, ce + aux, atol=1e-5, rtol=1e-5)


def test_dense_model_has_no_aux_loss():
    model = make_model("standard-tiny")
    x = ids(1, 20)
    out = model(x, labels=x)
    assert not out.routing and out.aux_loss is None
    V = model.config.vocab_size
    ce = F.cross_entropy(out.logits[:, :-1].reshape(-1, V), x[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, ce, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["tiny", "standard-tiny"])
def test_bf16_autocast_close_to_fp32(name):
    torch.manual_seed(0)
    model = OpenAutoGLMForCausalLM(OpenAutoGLMConfig.from_name(name)).eval()  # default init
    x = ids(2, 45)
    ref = logits_of(model, x)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(x).logits
    assert low.dtype == torch.bfloat16  # autocast really ran in bf16
    assert torch.isfinite(low).all()
    err = (low.float() - ref).abs().max()
    assert err < 0.05 * ref.abs().max() + 1e-2, (float(err), float(ref.abs().max()))


@pytest.mark.parametrize("preset", ["tiny", "standard-tiny"])
def test_generate_with_a_static_cache_matches_the_dynamic_cache(preset):
    """HF's static cache (`cache_implementation="static"`, the setting HF's compiled generation
    uses) returns all its slots and a length tensor that moves in place: greedy tokens equal the
    dynamic cache's, for an unpadded and a left-padded batch."""
    torch.manual_seed(0)
    model = OpenAutoGLMForCausalLM(OpenAutoGLMConfig.from_name(preset)).eval()
    ids = torch.randint(2, 500, (2, 20), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :6] = 0  # row 1 is left-padded
    for m in (torch.ones_like(ids), mask):
        kw = dict(attention_mask=m, max_new_tokens=8, min_new_tokens=8, do_sample=False, eos_token_id=None,
                  pad_token_id=0)
        with torch.inference_mode():
            ref = model.generate(ids, **kw)
            out = model.generate(ids, cache_implementation="static", **kw)
        assert torch.equal(out, ref)


@pytest.mark.parametrize("position", ["rope", "absolute"])
def test_inputs_embeds_equal_the_token_ids_path(position):
    """`inputs_embeds` (the model's own embedding of the ids, as a soft-prompt or image-prefix
    caller would pass) gives the logits of `input_ids`, with a left-padded batch too (positions
    from the mask), and greedy `generate(inputs_embeds=...)` continues as `generate(input_ids)`."""
    model = make_model("tiny", position=position)
    x = ids(2, 12)
    mask = torch.ones_like(x)
    mask[1, :4] = 0  # row 1 left-padded
    emb = model.get_input_embeddings()(x)
    for kw in ({}, {"attention_mask": mask}):
        with torch.no_grad():
            ref = model(input_ids=x, **kw).logits
            got = model(inputs_embeds=emb, **kw).logits
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    ref = model.generate(x[:1], do_sample=False, **GEN)[:, x.shape[1]:]
    got = model.generate(inputs_embeds=emb[:1], do_sample=False, **GEN)  # new tokens only (HF convention)
    assert got.tolist() == ref.tolist()
    with pytest.raises(ValueError, match="exactly one of input_ids .* got neither"):
        model(attention_mask=mask)
    with pytest.raises(ValueError, match=r"inputs_embeds must be \(batch, sequence, 64\)"):
        model(inputs_embeds=emb[..., :8])
