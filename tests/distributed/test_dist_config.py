"""Bad input for distributed runs is refused before training, with the fix named: a global
batch that does not split over the ranks, an unknown strategy, a multi-node run without a
rendezvous endpoint, a missing torchrun environment, fp16 without CUDA, and a checkpoint
from another model config, a rendezvous host that does not resolve or nodes that never meet.
Plus the registry and the launcher's command line."""


import sys

import numpy as np
import pytest
import torch

from autoglm.data import sample_batch
from autoglm.distributed import STRATEGIES, make_strategy, register_strategy, strategy_names
from autoglm.distributed.checkpoint import load_distributed_checkpoint, save_distributed_checkpoint
from autoglm.distributed.config import DistributedSpec
from autoglm.distributed.data import rank_batch, rank_rows
from autoglm.distributed import launch as launch_module
from autoglm.distributed.launch import (STARTED_ENV, RendezvousError, check_rendezvous_endpoint, launch,
                                       torchrun_command)
from autoglm.distributed.worker import mark_started
from autoglm.distributed.runtime import read_env
from autoglm.recipes.pretrain import PretrainConfig
from autoglm.settings import ConfigError, load_config
from autoglm.training import CheckpointError, SingleDevice, TrainConfig, load_latest
from dp_workers import make_model, single_run


def test_rank_batches_partition_the_one_process_batch():
    tokens = np.arange(5000, dtype=np.int64)
    whole = sample_batch(tokens, 8, 16, step=7, seed=3)
    for world in (1, 2, 4):
        parts = [rank_batch(tokens, 8, 16, 7, 3, rank=r, world_size=world) for r in range(world)]
        assert torch.equal(torch.cat([p[0] for p in parts]), whole[0])
        assert torch.equal(torch.cat([p[1] for p in parts]), whole[1])


def test_global_batch_not_divisible_by_world_size():
    with pytest.raises(ValueError, match=r"global batch \(6 sequences\) must be divisible by the world size \(4\).*"
                                         r"--batch-size 4"):
        rank_rows(6, 0, 4)

    class TwoRanks(SingleDevice):
        data_parallel_size = 2

    with pytest.raises(ValueError, match="batch_size .*3.* must be divisible by the 2 data-parallel ranks"):
        TwoRanks("cpu").check(None, TrainConfig(batch_size=3, max_steps=10))


def test_strategy_option_is_checked_against_the_registry():
    assert {"single", "ddp", "fsdp", "zero1"} <= set(strategy_names())
    with pytest.raises(ConfigError, match="unknown strategy 'zero3'; choose one of .*ddp, .*fsdp"):
        load_config(PretrainConfig, overrides={"dist.strategy": "zero3"})
    cfg = load_config(PretrainConfig, overrides={"dist.strategy": "fsdp", "dist.nproc": "2",
                                                 "dist.param_dtype": "bf16"})
    assert cfg.dist.strategy_options()["param_dtype"] == "bf16"
    with pytest.raises(ConfigError, match="strategy 'single' runs one process"):
        load_config(PretrainConfig, overrides={"dist.nproc": "2"})


def test_register_strategy_rejects_a_clash_and_a_missing_name():
    class NoName(SingleDevice):
        name = ""

    with pytest.raises(ValueError, match="needs a class attribute `name`"):
        register_strategy(NoName)

    class Other(SingleDevice):
        name = "ddp"

    with pytest.raises(ValueError, match="'ddp' is already registered"):
        register_strategy(Other)
    assert STRATEGIES["ddp"].__name__ == "DDPStrategy"
    with pytest.raises(ValueError, match="unknown strategy 'nope'"):
        make_strategy("nope")


def test_multi_node_needs_a_rendezvous_endpoint():
    with pytest.raises(ConfigError, match="needs --rdzv-endpoint HOST:PORT"):
        load_config(PretrainConfig, overrides={"dist.strategy": "ddp", "dist.nnodes": "2"})
    with pytest.raises(ConfigError, match="must be HOST:PORT"):
        load_config(PretrainConfig, overrides={"dist.strategy": "ddp", "dist.rdzv_endpoint": "node0"})
    for bad in ("node0:http", "node0:0", "node0:70000", ":29400"):
        with pytest.raises(ConfigError, match="HOST:PORT with a port in 1-65535"):
            load_config(PretrainConfig, overrides={"dist.strategy": "ddp", "dist.rdzv_endpoint": bad})
    spec = DistributedSpec(strategy="fsdp", nproc=8, nnodes=2, rdzv_endpoint="node0:29400", rdzv_id="job7")
    cmd = torchrun_command(spec, "c.yaml", python="python")
    assert cmd[:6] == ["python", "-m", "torch.distributed.run", "--nproc-per-node=8", "--nnodes=2",
                       "--rdzv-backend=c10d"]
    assert "--rdzv-endpoint=node0:29400" in cmd and "--rdzv-id=job7" in cmd and "--standalone" not in cmd


def test_missing_torchrun_environment_names_the_launcher():
    with pytest.raises(RuntimeError, match="RANK, WORLD_SIZE.*not set; launch with `autoglm train --nproc N"):
        read_env({})


