"""ddp, fsdp and zero1 on 2 gloo processes against one process: same losses and parameters,
FSDP checkpoints resumed in one process and in two (also under another strategy), a killed
rank failing the run with a clear error, and a crash mid-save leaving the last complete
checkpoint as latest."""

import pytest
import torch
from safetensors.torch import load_file

from autoglm.distributed.consolidate import consolidate
from autoglm.training import SingleDevice
from dp_workers import equivalence_worker, killed_rank_worker, single_run, spawn

# fp32 on CPU; the only differences come from the order of float additions (gradients summed
# over two halves of the batch, then all-reduced). Measured: losses equal to the last bit,
# parameters within 1.2e-7 after 4 AdamW steps (weights of magnitude ~0.1-1)
LOSS_RTOL = 1e-6
PARAM_ATOL = 1e-6


def _close_params(got: dict, ref: dict) -> float:
    assert set(got) == set(ref)
    return max((got[k].float() - ref[k].float()).abs().max().item() for k in ref)


def test_ddp_fsdp_zero1_match_one_process_and_fsdp_checkpoints_resume(tmp_path):
    ref_losses, ref_params = single_run()
    codes, _ = spawn(equivalence_worker, 2, str(tmp_path))
    assert codes == [0, 0], f"a worker failed (exit codes {codes}); see its traceback above"
    res = torch.load(tmp_path / "results.pt", weights_only=True)
    for name in ("ddp", "fsdp", "zero1"):
        assert res[name]["losses"] == pytest.approx(ref_losses, rel=LOSS_RTOL), name
        assert _close_params(res[name]["params"], ref_params) < PARAM_ATOL, name
    # the FSDP checkpoint at step 2 resumed on 2 ranks (fsdp, and zero1) reproduces steps 3-4
    for name in ("resume-fsdp", "resume-zero1"):
        assert res[name]["losses"] == pytest.approx(ref_losses[2:], rel=LOSS_RTOL), name
        assert _close_params(res[name]["params"], ref_params) < PARAM_ATOL, name
    # one command turns the 2-rank FSDP checkpoint into one safetensors model: the weights of
    # a one-process run after the same 2 steps
    assert (tmp_path / "fsdp-ckpt" / "checkpoints" / "step-000002" / ".metadata").is_file()
    _, ref_params_2 = single_run(stop_at=2)
    consolidate(tmp_path / "fsdp-ckpt", tmp_path / "fsdp-model")
    merged = load_file(tmp_path / "fsdp-model" / "model.safetensors")
    merged.setdefault("lm_head.weight", merged["model.embed_tokens.weight"])  # tied: stored once
    assert _close_params(merged, ref_params_2) < PARAM_ATOL
    # ... and in one process, without a process group
    one_losses, one_params = single_run(tmp_path / "fsdp-ckpt", resume=True)
    assert one_losses == pytest.approx(ref_losses[2:], rel=LOSS_RTOL)
    assert _close_params(one_params, ref_params) < PARAM_ATOL


def test_killed_rank_fails_the_run_and_keeps_the_last_complete_checkpoint(tmp_path):
    codes, _ = spawn(killed_rank_worker, 2, str(tmp_path), timeout=90)
    assert codes == [7, 3], f"exit codes {codes}: rank 0 should fail with an error (7), not hang (None)"
    msg = (tmp_path / "error.txt").read_text()
    assert "another rank probably crashed" in msg and "--resume" in msg
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step-000002"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-000002"]  # no partial step-4, no temp dir
    # rank 0 noticed within its 5 s collective timeout (plus slack for a loaded machine)
    assert float((tmp_path / "failed_at").read_text()) - float((tmp_path / "died_at").read_text()) < 30


def test_moe_expert_without_tokens_trains_like_one_process_under_ddp_zero1_and_fsdp(tmp_path):
    """An expert that no token chose has no gradient on that rank: DDP (and ZeRO-1, DDP
    inside) used to fail the next step with "Expected to have finished reduction in the prior
    iteration". Under ddp, zero1 and fsdp the run completes and equals one process; the
    never-used expert is untouched (no gradient, so AdamW neither decays nor moves it), as in
    one process."""
    from dp_workers import UNUSED_EXPERT, moe_unused_expert_run, moe_unused_expert_worker

    ref_losses, ref_params, init = moe_unused_expert_run(SingleDevice("cpu"))
    codes, _ = spawn(moe_unused_expert_worker, 2, str(tmp_path))
    assert codes == [0, 0], f"a worker failed (exit codes {codes}); see its traceback above"
    res = torch.load(tmp_path / "moe.pt", weights_only=True)
    unused = [k for k in ref_params if f"experts.{UNUSED_EXPERT}." in k]
    assert unused and all(torch.equal(ref_params[k], init[k]) for k in unused)
    for name in ("ddp", "zero1", "fsdp"):
        assert res[name]["losses"] == pytest.approx(ref_losses, rel=LOSS_RTOL), name
        assert _close_params(res[name]["params"], ref_params) < PARAM_ATOL, name
        assert all(torch.equal(res[name]["params"][k], init[k]) for k in unused), name


def test_ranks_wait_for_rank_0_working_alone_past_the_collective_timeout(tmp_path):
    """--dist-timeout detects dead or hung ranks; one rank preparing the corpus or finishing a
    checkpoint's files for longer than it (6 s against 2 s here) used to fail the other ranks
    with "Timed out waiting 2000ms". Now they wait, and the run completes with its checkpoints."""
    from dp_workers import slow_main_rank_worker

    codes, _ = spawn(slow_main_rank_worker, 2, str(tmp_path), timeout=150)
    assert codes == [0, 0], f"a worker failed (exit codes {codes}); see its traceback above"
    assert (tmp_path / "done-0").is_file() and (tmp_path / "done-1").is_file()
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step-000004"
    assert (ckpts / "step-000002" / ".metadata").is_file() and (ckpts / "step-000004" / ".metadata").is_file()


def test_only_rank_0_trains_the_tokenizer_and_every_rank_uses_it(tmp_path):
    """Under a multi-process strategy rank 0 trains the BPE tokenizer and saves it into OUT
    before the barrier; the other ranks load that one (training it again cost the same time
    on every rank) and end up with the identical tokenizer."""
    from dp_workers import tokenizer_once_worker

    (tmp_path / "corpus.txt").write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n"
                                                 for i in range(400)))
    codes, _ = spawn(tokenizer_once_worker, 2, str(tmp_path), timeout=150)
    assert codes == [0, 0], f"a worker failed (exit codes {codes}); see its traceback above"
    assert (tmp_path / "trained-0").is_file() and not (tmp_path / "trained-1").exists()
    assert (tmp_path / "tok-0.json").read_text() == (tmp_path / "tok-1.json").read_text()
    assert (tmp_path / "run" / "model.safetensors").is_file()
