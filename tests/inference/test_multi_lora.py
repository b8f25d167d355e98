"""Multi-LoRA serving: a mixed batch (adapter A, adapter B, base) == each request alone through PEFT."""

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from autoglm.inference import EngineConfig, LLMEngine, SamplingParams
from autoglm.inference.lora import MultiLoRA

from inference_helpers import make_model, prompts


def save_adapter(base, out_dir, seed, **lora_kw):
    """A PEFT LoRA adapter on a copy of `base` with every LoRA weight random (B != 0, so the
    delta matters), saved as `autoglm finetune --lora` saves it."""
    kw = dict(r=4, lora_alpha=8, lora_dropout=0.05, task_type="CAUSAL_LM")
    peft = get_peft_model(copy.deepcopy(base), LoraConfig(**{**kw, **lora_kw}))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.15)
    peft.save_pretrained(out_dir)
    return out_dir


def adapters_for(base, tmp_path, preset):
    ffn = ["experts"] if preset == "tiny" else ["gate_proj", "up_proj", "down_proj"]
    if preset == "tiny":  # PEFT takes full names for the experts' linears
        ffn = [n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and ".experts." in n]
    a = save_adapter(base, tmp_path / "a", 1, target_modules=["q_proj", "v_proj"],
                     alpha_pattern={"layers.1.self_attn.q_proj": 3})
    b = save_adapter(base, tmp_path / "b", 2, r=8, lora_alpha=16, use_rslora=True,
                     target_modules=["k_proj", "o_proj", *ffn])
    return {"A": a, "B": b}


def peft_greedy(model, ids, n):
    out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                         pad_token_id=1)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("preset", ["tiny", "standard-tiny"])
def test_mixed_batch_matches_peft_per_request(tmp_path, preset):
    base = make_model(preset)
    paths = adapters_for(base, tmp_path, preset)
    eng = LLMEngine(base, config=EngineConfig(block_size=4, num_blocks=400, max_num_batched_tokens=40))
    for name, p in paths.items():
        eng.add_lora(name, p)
    ps = prompts(5, 3, 60, seed=4)
    n_out = [12, 20, 7, 16, 10]
    jobs = [(p, n, lo) for p, n in zip(ps, n_out) for lo in ("A", None, "B")]  # same prompt on each adapter
    reqs = eng.generate([j[0] for j in jobs], [SamplingParams(max_tokens=j[1], temperature=0, ignore_eos=True)
                                               for j in jobs], lora=[j[2] for j in jobs])
    assert eng.pool.num_free == eng.pool.num_blocks

    ref = PeftModel.from_pretrained(copy.deepcopy(base), paths["A"], adapter_name="A").eval()
    ref.load_adapter(paths["B"], adapter_name="B")
    got = {}
    for (p, n, lo), r in zip(jobs, reqs):
        if lo is None:
            with ref.disable_adapter():
                want = peft_greedy(ref, p, n)
        else:
            ref.set_adapter(lo)
            want = peft_greedy(ref, p, n)
        assert r.output_ids == want, (lo, p)
        got[(tuple(p), lo)] = r.output_ids
    # the adapters matter: each changes the greedy tokens of some prompt
    for lo in ("A", "B"):
        assert any(got[(tuple(p), lo)] != got[(tuple(p), None)] for p in ps)


def test_base_path_untouched_and_merged_reference(tmp_path):
    """No request on an adapter -> bit-identical logits to a model without hooks; a single
    adapter step == the merged model."""
    base = make_model("tiny")
    paths = adapters_for(base, tmp_path, "tiny")
    ids = torch.tensor([prompts(1, 20, 21, seed=5)[0]])
    with torch.no_grad():
        plain = base(ids).logits
        lora = MultiLoRA(base)
        lora.add("B", paths["B"])
        assert torch.equal(base(ids).logits, plain)  # hooks installed, no batch: base path
        with lora.batch([(None, ids.shape[1])]):
            assert torch.equal(base(ids).logits, plain)
        with lora.batch([("B", ids.shape[1])]):
            mine = base(ids).logits
        merged = PeftModel.from_pretrained(copy.deepcopy(base), paths["B"]).merge_and_unload()(ids).logits
        lora.close()
        assert torch.equal(base(ids).logits, plain)
    assert (mine - plain).abs().max() > 1e-2
    torch.testing.assert_close(mine, merged, rtol=1e-4, atol=1e-4)


