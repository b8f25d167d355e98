"""The whole model forward and the training step trace into one graph under torch.compile
(torch._dynamo.explain: no graph break), and a compiled training step gives eager's loss and
gradients. CPU only; on a GPU the same code runs FlexAttention and bf16 grouped GEMMs
(benchmarks/gpu_suite.sh)."""

import pytest
import torch

from autoglm import OpenAutoGLMConfig, OpenAutoGLMForCausalLM
from autoglm.training import CausalLMObjective, autocast_context


def make(**overrides):
    torch.manual_seed(0)
    return OpenAutoGLMForCausalLM(OpenAutoGLMConfig.from_name("tiny", **overrides))


def explain(fn, *args):
    torch._dynamo.reset()
    ex = torch._dynamo.explain(fn)(*args)
    reasons = [f"{b.reason[:200]} at {b.user_stack[-1] if b.user_stack else '?'}" for b in ex.break_reasons]
    return ex.graph_count, ex.graph_break_count, reasons


@pytest.mark.parametrize("precision,overrides", [
    ("bf16", {}),  # MoE: bf16 grouped GEMMs; sparse attention: the chunked kernel (CPU)
    ("fp32", {"position": "relative"}),  # MoE: the static dense path (grouped GEMM traces in bf16 only)
    ("fp32", {"attention": "dense", "position": "absolute", "num_experts": 0}),  # the standard baseline
])
def test_training_forward_and_loss_have_no_graph_break(precision, overrides):
    model = make(**overrides).train()
    objective = CausalLMObjective()
    x = torch.randint(2, 512, (2, 80))

    def step(x):
        with autocast_context(precision, x.device):
            return objective(model, (x, x))["loss"]

    graphs, breaks, reasons = explain(step, x)
    assert breaks == 0 and graphs == 1, reasons


def test_flex_attention_forward_has_no_graph_break():
    """FlexAttention's block mask (and the relative bias as score_mod) inside the compiled
    model; forward only: FlexAttention has no backward on CPU."""
    model = make(attn_impl="flex", position="relative", num_hidden_layers=1).eval()
    x = torch.randint(2, 512, (1, 96))

    def fwd(x):
        with torch.no_grad():
            return model(x, use_cache=False).logits

    graphs, breaks, reasons = explain(fwd, x)
    assert breaks == 0 and graphs == 1, reasons


def test_compiled_training_step_matches_eager():
    """forward + backward through AOTAutograd (the grouped GEMM's backward included, bf16)
    against the same step in eager mode."""
    eager, compiled = make(), make()
    objective = CausalLMObjective()
    x = torch.randint(2, 512, (2, 64))
    fn = torch.compile(compiled, backend="aot_eager", fullgraph=True)
    losses = []
    for m in (eager, fn):
        with autocast_context("bf16", x.device):
            loss = objective(m, (x, x))["loss"]
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], atol=1e-2, rtol=1e-2)
    for (name, pe), pc in zip(eager.named_parameters(), compiled.parameters()):
        assert (pe.grad is None) == (pc.grad is None), name
        if pe.grad is not None:
            torch.testing.assert_close(pc.grad, pe.grad, atol=2e-2, rtol=5e-2, msg=name)
