"""Trainer: learning, gradient accumulation, exact resume, gradient checkpointing, stops."""

import copy
import json

import pytest
import torch

from autoglm.losses import lm_loss
from autoglm.training import CheckpointError, TrainConfig, Trainer, load_latest
from training_helpers import batch_fn, eval_fn, make_model, pattern_tokens, random_tokens

B, T = 4, 32


def cfg(**kw) -> TrainConfig:
    base = dict(batch_size=B, seq_len=T, warmup_steps=2, max_steps=10, lr=3e-3, eval_every=0, eval_batches=2,
                save_every=0, log_every=1)
    return TrainConfig(**{**base, **kw})


def trainer(model, c, tokens, out_dir=None, **kw) -> Trainer:
    return Trainer(model, c, batch_fn(tokens, c.batch_size, c.seq_len), eval_fn(tokens, c.batch_size, c.seq_len),
                   out_dir=out_dir, progress=False, **kw)


def read_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_training_learns_a_repeating_sequence(tmp_path):
    tokens = pattern_tokens()
    t = trainer(make_model(), cfg(max_steps=40, warmup_steps=4), tokens, out_dir=tmp_path)
    before = t._run_eval()
    result = t.fit()
    losses = [r["loss"] for r in result.history if "loss" in r]
    assert len(losses) == 40 and result.steps == 40 and result.stop_reason == "max_steps"
    assert losses[-1] < 0.25 * losses[0]
    assert result.final_eval["loss"] < 0.25 * before["loss"] and result.final_eval["accuracy"] > 0.9
    rows = read_rows(tmp_path / "metrics.jsonl")
    assert {"step", "loss", "lm_loss", "aux_loss", "lr", "grad_norm", "tokens_per_s", "elapsed"} <= set(rows[0])
    assert {"val_loss", "val_ppl", "val_acc"} <= set(rows[-1]) and rows[-1]["step"] == 40
    assert rows[0]["aux_loss"] > 0  # the tiny preset is MoE: its aux loss is part of "loss"
    assert rows[0]["loss"] == pytest.approx(rows[0]["lm_loss"] + rows[0]["aux_loss"], rel=1e-6)
    assert load_latest(tmp_path / "checkpoints").name == "step-000040"


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_grad_accumulation_matches_one_big_batch():
    # the load-balancing loss is a product of batch means (not additive over micro-batches): off here
    model = make_model(router_aux_loss_coef=0.0)
    tokens = random_tokens()
    big = batch_fn(tokens, 8, T)
    halves = lambda i: tuple(x[(i % 2) * 4:(i % 2) * 4 + 4] for x in big(i // 2))  # micro i -> half of big batch

    a = Trainer(copy.deepcopy(model), cfg(batch_size=8), big, progress=False)
    b = Trainer(copy.deepcopy(model), cfg(batch_size=4, grad_accum=2), halves, progress=False)
    ma, mb = a.forward_backward(0), b.forward_backward(0)
    ga, gb = grads(a.model), grads(b.model)
    # independent reference: plain autograd on the 8-sequence batch
    ref = copy.deepcopy(model)
    x, y = big(0)
    out = ref(x)
    (lm_loss(out.logits, y) + out.aux_loss).backward()
    gr = grads(ref)
    assert ga.keys() == gb.keys() == gr.keys()
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], atol=1e-6, rtol=1e-5, msg=n)
        torch.testing.assert_close(ga[n], gr[n], atol=1e-6, rtol=1e-5, msg=n)
    torch.testing.assert_close(mb["loss"], ma["loss"], atol=1e-6, rtol=1e-6)
    assert a.tokens_seen == b.tokens_seen == 8 * T


class CrashAt:
    def __init__(self, step):
        self.step = step

    def on_step(self, trainer, metrics):
        if trainer.step == self.step:
            raise RuntimeError("simulated crash")


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    tokens = random_tokens()
    c = cfg(max_steps=12, save_every=6, eval_every=6, keep_checkpoints=2)
    dropout = dict(dropout=0.1)  # dropout makes the RNG restore matter

    a = trainer(make_model(0, **dropout), c, tokens, out_dir=tmp_path / "a")
    res_a = a.fit()

    b = trainer(make_model(0, **dropout), c, tokens, out_dir=tmp_path / "b", callbacks=[CrashAt(8)])
    with pytest.raises(RuntimeError, match="simulated crash"):
        b.fit()  # dies after step 8; the latest checkpoint is step 6
    assert load_latest(tmp_path / "b" / "checkpoints").name == "step-000006"

    c_model = make_model(99, **dropout)  # different init: everything must come from the checkpoint
    resumed = trainer(c_model, c, tokens, out_dir=tmp_path / "b")
    res_c = resumed.fit(resume=True)
    assert res_c.steps_run == 6 and res_c.steps == 12

    rows_a, rows_b = read_rows(tmp_path / "a" / "metrics.jsonl"), read_rows(tmp_path / "b" / "metrics.jsonl")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("elapsed", "tokens_per_s", "mfu")} for r in rows]
    assert [r["step"] for r in rows_b] == [r["step"] for r in rows_a]  # steps 7, 8 of the crash were dropped
    assert strip(rows_b) == strip(rows_a)  # identical losses, lr, grad norms, eval rows: exact equality
    assert [r["loss"] for r in res_c.history if "loss" in r] == [r["loss"] for r in res_a.history if "loss" in r][6:]
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    assert res_c.final_eval == res_a.final_eval
    assert resumed.tokens_seen == a.tokens_seen == 12 * B * T


