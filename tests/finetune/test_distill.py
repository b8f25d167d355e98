"""KD loss against hand computation, teacher mixing, alpha schedule, the objective and its cache."""

import copy
import math

import pytest
import torch

from autoglm import OpenAutoGLMConfig, OpenAutoGLMForCausalLM
from autoglm.training.distill import (AlphaSchedule, DistillConfig, DistillationObjective, check_teachers,
                                      combine_teachers, distill_batches, kd_loss, kd_scale)
from autoglm.training.teacher_cache import TeacherLogitCache, topk_to_probs


def hand_kd(s_logits, t_probs, alpha, step, T, mask):
    """Plain-Python loops over tokens and vocabulary (float64)."""
    B, L, V = len(s_logits), len(s_logits[0]), len(s_logits[0][0])
    total, n = 0.0, 0
    for b in range(B):
        for t in range(L):
            if not mask[b][t]:
                continue
            z = [x / T for x in s_logits[b][t]]
            m = max(z)
            lse = m + math.log(sum(math.exp(x - m) for x in z))
            logq = [x - lse for x in z]
            soft = [alpha * t_probs[b][t][v] + (1 - alpha) * math.exp(logq[v]) for v in range(V)]
            total += sum(p * (math.log(p) - lq) for p, lq in zip(soft, logq) if p > 0)
            n += 1
    return total / n * T * T * (1 + 0.01 * min(step, 5000) / 5000)


def test_kd_loss_matches_hand_computation():
    torch.manual_seed(1)
    s = torch.randn(2, 3, 5, dtype=torch.float64)
    t = torch.randn(2, 3, 5, dtype=torch.float64).div(2.0).softmax(-1)
    t[0, 0] = torch.tensor([0.5, 0.5, 0.0, 0.0, 0.0], dtype=torch.float64)  # teacher-impossible tokens
    mask = torch.tensor([[True, True, False], [True, False, True]])
    for alpha, step, T in [(0.7, 0, 1.0), (0.3, 2500, 2.0), (1.0, 9000, 0.5)]:
        got = kd_loss(s, t, alpha, step, T, mask)
        want = hand_kd(s.tolist(), t.tolist(), alpha, step, T, mask.tolist())
        assert float(got) == pytest.approx(want, rel=1e-10, abs=1e-12)
    assert kd_scale(0) == 1.0 and kd_scale(2500) == 1.005 and kd_scale(10**6) == 1.01


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.7, 1.0])
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_teacher_equal_to_student_gives_zero_loss_and_zero_gradient(alpha, T):
    """soft = alpha*p + (1-alpha)*p = p, so KL(p || p) = 0 and the gradient alpha*(p - t) = 0.
    In float64 the only error is rounding of the mixture (~1e-16 per term)."""
    s = torch.randn(2, 4, 11, dtype=torch.float64, requires_grad=True)
    t = (s.detach() / T).softmax(-1)
    loss = kd_loss(s, t, alpha, step=1234, temperature=T)
    loss.backward()
    assert abs(float(loss.detach())) < 1e-14
    assert float(s.grad.abs().max()) < 1e-14
    s32 = s.detach().float().requires_grad_(True)  # float32 path: zero up to float32 rounding
    assert abs(float(kd_loss(s32, (s32.detach() / T).softmax(-1), alpha, 0, T).detach())) < 1e-6


def test_alpha_zero_ignores_teacher_and_gradient_is_alpha_times_p_minus_t():
    s = torch.randn(1, 3, 6, dtype=torch.float64, requires_grad=True)
    t = torch.randn(1, 3, 6, dtype=torch.float64).softmax(-1)
    assert abs(float(kd_loss(s, t, 0.0, 0).detach())) < 1e-14  # soft target is the (detached) student itself
    alpha, T, step = 0.6, 2.0, 5000
    kd_loss(s, t, alpha, step, T).backward()
    p = (s.detach() / T).softmax(-1)
    want = 1.01 * T * alpha * (p - t) / 3  # d/ds of T^2*KL(soft||q) averaged over 3 tokens, times the scale
    torch.testing.assert_close(s.grad, want, rtol=1e-10, atol=1e-12)
    assert float(kd_loss(s, t, alpha, 0).detach()) > 0


def test_kd_loss_rejects_bad_input():
    s = torch.randn(1, 2, 5)
    with pytest.raises(ValueError, match="alpha"):
        kd_loss(s, s.softmax(-1), 1.5, 0)
    with pytest.raises(ValueError, match="vocabulary"):
        kd_loss(s, torch.randn(1, 2, 6).softmax(-1), 0.5, 0)
    with pytest.raises(ValueError, match="no counted token"):
        kd_loss(s, s.softmax(-1), 0.5, 0, mask=torch.zeros(1, 2, dtype=torch.bool))


