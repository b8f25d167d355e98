"""Bad input for distributed runs is refused before training, with the fix named: a global
batch that does not split over the ranks, an unknown strategy, a multi-node run without a
rendezvous endpoint, a missing torchrun environment, fp16 without CUDA, and a checkpoint
from another model config. Plus the registry and the launcher's command line."""


import numpy as np
import pytest
import torch

from autoglm.data import sample_batch
from autoglm.distributed import STRATEGIES, make_strategy, register_strategy, strategy_names
from autoglm.distributed.checkpoint import load_distributed_checkpoint, save_distributed_checkpoint
from autoglm.distributed.config import DistributedSpec
from autoglm.distributed.data import rank_batch, rank_rows
from autoglm.distributed.launch import torchrun_command
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
