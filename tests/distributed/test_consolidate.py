"""`autoglm consolidate`: a distributed checkpoint becomes one safetensors
model directory. Checkpoints here are written in one process through the same DCP writer the
strategies use (no process group needed); test_data_parallel.py and the slow CLI tests
consolidate real 2-rank fsdp / tp / pp / ep checkpoints."""

import json

import pytest
import torch
from safetensors.torch import load_file

from autoglm import OpenAutoGLMConfig, OpenAutoGLMForCausalLM
from autoglm.distributed.checkpoint import save_distributed_checkpoint
from autoglm.distributed.consolidate import consolidate, resolve_checkpoint
from autoglm.training import SingleDevice
from autoglm.training.checkpoint import CheckpointError, save_checkpoint

CONFIG = dict(vocab_size=64, hidden_size=16, num_attention_heads=2, num_key_value_heads=1, num_experts=4,
              expert_intermediate_size=16, max_position_embeddings=64, window_size=8, num_global_tokens=2)


def _model(seed: int = 0) -> OpenAutoGLMForCausalLM:
    torch.manual_seed(seed)
    return OpenAutoGLMForCausalLM(OpenAutoGLMConfig.from_name("tiny", **CONFIG))


def _dcp_run(tmp_path, step: int = 3):
    """A run directory with a DCP checkpoint of a model with AdamW state; returns (run, model)."""
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randint(0, 64, (2, 8)), labels=torch.randint(0, 64, (2, 8))).loss.backward()
    opt.step()
    run = tmp_path / "run"
    save_distributed_checkpoint(SingleDevice("cpu"), run / "checkpoints", step, model, opt, None,
                                {"strategy": "fsdp"})
    return run, model


def test_consolidated_model_equals_the_checkpointed_weights_and_loads_with_from_pretrained(tmp_path):
    run, model = _dcp_run(tmp_path)
    out = consolidate(run, tmp_path / "model")  # a run directory: its checkpoints/latest
    loaded = OpenAutoGLMForCausalLM.from_pretrained(out)
    want = model.state_dict()
    got = loaded.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    # every expert of every MoE layer is in the file (none silently left at its initial value)
    tensors = load_file(out / "model.safetensors")
    assert {k for k in want if ".experts.3." in k} <= set(tensors)
    info = json.loads((out / "run.json").read_text())
    assert info["step"] == 3 and info["strategy"] == "fsdp"
    ids = torch.randint(0, 64, (1, 8))
    assert torch.equal(loaded.eval()(ids).logits, model.eval()(ids).logits)


def test_checkpoint_can_be_named_by_its_folder_or_the_checkpoints_folder(tmp_path):
    run, _ = _dcp_run(tmp_path)
    step = run / "checkpoints" / "step-000003"
    assert resolve_checkpoint(step) == step
    assert resolve_checkpoint(run / "checkpoints") == step
    assert resolve_checkpoint(run) == step


def test_missing_or_truncated_rank_shard_is_named_not_loaded_partially(tmp_path):
    run, _ = _dcp_run(tmp_path)
    step = run / "checkpoints" / "step-000003"
    shard = next(step.glob("*.distcp"))
    data = shard.read_bytes()
    shard.write_bytes(data[:100])
    with pytest.raises(CheckpointError, match=rf"incomplete \(truncated {shard.name};.*copy the whole step folder"):
        consolidate(step, tmp_path / "model")
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"incomplete \(missing {shard.name};"):
        consolidate(step, tmp_path / "model")
    assert not (tmp_path / "model" / "model.safetensors").exists()


def test_existing_model_directory_is_kept_without_overwrite(tmp_path):
    run, model = _dcp_run(tmp_path)
    out = tmp_path / "model"
    _model(seed=1).save_pretrained(out)
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="--overwrite"):
        consolidate(run, out)
    assert (out / "model.safetensors").read_bytes() == before
    consolidate(run, out, overwrite=True)
    got = load_file(out / "model.safetensors")
    assert torch.equal(got["model.embed_tokens.weight"], model.state_dict()["model.embed_tokens.weight"])


def test_checkpoint_without_model_config_names_the_fix(tmp_path):
    run, _ = _dcp_run(tmp_path)
    step = run / "checkpoints" / "step-000003"
    (step / "config.json").unlink()  # as in a checkpoint written before checkpoints carried it
    with pytest.raises(FileNotFoundError, match="carries no config.json.*copy the run's config.json"):
        consolidate(step, tmp_path / "model")
    _model().config.save_pretrained(run)  # the run's own config.json is the fallback
    consolidate(step, tmp_path / "model")
    assert (tmp_path / "model" / "model.safetensors").is_file()


def test_command_line_errors_exit_2_with_the_fix(tmp_path):
    from typer.testing import CliRunner

    from autoglm.cli import app

    def run(*args):
        r = CliRunner().invoke(app, ["consolidate", *map(str, args)])
        return r.exit_code, " ".join(r.output.split())

    code, output = run(tmp_path / "nowhere", "--out", tmp_path / "m")
    assert code == 2 and "does not exist; pass a run directory" in output
    # a one-process checkpoint is already a single safetensors model
    save_checkpoint(tmp_path / "single" / "checkpoints", 1, _model(), None, None, {})
    code, output = run(tmp_path / "single", "--out", tmp_path / "m")
    assert code == 2 and "one-process checkpoint" in output
    run_dir, _ = _dcp_run(tmp_path)
    code, output = run(run_dir, "--out", tmp_path / "m")
    assert code == 0 and "model written to" in output and (tmp_path / "m" / "model.safetensors").is_file()


def test_an_align_runs_checkpoint_is_refused_with_how_to_save_its_model(tmp_path):
    from autoglm.recipes.align import AlignConfig
    from autoglm.settings import load_config, to_yaml

    run, _ = _dcp_run(tmp_path)
    (run / "checkpoints" / "step-000003" / "config.json").unlink()  # an align checkpoint carries none
    (run / "config.yaml").write_text(to_yaml(load_config(AlignConfig, overrides={"out": str(run)})))
    (run / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match=r"is an `autoglm align` run: .*autoglm align --resume --out .* "
                                         r"--strategy single --nproc 1"):
        consolidate(run, tmp_path / "model")
    assert not (tmp_path / "model").exists()
