"""Checkpoints: exact round trip, atomicity under a crash mid-save, fallbacks, clear errors."""

import json
import os

import pytest
import torch

from autoglm.training import (CheckpointError, TrainConfig, build_optimizer, build_scheduler, list_checkpoints,
                              load_checkpoint, load_latest, save_checkpoint)
from autoglm.training import checkpoint as ckpt_mod
from autoglm import atomic as atomic_mod
from autoglm.training.objectives import CausalLMObjective
from training_helpers import batch_fn, make_model, random_tokens

CFG = TrainConfig(batch_size=2, seq_len=16, warmup_steps=1, max_steps=10)


def trained(seed=0, steps=2):
    """A tiny model, its AdamW and schedule after `steps` real updates (non-trivial state)."""
    model = make_model(seed)
    opt = build_optimizer(model, CFG)
    sched = build_scheduler(opt, CFG)
    batches = batch_fn(random_tokens(), CFG.batch_size, CFG.seq_len)
    for s in range(steps):
        opt.zero_grad()
        CausalLMObjective()(model, batches(s))["loss"].backward()
        opt.step()
        sched.step()
    return model, opt, sched


def visible(root):
    return sorted(p.name for p in root.iterdir() if not p.name.startswith("."))


def test_round_trip_restores_weights_optimizer_scheduler_and_rng(tmp_path):
    model, opt, sched = trained()
    path = save_checkpoint(tmp_path, 2, model, opt, sched, {"tokens_seen": 64})
    expected_rand = torch.rand(5)  # the draw right after the save

    model2, opt2, sched2 = trained(seed=1, steps=0)
    torch.manual_seed(123)  # scramble the RNG
    state = load_checkpoint(path, model2, opt2, sched2)
    assert state["step"] == 2 and state["tokens_seen"] == 64
    for k, v in model.state_dict().items():
        assert torch.equal(v, model2.state_dict()[k]), k
    assert model2.lm_head.weight.data_ptr() == model2.model.embed_tokens.weight.data_ptr()  # still tied
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for i in s1["state"]:
        for k in s1["state"][i]:
            assert torch.equal(s1["state"][i][k], s2["state"][i][k])
    assert sched2.state_dict() == sched.state_dict()
    assert torch.equal(torch.rand(5), expected_rand)
    # every pickle in the checkpoint loads with weights_only=True
    for f in ("optimizer.pt", "rng.pt"):
        torch.load(path / f, weights_only=True)
    assert json.loads((path / "config.json").read_text())["model_type"] == "open_autoglm"


def test_crash_mid_save_keeps_previous_checkpoint_as_latest(tmp_path, monkeypatch):
    model, opt, sched = trained()
    save_checkpoint(tmp_path, 2, model, opt, sched, {})

    def boom():  # raised after the weights and optimizer files are already written
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ckpt_mod, "capture_rng_state", boom)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(tmp_path, 4, model, opt, sched, {})
    assert (tmp_path / "latest").read_text().strip() == "step-000002"
    assert visible(tmp_path) == ["latest", "step-000002"]  # no partial step-000004
    assert load_latest(tmp_path) == tmp_path / "step-000002"
    monkeypatch.undo()
    save_checkpoint(tmp_path, 4, model, opt, sched, {})  # a later save still works
    assert load_latest(tmp_path) == tmp_path / "step-000004"


def test_killed_process_leftovers_are_ignored_and_cleaned(tmp_path):
    model, opt, sched = trained(steps=0)
    save_checkpoint(tmp_path, 1, model, opt, sched, {})
    partial = tmp_path / ".step-000002.tmp-deadbeef"  # what a SIGKILL mid-save leaves behind
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half a file")
    assert load_latest(tmp_path) == tmp_path / "step-000001"
    save_checkpoint(tmp_path, 2, model, opt, sched, {})
    assert not partial.exists()


def test_crash_between_rename_and_latest_update(tmp_path, monkeypatch):
    model, opt, sched = trained(steps=0)
    save_checkpoint(tmp_path, 1, model, opt, sched, {})
    monkeypatch.setattr(ckpt_mod, "_write_latest", lambda root, name: (_ for _ in ()).throw(OSError("killed")))
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 2, model, opt, sched, {})
    # step-000002 is complete but `latest` was never moved: the pointer stays authoritative
    assert load_latest(tmp_path) == tmp_path / "step-000001"


def test_stale_latest_falls_back_to_newest_complete(tmp_path):
    model, opt, sched = trained(steps=0)
    for s in (1, 2):
        save_checkpoint(tmp_path, s, model, opt, sched, {})
    (tmp_path / "latest").write_text("step-000009\n")
    assert load_latest(tmp_path) == tmp_path / "step-000002"
    assert load_latest(tmp_path / "nothing-here") is None


def test_pruning_keeps_the_newest(tmp_path):
    model, opt, sched = trained(steps=0)
    for s in (1, 2, 3, 4):
        save_checkpoint(tmp_path, s, model, opt, sched, {}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000003", "step-000004"]


def test_resaving_a_step_replaces_it(tmp_path):
    model, opt, sched = trained(steps=0)
    save_checkpoint(tmp_path, 3, model, opt, sched, {"tag": "first"})
    save_checkpoint(tmp_path, 3, model, opt, sched, {"tag": "second"})
    assert json.loads((tmp_path / "step-000003" / "trainer_state.json").read_text())["tag"] == "second"
    assert visible(tmp_path) == ["latest", "step-000003"]


def test_missing_checkpoint_error_names_path_and_fix(tmp_path):
    model = make_model()
    missing = tmp_path / "runs" / "step-000007"
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(missing, model)
    msg = str(err.value)
    assert str(missing) in msg and "without resuming" in msg and "another output directory" in msg


@pytest.mark.parametrize("victim", ["model.safetensors", "optimizer.pt", "trainer_state.json"])
def test_corrupt_checkpoint_error_names_the_file(tmp_path, victim):
    model, opt, sched = trained(steps=0)
    path = save_checkpoint(tmp_path, 1, model, opt, sched, {})
    data = (path / victim).read_bytes()
    (path / victim).write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="corrupt") as err:
        load_checkpoint(path, model, opt, sched)
    assert str(path) in str(err.value)


def test_checkpoint_of_another_model_is_refused(tmp_path):
    model, opt, sched = trained(steps=0)
    path = save_checkpoint(tmp_path, 1, model, opt, sched, {})
    with pytest.raises(CheckpointError, match="does not match the model"):
        load_checkpoint(path, make_model(preset="standard-tiny"))
    with pytest.raises(CheckpointError, match="does not fit the model"):
        load_checkpoint(path, make_model(hidden_size=32))


def test_files_are_flushed_before_rename(tmp_path, monkeypatch):
    """Every file of the new checkpoint is fsync'ed before the directory becomes visible."""
    synced, order = [], []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(atomic_mod.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    monkeypatch.setattr(atomic_mod.os, "replace",
                        lambda a, b: (order.append((len(synced), str(b))), real_replace(a, b))[1])
    model, opt, sched = trained(steps=0)
    save_checkpoint(tmp_path, 1, model, opt, sched, {})
    n_files = len(list((tmp_path / "step-000001").iterdir()))
    synced_before_rename = next(n for n, dst in order if dst.endswith("step-000001"))
    assert synced_before_rename >= n_files + 1  # files + the temp directory
