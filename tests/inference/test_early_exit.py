"""Early exit: threshold 1.0 == full model; lower thresholds == a naive full-recompute reference."""

import torch
from inference_helpers import make_model, prompts

from autoglm.inference import EngineConfig, LLMEngine, SamplingParams
from autoglm.inference.early_exit import EarlyExitObjective, early_exit_forward, reference_early_exit_greedy


def run(model, ps, threshold, n=40):
    eng = LLMEngine(model, config=EngineConfig(block_size=4, num_blocks=256, early_exit_threshold=threshold))
    return eng.generate(ps, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)), eng


def test_threshold_one_is_the_full_model():
    model = make_model("tiny", num_hidden_layers=4)
    ps = prompts(3, 5, 30, seed=5)
    reqs, eng = run(model, ps, 1.0)
    for p, r in zip(ps, reqs):
        full = model.generate(torch.tensor([p]), max_new_tokens=40, do_sample=False, eos_token_id=None,
                              pad_token_id=1)[0, len(p):].tolist()
        assert r.output_ids == full
        assert set(r.exit_layers) == {4}


def test_early_exit_matches_naive_reference_with_kv_fill():
    model = make_model("tiny", num_hidden_layers=4, window_size=16)
    p = prompts(1, 10, 11, seed=6)[0]
    # a threshold in the middle of the confidence range so some tokens exit and some do not
    reqs, eng = run(model, [p], 0.08, n=60)
    r = reqs[0]
    ref_tokens, ref_exits = reference_early_exit_greedy(model, p, 60, 0.08, (1, 2, 3))
    assert r.exit_layers == ref_exits
    assert r.output_ids == ref_tokens
    assert len(set(r.exit_layers[1:])) >= 2 and min(r.exit_layers) < 4  # both exits and full passes happened
    assert eng.stats.layers_run < 4 * eng.stats.decode_steps


def test_early_exit_objective_trains_intermediate_exits():
    model = make_model("tiny", num_hidden_layers=3)
    x = torch.randint(2, 512, (4, 16))
    obj = EarlyExitObjective(exit_weight=1.0)
    out = obj(model, (x, x))
    # independent recomputation of the exit term from hidden states
    hs = model(x, output_hidden_states=True).hidden_states
    ce = lambda h: torch.nn.functional.cross_entropy(model.lm_head(model.model.norm(h)).flatten(0, 1), x.flatten())
    expected = (ce(hs[1]) * (1 / 3) + ce(hs[2]) * (2 / 3)) / 2
    torch.testing.assert_close(out["exit_loss"], expected)
    torch.testing.assert_close(out["loss"], out["lm_loss"] + out["aux_loss"] + expected)
    out["loss"].backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None


def test_teacher_forced_early_exit_matches_naive_reference():
    # the validation-loss path: one layer-parallel pass over given text must pick the same exits
    # (with the same KV fill) and the same tokens as the token-by-token reference decoder
    model = make_model("tiny", num_hidden_layers=4, window_size=16)
    p = prompts(1, 10, 11, seed=6)[0]
    ref_tokens, ref_exits = reference_early_exit_greedy(model, p, 60, 0.08, (1, 2, 3))
    assert len(set(ref_exits[1:])) >= 2  # both exits and full passes
    ids = torch.tensor([p + ref_tokens[:-1]])
    logits, exit_at = early_exit_forward(model, ids, 0.08, (1, 2, 3), prompt_len=len(p))
    assert exit_at[0, len(p) - 1:].tolist() == ref_exits
    assert logits[0, len(p) - 1:].argmax(-1).tolist() == ref_tokens
    assert (exit_at[0, :len(p) - 1] == 4).all()  # prefill never exits
    full, never = early_exit_forward(model, ids, 1.0, (1, 2, 3))
    torch.testing.assert_close(full, model(ids).logits)
    assert (never == 4).all()


def test_objective_exit_layers_restricts_the_intermediate_losses():
    model = make_model("tiny", num_hidden_layers=4)
    x = torch.randint(2, 512, (2, 12))
    hs = model(x, output_hidden_states=True).hidden_states
    ce = lambda h: torch.nn.functional.cross_entropy(model.lm_head(model.model.norm(h)).flatten(0, 1), x.flatten())
    out = EarlyExitObjective(exit_layers=(2,))(model, (x, x))
    torch.testing.assert_close(out["exit_loss"], ce(hs[2]) * (2 / 4))
    for bad in [(), (0,), (4,)]:
        try:
            EarlyExitObjective(exit_layers=bad)(model, (x, x))
        except ValueError:
            continue
        raise AssertionError(f"exit_layers={bad} was accepted")
