"""Early exit: threshold 1.0 == full model; lower thresholds == a naive full-recompute reference;
deferred rows keep every K/V the full model's, in batches, across the window and preemption."""

import pytest
import torch
from inference_helpers import make_model, prompts

from autoglm.inference import EngineConfig, LLMEngine, SamplingParams
from autoglm.inference.early_exit import early_exit_forward
from autoglm.training import EarlyExitObjective


@torch.no_grad()
def reference_early_exit_greedy(model, prompt: list[int], max_tokens: int, threshold: float,
                                exit_layers: tuple[int, ...], max_run: int | None = None) -> tuple[list[int], list[int]]:
    """Greedy decoding with early exit, recomputing the full sequence each token (O(n^2): the
    reference the engine is tested against).

    Every earlier position runs every layer (the engine's deferred rows give them exactly
    that); the new token comes from the first exit layer whose top probability reaches the
    threshold, else from the last layer. The first token comes from the full model (prefill
    never exits, as in the engine), and so does every token after `max_run` exits in a row
    (the engine's `max_deferred`). Returns (tokens, exit layer of each token).
    """
    bb = model.model
    n_layers = len(bb.layers)
    tokens, out, out_exits, run = list(prompt), [], [], 0
    for step in range(max_tokens):
        hs = model(torch.tensor([tokens]), output_hidden_states=True).hidden_states  # hs[l]: after l layers
        logits, last_exit = None, n_layers
        for e in sorted(exit_layers):
            if step > 0 and threshold < 1.0 and 1 <= e < n_layers and (max_run is None or run < max_run):
                lg = model.exit_logits(hs[e][0, -1])
                if float(lg.float().softmax(-1).max()) >= threshold:
                    logits, last_exit = lg, e
                    break
        if logits is None:
            logits = model.lm_head(bb.norm(hs[-1][0, -1]))
        tok = int(logits.argmax())
        run = run + 1 if last_exit < n_layers else 0
        out.append(tok)
        out_exits.append(last_exit)
        tokens.append(tok)
    return out, out_exits


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


def test_early_exit_matches_naive_reference():
    model = make_model("tiny", num_hidden_layers=4, window_size=16)
    p = prompts(1, 10, 11, seed=6)[0]
    # a threshold in the middle of the confidence range so some tokens exit and some do not
    reqs, eng = run(model, [p], 0.08, n=60)
    r = reqs[0]
    ref_tokens, ref_exits = reference_early_exit_greedy(model, p, 60, 0.08, (1, 2, 3), max_run=4)  # block_size
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
    ref_tokens, ref_exits = reference_early_exit_greedy(model, p, 60, 0.08, (1, 2, 3), max_run=3)
    assert len(set(ref_exits[1:])) >= 2  # both exits and full passes
    ids = torch.tensor([p + ref_tokens[:-1]])
    logits, exit_at = early_exit_forward(model, ids, 0.08, (1, 2, 3), prompt_len=len(p), max_run=3)
    _, uncapped = early_exit_forward(model, ids, 0.08, (1, 2, 3), prompt_len=len(p))
    assert (uncapped != exit_at).any()  # the cap on runs of exits was exercised
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


def test_objective_self_distillation_targets_the_full_models_distribution():
    """target="model": the exit loss is -sum_v p_full(v) log q_exit(v), averaged over labelled
    positions (hand-computed), and no gradient reaches the full model's logits through p."""
    model = make_model("tiny", num_hidden_layers=4)
    x = torch.randint(2, 512, (2, 12))
    labels = x.clone()
    labels[0, :5] = -100  # ignored positions take no part
    out = model(x, output_hidden_states=True)
    p = out.logits.float().softmax(-1)
    logq = model.lm_head(model.model.norm(out.hidden_states[3])).float().log_softmax(-1)
    keep = labels != -100
    want = -(p * logq).sum(-1)[keep].mean() * (3 / 4)
    got = EarlyExitObjective(exit_layers=(3,), target="model")(model, (x, labels))
    torch.testing.assert_close(got["exit_loss"], want)
    upper = [q for layer in model.model.layers[2:] for q in layer.parameters()]  # above the exit at 2

    def upper_grads(weight):
        model.zero_grad()
        EarlyExitObjective(weight, exit_layers=(2,), target="model")(model, (x, labels))["loss"].backward()
        return [q.grad.clone() for q in upper]

    for a, b in zip(upper_grads(0.0), upper_grads(5.0)):  # the target is detached: only the LM loss reaches them
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="exit target"):
        EarlyExitObjective(target="teacher")


def assert_tokens_from_full_model_states(model, prompt, out_ids, exits):
    """Each generated token is the argmax of the exit (or last) layer on the *full* model's hidden
    states of its prefix: the K/V every token read was the full model's, deferred rows included."""
    ids = torch.tensor([prompt + out_ids[:-1]])
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
    for j, (tok, e) in enumerate(zip(out_ids, exits)):
        h = hs[e][0, len(prompt) - 1 + j]
        logits = model.exit_logits(h)
        assert int(logits.argmax()) == tok, f"token {j} (exit layer {e})"


@pytest.mark.parametrize("num_blocks", [256, 14])  # 14 blocks of 4 slots for 4 requests: preemptions
def test_deferred_rows_in_batches_past_the_window(num_blocks):
    # window 8 << 70 tokens: deferred tokens fall out of the window; a 1-token prompt makes some
    # global positions (< 4) generated tokens that may exit; concurrent requests exit together
    model = make_model("tiny", num_hidden_layers=4, window_size=8, num_global_tokens=4)
    ps = [prompts(1, 1, 2, seed=3)[0]] + prompts(3, 5, 20, seed=7)
    eng = LLMEngine(model, config=EngineConfig(block_size=4, num_blocks=num_blocks, max_num_seqs=4,
                                               max_num_batched_tokens=16, early_exit_threshold=0.08,
                                               exit_layers=(1, 2)))
    reqs = eng.generate(ps, SamplingParams(max_tokens=70, temperature=0, ignore_eos=True))
    exits = [e for r in reqs for e in r.exit_layers[1:]]
    assert {1, 2, 4} <= set(exits)  # both exits and full passes happened
    for p, r in zip(ps, reqs):
        assert_tokens_from_full_model_states(model, p, r.output_ids, r.exit_layers)
    assert not eng.runner.deferred  # finished requests leave nothing behind
    assert eng.pool.num_free == num_blocks
    if num_blocks == 14:
        assert eng.stats.preemptions > 0


def test_early_exit_refuses_lora_adapters(tmp_path):
    model = make_model("tiny", num_hidden_layers=2)
    eng = LLMEngine(model, config=EngineConfig(early_exit_threshold=0.5))
    with pytest.raises(ValueError, match="early exit"):
        eng.add_lora("a", tmp_path)
