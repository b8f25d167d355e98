"""ONNX export vs eager PyTorch: logits, KV-cache decode, dynamic axes, greedy and sampled generation."""

import json

import numpy as np
import onnx
import pytest
import torch

from autoglm.export import OrtCausalLM
from autoglm.export.wrapper import past_names, present_names
from autoglm.inference.request import SamplingParams
from autoglm.inference.sampling import sample_token


@pytest.fixture(scope="module")
def ort_lm(fp32_export):
    return OrtCausalLM(fp32_export, threads=1)


def test_layout_and_dynamic_axes(fp32_export, eager_model):
    files = sorted(p.name for p in fp32_export.iterdir())
    assert {"prefill.onnx", "decode.onnx", "weights.bin", "export.json", "config.json", "tokenizer.json"} <= set(files)
    L = eager_model.config.num_hidden_layers
    dec = onnx.load(str(fp32_export / "decode.onnx"), load_external_data=False)
    ins = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in dec.graph.input}
    outs = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in dec.graph.output}
    assert list(ins) == ["input_ids", "attention_mask"] + past_names(L)
    assert list(outs) == ["logits"] + present_names(L)
    assert ins["input_ids"] == ["batch", "sequence"]
    assert ins["past_key_values.0.key"][0] == "batch" and ins["past_key_values.0.key"][2] == "past_sequence"
    assert outs["present.1.value"][2] == "total_sequence"
    pre = onnx.load(str(fp32_export / "prefill.onnx"), load_external_data=False)
    assert [i.name for i in pre.graph.input] == ["input_ids", "attention_mask"]
    # no data-dependent routing made it into the graphs (static dense MoE dispatch)
    ops = {n.op_type for n in dec.graph.node} | {n.op_type for n in pre.graph.node}
    assert not ops & {"NonZero", "Loop", "If"}
    # the weights are stored once for both graphs, and the tied embedding / LM head once: one
    # (V, d) table (the Gather reads it, the LM head reads Transpose(it)), so weights.bin is no
    # larger than the model's parameters (parameters() counts the tied table once)
    n_bytes = sum(p.numel() * 4 for p in eager_model.parameters())
    assert (fp32_export / "weights.bin").stat().st_size <= 1.01 * n_bytes
    W = eager_model.get_input_embeddings().weight.detach().numpy()  # (V, d), tied to the LM head
    for graph in ("decode", "prefill"):
        m = onnx.load(str(fp32_export / f"{graph}.onnx"))
        inits = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
        copies = [n for n, a in inits.items() if a.shape in (W.shape, W.T.shape)
                  and np.array_equal(a.reshape(-1), (W if a.shape == W.shape else W.T).reshape(-1))]
        assert len(copies) == 1
        readers = {n.op_type: n for n in m.graph.node if copies[0] in n.input}
        assert sorted(readers) == ["Gather", "Transpose"]
        lm_head = [n for n in m.graph.node if readers["Transpose"].output[0] in n.input]
        assert [n.op_type for n in lm_head] == ["MatMul"] and lm_head[0].output[0] == "logits"
    info = json.loads((fp32_export / "export.json").read_text())
    assert max(info["parity_vs_eager"]["prefill_max_abs_diff"], info["parity_vs_eager"]["decode_max_abs_diff"]) <= 1e-4
    sizes = info["sizes"]
    assert (fp32_export / "weights.bin").stat().st_size / 1e6 <= sizes["safetensors_mb"]  # + the two graphs
    assert sizes["safetensors_over_onnx"] == pytest.approx(sizes["safetensors_mb"] / sizes["onnx_mb"])


@pytest.mark.parametrize("batch,length", [(1, 1), (4, 9), (2, 70)])
def test_prefill_and_decode_logits_match_eager(ort_lm, eager_model, batch, length):
    """Sizes differ from the export's dummy (2/3/5); 70 > the tiny window (32) exercises the sparse mask."""
    g = torch.Generator().manual_seed(batch * 100 + length)
    ids = torch.randint(2, 512, (batch, length), generator=g)
    mask = np.ones((batch, length), dtype=np.int64)
    logits, past = ort_lm.forward(ids.numpy(), mask)
    with torch.no_grad():
        ref = eager_model(ids, use_cache=True)
    assert logits.shape == (batch, length, 512)
    assert np.abs(logits - ref.logits.numpy()).max() <= 1e-4
    cache = ref.cache
    for step in (1, 3, 1):  # single-token steps and a multi-token chunk through the cache
        nxt = torch.randint(2, 512, (batch, step), generator=g)
        mask = np.concatenate([mask, np.ones((batch, step), dtype=np.int64)], axis=1)
        logits, past = ort_lm.forward(nxt.numpy(), mask, past)
        with torch.no_grad():
            ref = eager_model(nxt, past_key_values=cache, use_cache=True)
        cache = ref.cache
        assert past[0].shape[2] == mask.shape[1]
        assert np.abs(logits - ref.logits.numpy()).max() <= 1e-4


