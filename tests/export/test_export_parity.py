"""The export's parity check against eager PyTorch: a correct export of an ordinary trained model
passes the default tolerance (atol + rtol * max |logit|) whatever its logits' scale, and a real
divergence still fails it."""

import numpy as np
import pytest
import torch

from autoglm import OpenAutoGLMConfig, OpenAutoGLMForCausalLM
from autoglm.export import ExportError, export_onnx
from autoglm.export.onnx_export import DEFAULT_ATOL, DEFAULT_RTOL, parity_ok
from autoglm.export.wrapper import ExportDecoder
from export_helpers import train_briefly

_WORDS = ("the king said that a man would ride to the river and the queen wept for her son who had gone "
          "north in winter with seven horses and a sword of iron").split()


def _novel(seed: int, n_words: int = 6000) -> str:
    """Made-up prose: sentences of words drawn from a small vocabulary (a stand-in for a novel)."""
    rng = np.random.default_rng(seed)
    words = rng.choice(_WORDS, size=n_words)
    return " ".join(w + ("." if i % 11 == 10 else "") for i, w in enumerate(words))


def _trained(tmp_path, preset: str, text: str, seed: int, steps: int, lr: float = 3e-3, **overrides):
    """`preset` trained `steps` AdamW steps on `text` (a 512-entry tokenizer trained on it), saved."""
    from autoglm.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer

    save_tokenizer(train_tokenizer([text], vocab_size=512), tmp_path / "m")
    tok = load_tokenizer(tmp_path / "m")
    ids = np.asarray(tok(text).input_ids, dtype=np.int64)
    torch.manual_seed(seed)
    model = OpenAutoGLMForCausalLM(OpenAutoGLMConfig.from_name(preset, vocab_size=512, **overrides))
    train_briefly(model, ids, steps, lr, seed).save_pretrained(tmp_path / "m")
    return model


def test_tolerance_scales_with_the_logits():
    # the reported failure: 1.26e-4 on prefill (3e-6 on decode) for logits of a few units
    parity = {"prefill_max_abs_diff": 1.26e-4, "decode_max_abs_diff": 3e-6,
              "prefill_logit_scale": 6.0, "decode_logit_scale": 6.0}
    tol = parity_ok(parity)
    assert tol["prefill"] == pytest.approx(DEFAULT_ATOL + DEFAULT_RTOL * 6.0)
    big = {**parity, "prefill_max_abs_diff": 1e-3, "prefill_logit_scale": 20.0}
    parity_ok(big)  # 1e-3 on logits of 20 is within 1e-4 + 1e-4 * 20
    with pytest.raises(ExportError, match="prefill graph"):
        parity_ok({**big, "prefill_logit_scale": 1.0})  # the same difference on logits of 1 is not
    with pytest.raises(ExportError, match="decode graph"):
        parity_ok({**parity, "decode_max_abs_diff": float("nan")})


@pytest.mark.parametrize("case", [
    # (preset, data seed, init seed, steps, final-norm gain): different data, seeds and logit scales.
    # The ordinary cases are slow: the shared fixture's model (tiny, 60 steps on docstrings) already
    # passes the default check in every run of the suite (conftest.fp32_export)
    pytest.param(("tiny", 0, 0, 40, 1.0), marks=pytest.mark.slow),
    pytest.param(("tiny", 1, 7, 80, 1.0), marks=pytest.mark.slow),
    ("tiny", 2, 3, 40, 12.0),  # larger logits: a final-norm gain of 12 (a sharper, still trained, model)
    pytest.param(("small", 5, 1, 10, 1.0), marks=pytest.mark.slow),  # the reported case: `small`, 10 steps
])
def test_trained_models_pass_the_default_check(tmp_path, case):
    preset, data_seed, seed, steps, gain = case
    model = _trained(tmp_path, preset, _novel(data_seed), seed, steps)
    if gain != 1.0:
        with torch.no_grad():
            model.model.norm.weight.mul_(gain)
        model.save_pretrained(tmp_path / "m")
    info = export_onnx(tmp_path / "m", tmp_path / "onnx")  # default atol / rtol: must not raise
    p = info["parity_vs_eager"]
    assert p["prefill_max_abs_diff"] <= p["prefill_tolerance"] and p["decode_max_abs_diff"] <= p["decode_tolerance"]
    # what remains is float32 noise that grows with the logits: within 3e-5 of their scale alone
    # (measured: 5e-7 to 3e-6), so the default rtol (1e-4) has room for other machines' kernels
    for graph in ("prefill", "decode"):
        assert p[f"{graph}_max_abs_diff"] <= 3e-5 * p[f"{graph}_logit_scale"]
    if gain > 1:
        assert p["prefill_logit_scale"] > 50


def test_a_relative_drift_fails_even_with_large_logits(tmp_path, monkeypatch):
    """An exporter bug that scales the logits by 1 + 1e-3 (a real divergence, small against the
    logits) fails the check on a model with large logits: the tolerance grows only by rtol."""
    model = _trained(tmp_path, "tiny", _novel(4), 0, 10, num_hidden_layers=1)
    with torch.no_grad():
        model.model.norm.weight.mul_(12.0)
    model.save_pretrained(tmp_path / "m")
    orig = ExportDecoder.forward

    def drifting(self, input_ids, attention_mask, *past):
        logits, *rest = orig(self, input_ids, attention_mask, *past)
        return (logits * (1 + 1e-3), *rest)

    monkeypatch.setattr(ExportDecoder, "forward", drifting)
    with pytest.raises(ExportError, match="differ from eager PyTorch"):
        export_onnx(tmp_path / "m", tmp_path / "out")
    assert not (tmp_path / "out").exists()
