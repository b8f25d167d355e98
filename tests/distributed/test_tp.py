"""Tensor parallelism (DTensor, 2 gloo ranks on CPU) against the single-process model.

The workers (tests/distributed/_mp_helpers_model_parallel.py) split a tiny model with
`apply_tensor_parallel` and run one forward + backward on the batch every rank shares;
here the same model with the same weights runs in one process. Logits, loss, every
parameter's gradient (DTensors gathered to full tensors) and the global gradient norm
must agree to fp32 round-off (rtol 1e-4, atol 1e-5: the split changes only the order of
the sums inside the row-wise matmuls).
"""

import math

import pytest
import torch
from _mp_helpers_model_parallel import TP_VARIANTS, batch, build_model, tiny_config, worker_results

from autoglm.distributed.tensor import check_tensor_parallel
from autoglm.losses import lm_loss

pytestmark = pytest.mark.xdist_group("model_parallel")
TOL = dict(rtol=1e-4, atol=1e-5)


def _reference(name):
    overrides, _ = TP_VARIANTS[name]
    cfg = tiny_config(**overrides)
    model = build_model(cfg)
    ids, labels = batch(cfg)
    out = model(ids)
    loss = lm_loss(out.logits, labels) + (out.aux_loss if out.aux_loss is not None else 0.0)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf)
    return cfg, out.logits.detach(), loss.detach(), grads, norm, model.state_dict()


@pytest.mark.parametrize("name", list(TP_VARIANTS))
def test_tp_forward_and_gradients_equal_single_process(name):
    cfg, logits, loss, grads, norm, state = _reference(name)
    for rank, res in enumerate(worker_results()):
        r = res["tp"][name]
        torch.testing.assert_close(r["logits"], logits, **TOL, msg=f"rank {rank} logits")
        torch.testing.assert_close(r["loss"], loss, **TOL)
        assert set(r["grads"]) <= set(grads), "the split model must keep the parameter names"
        for n, g in grads.items():  # an expert no token reached: None there, None or zero here
            got = r["grads"].get(n, torch.zeros_like(g))
            torch.testing.assert_close(got, g, **TOL, msg=f"rank {rank} gradient of {n}")
        torch.testing.assert_close(r["grad_norm"], norm, **TOL)
        for k, v in state.items():  # gathered weights are the unsplit model's
            torch.testing.assert_close(r["state"][k], v, rtol=0, atol=0)


def test_tp_really_shards_heads_and_experts():
    r0, r1 = (res["tp"]["rope_sp"] for res in worker_results())
    cfg = tiny_config()
    hd = cfg.head_dim
    shapes = r0["local_shapes"]
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == (cfg.num_attention_heads * hd // 2, cfg.hidden_size)
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (cfg.num_key_value_heads * hd // 2, cfg.hidden_size)
    assert shapes["model.layers.0.self_attn.o_proj.weight"] == (cfg.hidden_size, cfg.num_attention_heads * hd // 2)
    assert shapes["model.layers.0.mlp.down_proj.weight"] == (cfg.hidden_size, cfg.intermediate_size // 2)
    assert shapes["model.layers.1.mlp.experts.3.gate_proj.weight"] == (cfg.expert_intermediate_size // 2,
                                                                        cfg.hidden_size)
    assert shapes["model.embed_tokens.weight"] == (cfg.vocab_size // 2, cfg.hidden_size)
    assert r0["sp"] and r1["sp"]
    # learned absolute positions are added at full length: sequence parallelism turns itself off
    assert not worker_results()[0]["tp"]["absolute_dense"]["sp"]


def test_tp_degree_that_does_not_fit_the_heads_is_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"num_attention_heads \(4\).*--nproc 2"):
        check_tensor_parallel(tiny_config(), 3)
    with pytest.raises(ValueError, match=r"num_key_value_heads \(1\).*--nproc 1"):
        check_tensor_parallel(tiny_config(num_key_value_heads=1), 2)
    with pytest.raises(ValueError, match=r"expert_intermediate_size \(25\)"):
        check_tensor_parallel(tiny_config(expert_intermediate_size=25), 2)
    check_tensor_parallel(tiny_config(), 2)  # the tested split passes


@pytest.mark.slow
def test_tp_through_autoglm_train_tracks_one_process(tmp_path):
    """`autoglm train --nproc 2 --strategy tp` (torchrun, gloo) for 4 steps on the tiny preset."""
    from _mp_helpers_model_parallel import assert_cli_matches_single

    assert_cli_matches_single("tp", tmp_path, lm_tol=2e-5, aux_tol=2e-5)
