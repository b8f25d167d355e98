"""evaluate() vs an explicit per-token loop with F.cross_entropy."""

import math

import pytest
import torch
import torch.nn.functional as F

from autoglm.training import evaluate
from training_helpers import VOCAB, make_model


def reference(model, batches):
    """One token at a time: CE of the label under the logits at its position, argmax hit."""
    total, hits, n = 0.0, 0, 0
    with torch.no_grad():
        for x, y in batches:
            logits = model(x).logits
            for b in range(x.shape[0]):
                for t in range(x.shape[1]):
                    label = int(y[b, t])
                    if label == -100:
                        continue
                    total += F.cross_entropy(logits[b, t][None].double(), torch.tensor([label])).item()
                    hits += int(logits[b, t].argmax()) == label
                    n += 1
    return total / n, hits / n, n


def fixed_batches(model):
    """Random inputs; labels random except every third one, set to the model's own argmax
    so accuracy is strictly between 0 and 1; some labels ignored (-100)."""
    g = torch.Generator().manual_seed(3)
    out = []
    for size in (3, 2):  # uneven batches: the mean is over tokens, not batches
        x = torch.randint(0, VOCAB, (size, 12), generator=g)
        y = torch.randint(0, VOCAB, (size, 12), generator=g)
        with torch.no_grad():
            pred = model.eval()(x).logits.argmax(-1)
        y[:, ::3] = pred[:, ::3]
        y[0, :5] = -100  # ignored positions
        out.append((x, y))
    return out


def test_evaluate_matches_a_per_token_loop():
    model = make_model()
    batches = fixed_batches(model)
    loss, acc, n = reference(model.eval(), batches)
    model.train()
    got = evaluate(model, batches)
    assert got["tokens"] == n == 5 * 12 - 2 * 5
    assert got["loss"] == pytest.approx(loss, rel=1e-6)
    assert got["perplexity"] == pytest.approx(math.exp(loss), rel=1e-6)
    assert got["accuracy"] == pytest.approx(acc) and 0.2 < acc < 0.6
    assert model.training  # previous mode restored


def test_evaluate_restores_eval_mode_and_needs_tokens():
    model = make_model().eval()
    evaluate(model, fixed_batches(model)[:1])
    assert not model.training
    with pytest.raises(ValueError, match="no labelled tokens"):
        evaluate(model, [])
