"""The runner's CPU LM head (h @ W^T with a contiguous transposed copy, or the module, whichever
was timed faster per row count) equals the module's output, follows weight updates, and leaves
wrapped or hooked heads to the module."""

import torch
from torch import nn

from autoglm.inference import runner
from autoglm.inference.runner import LMHead


class Tiny(nn.Module):
    def __init__(self, bias=False):
        super().__init__()
        torch.manual_seed(0)
        self.lm_head = nn.Linear(16, 50, bias=bias)


def test_equals_the_linear_and_follows_weight_updates():
    for bias in (False, True):
        m = Tiny(bias)
        head = LMHead(m, transposed=True)
        h = torch.randn(3, 16)
        torch.testing.assert_close(head(h), m.lm_head(h), atol=1e-5, rtol=1e-5)
        with torch.no_grad():
            m.lm_head.weight.mul_(2.0)  # in place: the version counter moves, the copy is rebuilt
        torch.testing.assert_close(head(h), m.lm_head(h), atol=1e-5, rtol=1e-5)
        with torch.no_grad():
            m.lm_head.weight = nn.Parameter(torch.randn(50, 16))  # a new tensor
        torch.testing.assert_close(head(h), m.lm_head(h), atol=1e-5, rtol=1e-5)


def test_a_hooked_head_is_called_as_a_module():
    m = Tiny()
    head = LMHead(m, transposed=True)
    h = torch.randn(2, 16)
    m.lm_head.register_forward_hook(lambda mod, inp, out: out + 1.0)  # e.g. a LoRA delta
    torch.testing.assert_close(head(h), m.lm_head(h))
    torch.testing.assert_close(head(h), nn.functional.linear(h, m.lm_head.weight) + 1.0)


def test_the_form_is_timed_once_per_row_bucket_and_kept(monkeypatch):
    monkeypatch.setattr(runner, "_TIMED_FORMS", {})  # no timings from other tests
    m = Tiny()
    head = LMHead(m)
    for n in (1, 3, 5, 7, 8, 3):
        h = torch.randn(n, 16)
        torch.testing.assert_close(head(h), m.lm_head(h), atol=1e-5, rtol=1e-5)
    assert set(head.choice) == {1, 3, 8}  # 1-4 exactly, then powers of two (5, 7 and 8 share one)
    head.choice[8] = not head.choice[8]  # a kept decision is not timed again
    flipped = head.choice[8]
    head(torch.randn(6, 16))
    assert head.choice[8] == flipped
    calls = []
    again = LMHead(m)  # another engine's head of this shape: the process's timings, nothing timed
    again._time = lambda lin, h: calls.append(len(h))
    again(torch.randn(3, 16))
    assert calls == [] and again.choice[3] == head.choice[3]
    plain = LMHead(m, transposed=False)
    h = torch.randn(4, 16)
    torch.testing.assert_close(plain(h), m.lm_head(h))
    assert plain.choice == {} and plain._wt is None  # the module form only: no copy, nothing timed