def test_fp16_needs_cuda():
    with pytest.raises(ValueError, match="fp16 needs a CUDA device.*use precision bf16 or fp32"):
        SingleDevice("cpu").configure("fp16")


def test_checkpoint_from_another_model_config_is_refused(tmp_path):
    s = SingleDevice("cpu")
    model = make_model()
    save_distributed_checkpoint(s, tmp_path, 3, model, None, None, {"strategy": "fsdp"})
    path = load_latest(tmp_path)
    assert path.name == "step-000003" and (path / ".metadata").is_file()
    from autoglm import OpenAutoGLMConfig, OpenAutoGLMForCausalLM

    other = OpenAutoGLMForCausalLM(OpenAutoGLMConfig.from_name("tiny", vocab_size=64, hidden_size=32,
                                                               num_experts=0, intermediate_size=32))
    with pytest.raises(CheckpointError, match=r"does not fit this model.*Size mismatch.*model config the run started with"):
        load_distributed_checkpoint(s, path, other)
    same = make_model()
    with torch.no_grad():
        for p in same.parameters():
            p.zero_()
    load_distributed_checkpoint(s, path, same)
    assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(), model.state_dict().values()))


def test_one_process_runs_keep_safetensors_checkpoints(tmp_path):
    single_run(tmp_path, stop_at=2)
    latest = load_latest(tmp_path / "checkpoints")
    assert latest.name == "step-000002" and (latest / "model.safetensors").is_file()
    assert not (latest / ".metadata").exists()


def test_single_strategy_with_several_processes_names_both_fixes():
    # e.g. resuming a 2-process run in one process: --strategy single alone keeps the saved nproc
    with pytest.raises(ConfigError, match="pass --nproc 1 --nnodes 1 to train \\(or resume\\) in one process"):
        load_config(PretrainConfig, overrides={"dist.strategy": "single", "dist.nproc": "2"})


def test_unresolvable_rendezvous_host_fails_at_once_with_the_fix():
    spec = DistributedSpec(strategy="ddp", nnodes=2, rdzv_endpoint="no-such-node.invalid:29400")
    with pytest.raises(RendezvousError,
                       match="host 'no-such-node.invalid' does not resolve.*--rdzv-endpoint HOST:PORT"):
        check_rendezvous_endpoint(spec)
    check_rendezvous_endpoint(DistributedSpec(strategy="ddp", nnodes=2, rdzv_endpoint="localhost:29400"))
    check_rendezvous_endpoint(DistributedSpec(strategy="ddp", nproc=2))  # one node: no endpoint to check


def _fake_torchrun(monkeypatch, script: str) -> None:
    """launch() runs `python -c script` instead of torchrun (the script sees the launcher's env)."""
    monkeypatch.setattr(launch_module, "torchrun_command",
                        lambda spec, config_file, command="train", python=None: [sys.executable, "-c", script])


def test_torchrun_failing_before_any_worker_started_is_a_rendezvous_error(monkeypatch):
    cfg = load_config(PretrainConfig, overrides={"dist.strategy": "ddp", "dist.nnodes": "2",
                                                 "dist.rdzv_endpoint": "localhost:29400", "dist.rdzv_id": "job7"})
    _fake_torchrun(monkeypatch, "import sys; sys.exit(1)")  # as torchrun when the nodes never meet
    with pytest.raises(RendezvousError, match="before starting any process on this node: the rendezvous at "
                                              "localhost:29400 \\(id 'job7', 2 nodes\\) did not complete"):
        launch(cfg)
    # a worker started (it leaves a file where the launcher said) and then failed: torchrun's code, no
    # rendezvous error
    started = f"import os, pathlib, sys; pathlib.Path(os.environ[{STARTED_ENV!r}], 'rank0').touch(); sys.exit(%d)"
    _fake_torchrun(monkeypatch, started % 3)
    assert launch(cfg) == 3
    _fake_torchrun(monkeypatch, started % 0)
    assert launch(cfg) == 0


def test_worker_marks_its_start_where_the_launcher_says(tmp_path):
    mark_started({STARTED_ENV: str(tmp_path), "RANK": "5"})
    assert [p.name for p in tmp_path.iterdir()] == ["rank5"]
    mark_started({})  # plain torchrun: nothing to mark


def test_batch_the_ranks_cannot_split_is_refused_before_torchrun_starts(monkeypatch):
    # each of the 3 ranks used to start, import torch and print the same error
    _fake_torchrun(monkeypatch, "raise SystemExit('torchrun must not run')")
    cfg = load_config(PretrainConfig, overrides={"dist.strategy": "ddp", "dist.nproc": "3", "train.batch_size": "4"})
    with pytest.raises(ValueError, match=r"--batch-size 4 \(the global batch\) must be divisible by the 3 "
                                         r"data-parallel ranks \(--nproc 3 x --nnodes 1\).*--batch-size 3 or 6"):
        launch(cfg)
    # tensor parallelism: every rank reads the whole batch, nothing to split
    _fake_torchrun(monkeypatch, "pass")
    assert launch(load_config(PretrainConfig, overrides={"dist.strategy": "tp", "dist.nproc": "3",
                                                         "train.batch_size": "4"})) == 0