def test_decode_graph_alone_serves_an_empty_past(fp32_export, eager_model):
    """decode.onnx is a complete decoder on its own (Optimum's "with past" model): fed a past of
    length 0 it runs the prompt and returns its cache, as eager PyTorch does."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(fp32_export / "decode.onnx"), providers=["CPUExecutionProvider"])
    cfg = eager_model.config
    ids = torch.randint(2, 512, (2, 13), generator=torch.Generator().manual_seed(7))
    feed = {"input_ids": ids.numpy(), "attention_mask": np.ones((2, 13), dtype=np.int64)}
    empty = np.zeros((2, cfg.num_key_value_heads, 0, cfg.head_dim), dtype=np.float32)
    feed.update({n: empty for n in past_names(cfg.num_hidden_layers)})
    logits, *present = sess.run(None, feed)
    with torch.no_grad():
        ref = eager_model(ids, use_cache=True)
    assert np.abs(logits - ref.logits.numpy()).max() <= 1e-4
    k0, v1 = ref.cache.layers[0].keys.numpy(), ref.cache.layers[1].values.numpy()
    assert present[0].shape == k0.shape and np.abs(present[0] - k0).max() <= 1e-4
    assert np.abs(present[3] - v1).max() <= 1e-4


def test_left_padded_batch_matches_unpadded_rows(ort_lm, eager_model):
    prompts = [[5, 17, 99, 230, 41, 7, 300], [12, 8], [401, 33, 60, 2]]
    T = max(map(len, prompts))
    ids = np.ones((3, T), dtype=np.int64)
    mask = np.zeros((3, T), dtype=np.int64)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):], mask[i, T - len(p):] = p, 1
    logits, _ = ort_lm.forward(ids, mask)
    for i, p in enumerate(prompts):
        with torch.no_grad():
            ref = eager_model(torch.tensor([p])).logits[0].numpy()
        assert np.abs(logits[i, T - len(p):] - ref).max() <= 1e-4


@pytest.mark.parametrize("penalty", [1.0, 2.0])
def test_greedy_32_tokens_identical_to_hf_generate(ort_lm, eager_model, export_corpus_tokens, penalty):
    """Batched, left-padded ORT greedy decoding == HF generate() on each prompt alone, for 32
    steps (eos does not stop either side); with a repetition penalty (the same CTRL rule in
    both) the continuations are varied."""
    _, ids = export_corpus_tokens
    prompts = [ids[1000:1012].tolist(), ids[5000:5005].tolist(), ids[9000:9020].tolist()]
    out = ort_lm.generate(prompts, SamplingParams(max_tokens=32, temperature=0, repetition_penalty=penalty,
                                                  ignore_eos=True))
    saved = eager_model.generation_config.eos_token_id
    eager_model.generation_config.eos_token_id = None  # HF's counterpart of ignore_eos
    try:
        for p, o in zip(prompts, out):
            with torch.no_grad():
                ref = eager_model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=32,
                                           repetition_penalty=penalty, pad_token_id=1, eos_token_id=None)
            assert len(o) == 32 and o == ref[0, len(p):].tolist()
    finally:
        eager_model.generation_config.eos_token_id = saved
    if penalty > 1:
        assert len(set(sum(out, []))) > 8  # real continuations, not one repeated token


def test_sampling_options_match_an_eager_loop_with_the_engine_sampler(ort_lm, eager_model):
    """Same seed + options: the ORT loop and a plain eager loop over the engine's `sample_token`
    pick the same tokens (the logits agree to 1e-4)."""
    params = SamplingParams(max_tokens=20, temperature=0.8, top_k=40, top_p=0.9, repetition_penalty=1.3,
                            seed=123, ignore_eos=True)
    prompt = [40, 41, 42, 43, 44]
    out = ort_lm.generate([prompt], params)[0]
    gen = torch.Generator().manual_seed(123)
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(20):
            logits = eager_model(torch.tensor([seq])).logits[0, -1]
            seq.append(sample_token(logits, params, seq, gen))
    assert out == seq[len(prompt):]
    again = ort_lm.generate([prompt], params)[0]
    assert again == out  # the seed reproduces
    other = ort_lm.generate([prompt], SamplingParams(**{**params.__dict__, "seed": 7}))[0]
    assert other != out


def test_stop_token_and_context_limit(ort_lm):
    out = ort_lm.generate([[40, 41, 42]], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0]
    stop = out[3]
    cut = ort_lm.generate([[40, 41, 42]], SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[stop],
                                                          ignore_eos=True))[0]
    assert cut == out[: out.index(stop) + 1]
    with pytest.raises(ValueError, match="context"):
        ort_lm.generate([[5] * 250], SamplingParams(max_tokens=10))


def test_dense_baseline_with_absolute_positions_exports(tmp_path):
    """standard-* presets: full causal attention, learned absolute position table, dense FFN."""
    from autoglm import OpenAutoGLMConfig, OpenAutoGLMForCausalLM
    from autoglm.export import export_onnx

    torch.manual_seed(0)
    model = OpenAutoGLMForCausalLM(OpenAutoGLMConfig.from_name("standard-tiny", num_hidden_layers=1)).eval()
    with torch.no_grad():
        model.model.embed_positions.weight.normal_(0, 0.5)  # make positions matter
    model.save_pretrained(tmp_path / "m")
    info = export_onnx(tmp_path / "m", tmp_path / "onnx")
    assert max(info["parity_vs_eager"]["prefill_max_abs_diff"], info["parity_vs_eager"]["decode_max_abs_diff"]) <= 1e-4
    prompts = [[5, 6, 7, 8, 9, 10], [300, 301]]
    out = OrtCausalLM(tmp_path / "onnx", threads=1).generate(
        prompts, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    model.generation_config.eos_token_id = None
    for p, o in zip(prompts, out):
        with torch.no_grad():
            ref = model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=16, pad_token_id=1,
                                 eos_token_id=None)
        assert o == ref[0, len(p):].tolist()
    assert isinstance(model.model.embed_positions, torch.nn.Module) and hasattr(model.model.embed_positions, "resize")
