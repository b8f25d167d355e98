"""The runner's CPU LM head (h @ W^T with a contiguous transposed copy) equals the module's
output, follows weight updates, and leaves wrapped or hooked heads to the module."""

import torch
from torch import nn

from autoglm.inference.runner import LMHead


class Tiny(nn.Module):
    def __init__(self, bias=False):
        super().__init__()
        torch.manual_seed(0)
        self.lm_head = nn.Linear(16, 50, bias=bias)


def test_equals_the_linear_and_follows_weight_updates():
    for bias in (False, True):
        m = Tiny(bias)
        head = LMHead(m)
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
    head = LMHead(m)
    h = torch.randn(2, 16)
    m.lm_head.register_forward_hook(lambda mod, inp, out: out + 1.0)  # e.g. a LoRA delta
    torch.testing.assert_close(head(h), m.lm_head(h))
    torch.testing.assert_close(head(h), nn.functional.linear(h, m.lm_head.weight) + 1.0)