def test_bad_adapters_fail_at_load_time(tmp_path):
    base = make_model("tiny")
    eng = LLMEngine(base, config=EngineConfig(block_size=4, num_blocks=64))
    good = save_adapter(base, tmp_path / "good", 1, target_modules=["q_proj", "v_proj"])
    eng.add_lora("good", good)
    with pytest.raises(ValueError, match="'good' is already loaded"):
        eng.add_lora("good", good)
    # other base dimensions (hidden 32 instead of 64)
    other = save_adapter(make_model("tiny", hidden_size=32), tmp_path / "other", 1, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="other dimensions"):
        eng.add_lora("other", other)
    # a target name that matches nothing here
    typo = save_adapter(base, tmp_path / "typo", 1, target_modules=["q_proj", "v_proj"])
    cfg = json.loads((typo / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj", "v_prj"]
    (typo / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="'v_prj' matches no linear layer"):
        eng.add_lora("typo", typo)
    # weights of a module this model does not have (an adapter for a 4-layer model)
    deep = save_adapter(make_model("tiny", num_hidden_layers=4), tmp_path / "deep", 1, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="layers.2.self_attn.q_proj' is not a linear layer of this model"):
        eng.add_lora("deep", deep)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        eng.add_lora("missing", tmp_path / "nowhere")
    dora = save_adapter(base, tmp_path / "dora", 1, target_modules=["q_proj"], use_dora=True)
    with pytest.raises(ValueError, match="DoRA is not supported"):
        eng.add_lora("dora", dora)
    with pytest.raises(ValueError, match="no LoRA adapter named 'nope'"):
        eng.add_request([5, 6, 7], SamplingParams(max_tokens=2), lora="nope")
    assert eng.list_loras() == ["good"]  # failed loads left nothing behind
    assert len(eng.lora._hooks) == 2 * 2  # q and v of two layers
    eng.remove_lora("good")
    assert eng.list_loras() == [] and not eng.lora._hooks


def test_lora_steps_bypass_the_fixed_shape_decode_path(tmp_path):
    """Decode steps with adapter tokens run eagerly (a CUDA graph would replay without the
    Python hooks; its 'gather' MoE dispatch never calls the expert linears); base-only decode
    steps still take the fixed-shape path. capture=False runs that path eagerly on CPU."""
    cg = pytest.importorskip("autoglm.inference.cuda_graph")
    base = make_model("tiny")
    paths = adapters_for(base, tmp_path, "tiny")
    eng = LLMEngine(base, config=EngineConfig(block_size=4, num_blocks=200, cuda_graphs=True, cuda_graph_capture=False,
                                              cuda_graph_batch_sizes=(1, 2, 4, 8)))
    dec = eng.runner.graphs
    assert isinstance(dec, cg.CUDAGraphDecoder)
    for name, p in paths.items():
        eng.add_lora(name, p)
    ps = prompts(2, 5, 30, seed=6)
    jobs = [(p, lo, n) for p in ps for lo, n in (("A", 6), ("B", 6), (None, 14))]  # base runs on alone
    reqs = eng.generate([j[0] for j in jobs], [SamplingParams(max_tokens=j[2], temperature=0, ignore_eos=True)
                                               for j in jobs], lora=[j[1] for j in jobs])
    assert dec.steps > 0
    ref = PeftModel.from_pretrained(copy.deepcopy(base), paths["A"], adapter_name="A").eval()
    ref.load_adapter(paths["B"], adapter_name="B")
    for (p, lo, n), r in zip(jobs, reqs):
        if lo is None:
            with ref.disable_adapter():
                assert r.output_ids == peft_greedy(ref, p, n)
        else:
            ref.set_adapter(lo)
            assert r.output_ids == peft_greedy(ref, p, n), lo