def test_combine_teachers_fixed_and_confidence():
    p1 = torch.tensor([[[0.9, 0.1, 0.0], [0.2, 0.3, 0.5]]])
    p2 = torch.tensor([[[0.4, 0.3, 0.3], [0.1, 0.8, 0.1]]])
    fixed = combine_teachers([p1, p2], "fixed", [3.0, 1.0])
    torch.testing.assert_close(fixed, 0.75 * p1 + 0.25 * p2)
    conf = combine_teachers([p1, p2], "confidence")
    for t in range(2):  # per token, weights proportional to each teacher's max probability
        c1, c2 = float(p1[0, t].max()), float(p2[0, t].max())
        torch.testing.assert_close(conf[0, t], (c1 * p1[0, t] + c2 * p2[0, t]) / (c1 + c2))
    torch.testing.assert_close(conf.sum(-1), torch.ones(1, 2))
    with pytest.raises(ValueError, match="one per teacher"):
        combine_teachers([p1, p2], "fixed", [1.0])
    with pytest.raises(ValueError, match="must be one of"):
        combine_teachers([p1, p2], "average")


def test_alpha_schedule_rounds():
    s = AlphaSchedule(start=0.9, end=0.5, kind="progressive", rounds=3, total_steps=30)
    assert [round(s(i), 6) for i in (0, 9, 10, 19, 20, 29, 40)] == [0.9, 0.9, 0.7, 0.7, 0.5, 0.5, 0.5]
    assert AlphaSchedule()(123) == 0.7  # the default: constant 0.7
    with pytest.raises(ValueError, match="alpha start"):
        AlphaSchedule(start=1.5)


def tiny(seed, **kw):
    torch.manual_seed(seed)
    return OpenAutoGLMForCausalLM(OpenAutoGLMConfig.from_name("tiny", **kw))


def test_objective_with_student_copies_as_teachers_is_zero():
    student = tiny(0).eval()
    obj = DistillationObjective([copy.deepcopy(student), copy.deepcopy(student)],
                                DistillConfig(combine="confidence"))
    x = torch.randint(0, 512, (2, 16))
    out = obj(student, {"input_ids": x, "labels": x, "step": 7, "index": 0})
    assert abs(float(out["kd_loss"])) < 1e-5
    assert float(out["alpha"]) == pytest.approx(0.7)
    # a different teacher gives a positive loss, and the hard term is lm_loss on aligned labels
    obj2 = DistillationObjective([tiny(1)], DistillConfig(hard_weight=1.0))
    y = torch.roll(x, -1, 1)
    out2 = obj2(student, {"input_ids": x, "labels": y, "step": 0})
    from autoglm.losses import lm_loss
    torch.testing.assert_close(out2["hard_loss"], lm_loss(student(x).logits, y).detach())
    assert float(out2["kd_loss"]) > 1e-4


def test_teacher_vocab_mismatch_is_refused():
    with pytest.raises(ValueError, match="vocabulary of 600 tokens but the student has 512"):
        check_teachers(tiny(0), [tiny(1), tiny(2, vocab_size=600)], ["a", "b"])


def test_logit_cache_reuses_teachers_and_matches(tmp_path):
    student = tiny(0)
    teachers = [tiny(1), tiny(2)]
    calls = []
    for t in teachers:
        t.register_forward_hook(lambda *a: calls.append(1))
    cache = TeacherLogitCache(tmp_path / "c", top_k=512, n_teachers=2, key="k", dtype=torch.float32)
    cached = DistillationObjective(teachers, DistillConfig(cache_top_k=512), cache)
    plain = DistillationObjective(teachers, DistillConfig())
    x = torch.randint(0, 512, (2, 12))
    batches = distill_batches(lambda i: (x + i, x + i), epoch_batches=1)
    b0, b1 = batches(0), batches(1)
    assert b1["index"] == 0 and b1["step"] == 1
    first = cached(student, b0)["kd_loss"]
    n_calls = len(calls)
    second = cached(student, b1)["kd_loss"]
    assert len(calls) == n_calls and cache.hits == 1 and cache.misses == 1  # teachers not re-run
    ref = plain(student, b0)["kd_loss"]  # top-k with k = vocab is the full distribution
    torch.testing.assert_close(first, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(second / kd_scale(1), first / kd_scale(0), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="was made for"):
        TeacherLogitCache(tmp_path / "c", top_k=8, n_teachers=2, key="k")


def test_topk_to_probs_keeps_topk_mass_only():
    logits = torch.randn(1, 2, 10)
    v, i = logits.topk(3, dim=-1)
    p = topk_to_probs(v, i, 10, temperature=2.0)
    full = (logits / 2.0).softmax(-1)
    kept = torch.zeros_like(full).scatter(-1, i, full.gather(-1, i))
    torch.testing.assert_close(p, kept / kept.sum(-1, keepdim=True))


def test_objective_refuses_teacher_with_other_vocabulary_on_first_step():
    obj = DistillationObjective([tiny(1, vocab_size=600)])
    x = torch.randint(0, 512, (1, 8))
    with pytest.raises(ValueError, match="vocabulary of 600 tokens but the student has 512"):
        obj(tiny(0), (x, x))