def test_resume_without_checkpoint_and_fresh_start_over_one_are_refused(tmp_path):
    tokens = random_tokens()
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        trainer(make_model(), cfg(), tokens, out_dir=tmp_path).fit(resume=True)
    trainer(make_model(), cfg(max_steps=2), tokens, out_dir=tmp_path).fit()
    with pytest.raises(ValueError, match="resume=True"):
        trainer(make_model(), cfg(max_steps=2), tokens, out_dir=tmp_path).fit()


def test_gradient_checkpointing_gives_the_same_gradients():
    model = make_model()
    plain = Trainer(copy.deepcopy(model), cfg(), batch_fn(random_tokens(), B, T), progress=False)
    ckpt = Trainer(copy.deepcopy(model), cfg(grad_checkpointing=True), batch_fn(random_tokens(), B, T),
                   progress=False)
    assert ckpt.model.model.gradient_checkpointing and not plain.model.model.gradient_checkpointing
    calls = []
    ckpt.model.model.layers[0].register_forward_pre_hook(lambda *a: calls.append(1))
    plain.forward_backward(0)
    ckpt.forward_backward(0)
    assert len(calls) == 2  # forward + recomputation in backward: checkpointing really ran
    g1, g2 = grads(plain.model), grads(ckpt.model)
    assert g1.keys() == g2.keys()
    for n in g1:
        torch.testing.assert_close(g2[n], g1[n], atol=1e-6, rtol=1e-5, msg=n)


def test_time_budget_stops_early_but_still_evaluates_and_saves(tmp_path):
    t = trainer(make_model(), cfg(max_steps=1000, max_seconds=1e-3), random_tokens(), out_dir=tmp_path)
    result = t.fit()
    assert result.stop_reason == "max_seconds" and result.steps < 1000
    assert result.final_eval is not None
    assert load_latest(tmp_path / "checkpoints").name == f"step-{result.steps:06d}"


def test_callbacks_see_rows_and_can_stop(tmp_path):
    seen = {"step": [], "eval": []}

    class Recorder:
        def on_step(self, trainer, metrics):
            seen["step"].append(metrics["step"])
            if trainer.step == 4:
                trainer.should_stop = True

        def on_eval(self, trainer, metrics):
            seen["eval"].append((metrics["step"], metrics["val_loss"]))

    t = trainer(make_model(), cfg(eval_every=2, log_every=2), random_tokens(), callbacks=[Recorder()])
    result = t.fit()
    assert result.stop_reason == "callback" and result.steps == 4
    assert seen["step"] == [1, 2, 4]  # first step, then every log_every
    assert [s for s, _ in seen["eval"]] == [2, 4]  # no duplicate final eval at step 4
    assert result.final_eval["loss"] == seen["eval"][-1][1]


def test_bf16_autocast_runs_on_cpu():
    t = trainer(make_model(), cfg(max_steps=2, precision="bf16"), random_tokens())
    result = t.fit()
    assert t.precision == "bf16" and result.steps == 2
    assert all(p.dtype == torch.float32 for p in t.model.parameters())  # master weights stay fp32


class _PairsObjective:
    """A regression 'objective' whose batches carry no input_ids: it names its own throughput."""

    unit = "pairs"

    @staticmethod
    def count(batch):
        return batch["x"].shape[0]

    def __call__(self, model, batch):
        return {"loss": (model(batch["x"]) - batch["y"]).pow(2).mean()}


def test_objective_names_the_unit_of_throughput(tmp_path):
    import io

    from rich.console import Console

    model = torch.nn.Linear(3, 1)
    data = lambda i: {"x": torch.randn(6, 3, generator=torch.Generator().manual_seed(i)), "y": torch.zeros(6, 1)}
    out = io.StringIO()
    t = Trainer(model, cfg(max_steps=4), data, out_dir=tmp_path, objective=_PairsObjective(),
                console=Console(file=out, force_terminal=True, width=160))
    result = t.fit()
    rows = [r for r in read_rows(tmp_path / "metrics.jsonl") if "loss" in r]
    assert all(r["pairs_per_s"] > 0 and "tokens_per_s" not in r and "mfu" not in r for r in rows)
    assert rows[-1]["pairs_seen"] == 4 * 6 and result.unit == "pairs" and result.rate > 0
    assert "pairs/s" in out.getvalue() and "tok/s" not in out.getvalue()
    with pytest.raises(AttributeError, match="counted pairs, not tokens"):
        result.tokens_per_s
