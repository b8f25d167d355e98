"""Config presets, parameter counts, validation messages and HF config round-trip."""

import pytest
import torch
from transformers import AutoConfig

import autoglm  # noqa: F401  (registers the Auto* classes)
from autoglm import PRESETS, OpenAutoGLMConfig, OpenAutoGLMForCausalLM, preset_names


def meta_summary(name: str) -> dict[str, int]:
    """Parameter counts of a preset built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        model = OpenAutoGLMForCausalLM(OpenAutoGLMConfig.from_name(name))
    return model.num_parameters_summary()


def hand_count(cfg: OpenAutoGLMConfig) -> tuple[int, int]:
    """(total, active) parameters counted from the config alone, independently of the model."""
    d, L, V = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    kv = cfg.num_key_value_heads * cfg.head_dim
    attn = d * d * 2 + d * kv * 2  # q, o + k, v
    total = V * d + d  # tied embedding / head + final norm
    active = total
    if cfg.position == "absolute":
        total += cfg.max_position_embeddings * d
        active += cfg.max_position_embeddings * d
    for i in range(L):
        layer = attn + 2 * d
        if cfg.position == "rope":
            layer += cfg.head_dim // 2
        if cfg.position == "relative":
            layer += cfg.num_attention_heads * (cfg.window_size + max(cfg.num_global_tokens, 1))
        if cfg.is_moe_layer(i):
            expert = 3 * d * cfg.expert_intermediate_size
            total += layer + d * cfg.num_experts + cfg.num_experts * expert
            active += layer + d * cfg.num_experts + cfg.num_experts_per_tok * expert
        else:
            total += layer + 3 * d * cfg.intermediate_size
            active += layer + 3 * d * cfg.intermediate_size
    return total, active


def test_preset_names():
    assert set(preset_names()) == {"tiny", "small", "base", "standard-tiny", "standard-small", "standard-base"}
    assert list(PRESETS) == preset_names()


@pytest.mark.parametrize("name", ["tiny", "small", "standard-tiny", "standard-small"])
def test_small_presets_build_and_run(name):
    cfg = OpenAutoGLMConfig.from_name(name)
    model = OpenAutoGLMForCausalLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 9))
    with torch.no_grad():
        out = model(ids)
    assert out.logits.shape == (1, 9, cfg.vocab_size)
    assert torch.isfinite(out.logits).all()


def test_preset_shapes():
    tiny = OpenAutoGLMConfig.from_name("tiny")
    assert (tiny.attention, tiny.position, tiny.num_experts, tiny.num_experts_per_tok) == ("sparse", "rope", 4, 2)
    std = OpenAutoGLMConfig.from_name("standard-tiny")
    assert (std.attention, std.position, std.num_experts) == ("dense", "absolute", 0)
    over = OpenAutoGLMConfig.from_name("tiny", window_size=16, num_hidden_layers=3)
    assert over.window_size == 16 and over.num_hidden_layers == 3


@pytest.mark.parametrize("name", preset_names())
def test_counts_match_hand_count(name):
    s = meta_summary(name)
    total, active = hand_count(OpenAutoGLMConfig.from_name(name))
    assert s["total"] == total
    assert s["active"] == active
    assert s["adapters"] == 0


def test_count_ranges():
    assert meta_summary("tiny")["total"] < 1_000_000 / 2  # "well under 1M"
    assert 8_000_000 <= meta_summary("small")["total"] <= 12_000_000
    assert 350_000_000 <= meta_summary("base")["total"] <= 400_000_000


@pytest.mark.parametrize("size", ["tiny", "small", "base"])
def test_standard_twin_has_same_total(size):
    sparse, dense = meta_summary(size), meta_summary(f"standard-{size}")
    assert abs(dense["total"] - sparse["total"]) <= 0.01 * sparse["total"]
    assert sparse["active"] < sparse["total"]  # MoE: only top-k experts per token
    assert dense["active"] == dense["total"]


def test_tied_embeddings_counted_once():
    model = OpenAutoGLMForCausalLM(OpenAutoGLMConfig.from_name("tiny"))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    naive = sum(p.numel() for p in model.parameters())  # parameters() already deduplicates
    assert model.num_parameters_summary()["total"] == naive


@pytest.mark.parametrize("overrides,field,fix", [
    (dict(window_size=512, max_position_embeddings=256), "window_size", "raise max_position_embeddings"),
    (dict(num_experts=4, num_experts_per_tok=5), "num_experts_per_tok", "add experts"),
    (dict(hidden_size=64, num_attention_heads=6, num_key_value_heads=None), "num_attention_heads", "e.g."),
    (dict(attention="dense", position="relative"), "position", "position='absolute'"),
])
def test_invalid_values_name_field_and_fix(overrides, field, fix):
    with pytest.raises(ValueError) as err:
        OpenAutoGLMConfig.from_name("tiny", **overrides)
    msg = str(err.value)
    assert field in msg and fix in msg


def test_heads_not_dividing_suggests_a_divisor():
    with pytest.raises(ValueError) as err:
        OpenAutoGLMConfig(hidden_size=64, num_attention_heads=6)
    suggestion = int(str(err.value).split("e.g. ")[1].split()[0].strip(".,;"))
    assert 64 % suggestion == 0


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError) as err:
        OpenAutoGLMConfig.from_name("huge")
    msg = str(err.value)
    assert "huge" in msg
    for name in preset_names():
        assert name in msg


def test_config_round_trip(tmp_path):
    cfg = OpenAutoGLMConfig.from_name("tiny", window_size=16, num_global_tokens=2, moe_dispatch="dense")
    cfg.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").is_file()
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, OpenAutoGLMConfig)
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "max_position_embeddings", "position", "attention", "window_size", "num_global_tokens",
                "attn_impl", "num_experts", "num_experts_per_tok", "expert_intermediate_size", "moe_every",
                "moe_dispatch", "router_aux_loss_coef", "router_z_loss_coef", "tie_word_embeddings"):
        assert getattr(loaded, key) == getattr(cfg, key), key
    assert loaded.to_diff_dict() == cfg.to_diff_dict()


def test_loading_invalid_config_json_raises(tmp_path):
    cfg = OpenAutoGLMConfig.from_name("tiny")
    cfg.save_pretrained(tmp_path)
    import json

    path = tmp_path / "config.json"
    data = json.loads(path.read_text())
    data["window_size"] = 10_000
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="window_size"):
        AutoConfig.from_pretrained(tmp_path)
