"""FLOP counting and MFU vs PyTorch's own FLOP counter and a brute-force mask count; the
Trainer reports tokens/s and MFU in every logged row."""

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from training_helpers import batch_fn, make_model, random_tokens

from autoglm import OpenAutoGLMConfig, OpenAutoGLMForCausalLM
from autoglm.modules.attention import sparse_mask
from autoglm.training import TrainConfig, Trainer
from autoglm.training.throughput import mean_keys_per_query, mfu, model_flops_per_token, peak_flops


@pytest.mark.parametrize("T,W,G", [(50, 8, 3), (17, 32, 4), (64, 16, 0), (40, None, 0), (30, 5, 12)])
def test_mean_keys_per_query_counts_the_mask(T, W, G):
    pos = torch.arange(T)
    allowed = sparse_mask(pos[:, None], pos[None, :], W, G)
    assert mean_keys_per_query(T, W, G) == pytest.approx(allowed.sum().item() / T)


def _counted_forward(model, T):
    """FLOPs per token of one forward as torch's FlopCounterMode counts them (on CPU it counts
    the matmuls and leaves the fused SDPA kernel out)."""
    x = torch.randint(2, model.config.vocab_size, (1, T))
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x, use_cache=False)
    counts = fc.get_flop_counts()["Global"]
    assert not any("scaled_dot_product" in str(k) for k in counts)
    return fc.get_total_flops() / T


@pytest.mark.parametrize("preset,overrides", [("standard-tiny", {}),
                                              ("tiny", {"attention": "dense", "position": "absolute",
                                                        "moe_dispatch": "gather"})])
def test_matmul_flops_match_torch_flop_counter(preset, overrides):
    """Active parameters: the gather dispatch multiplies each token by its k experts only, so
    the counter sees exactly the active work (attention is checked against the mask above
    and by hand below)."""
    torch.manual_seed(0)
    model = OpenAutoGLMForCausalLM(OpenAutoGLMConfig.from_name(preset, **overrides)).eval()
    T = 64
    ours = model_flops_per_token(model.config, T)
    assert ours["forward"] - ours["attention"] == pytest.approx(_counted_forward(model, T), rel=1e-9)
    c = model.config
    assert ours["attention"] == pytest.approx(c.num_hidden_layers * 4 * c.hidden_size * (T + 1) / 2)
    assert ours["train"] == 3 * ours["forward"]


def test_sparse_attention_counts_window_keys_and_moe_counts_active_experts():
    sparse = OpenAutoGLMConfig.from_name("small")
    dense = OpenAutoGLMConfig.from_name("standard-small")
    s, d = model_flops_per_token(sparse, 8192), model_flops_per_token(dense, 8192)
    assert s["keys_per_query"] == pytest.approx(mean_keys_per_query(8192, 128, 4))
    assert d["keys_per_query"] == pytest.approx(8193 / 2)
    # MoE: k = 2 of 4 experts of 352 -> the FFN of one layer is 2 * 6 * d * 352 (+ router)
    per_layer_ffn = 2 * 256 * 4 + 2 * 6 * 256 * 352
    no_ffn = model_flops_per_token(OpenAutoGLMConfig.from_name("small", num_experts=0), 8192)
    assert s["forward"] - no_ffn["forward"] == pytest.approx(6 * (per_layer_ffn - 6 * 256 * 1408))


def test_hf_llama_and_mixtral_configs_are_counted():
    transformers = pytest.importorskip("transformers")
    llama = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2)
    mixtral = transformers.MixtralConfig(vocab_size=100, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                         num_experts_per_tok=2, sliding_window=None)
    fl, fm = model_flops_per_token(llama, 16), model_flops_per_token(mixtral, 16)
    attn_proj = 2 * 64 * 16 * (2 * 4 + 2 * 2)
    assert fl["forward"] == pytest.approx(2 * (attn_proj + 4 * 64 * 8.5 + 6 * 64 * 128) + 2 * 64 * 100)
    assert fm["forward"] == pytest.approx(2 * (attn_proj + 4 * 64 * 8.5 + 2 * 64 * 4 + 2 * 6 * 64 * 32) + 2 * 64 * 100)


def test_mfu_and_measured_cpu_peak():
    peak, source = peak_flops("cpu", "fp32")
    assert peak > 1e8 and "measured" in source
    assert mfu(1000.0, 1e6, 1e10) == pytest.approx(0.1)


def test_trainer_rows_carry_tokens_per_s_and_mfu():
    model = make_model()
    cfg = TrainConfig(batch_size=2, seq_len=32, max_steps=2, log_every=1, eval_every=0, save_every=0)
    tr = Trainer(model, cfg, batch_fn(random_tokens(), 2, 32), progress=False)
    res = tr.fit()
    rows = [r for r in res.history if "mfu" in r]
    assert len(rows) == 2
    peak = tr._peak[0]
    for r in rows:  # mfu is exactly tokens/s * FLOPs per token / peak
        want = r["tokens_per_s"] * model_flops_per_token(model.config, 32)["train"] / peak
        assert math.isclose(r["mfu"], want, rel_tol=1e-9) and 0 < r["mfu"] < 1
