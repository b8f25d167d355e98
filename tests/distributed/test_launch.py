"""The Kubeflow PyTorchJob example is a config the train recipe accepts and a command torchrun
can run; `autoglm train --nproc 2` end to end (slow: two fresh processes under torchrun)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from autoglm.distributed import strategy_names
from autoglm.recipes.pretrain import PretrainConfig
from autoglm.settings import load_config

ROOT = Path(__file__).resolve().parents[2]


def test_kubeflow_pytorchjob_runs_a_valid_train_config(tmp_path):
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "kubeflow" / "pytorchjob.yaml").read_text()))
    kinds = {d["kind"]: d for d in docs}
    assert {"ConfigMap", "PyTorchJob", "PersistentVolumeClaim"} <= set(kinds)
    (tmp_path / "train.yaml").write_text(kinds["ConfigMap"]["data"]["train.yaml"])
    cfg = load_config(PretrainConfig, tmp_path / "train.yaml")  # every field known and valid
    assert cfg.dist.strategy in strategy_names()
    job = kinds["PyTorchJob"]["spec"]
    replicas = sum(r["replicas"] for r in job["pytorchReplicaSpecs"].values())
    ranks = replicas * int(job["nprocPerNode"])
    assert cfg.train.batch_size % ranks == 0, "the global batch must split over every rank"
    for spec in job["pytorchReplicaSpecs"].values():
        pod = spec["template"]["spec"]
        (container,) = pod["containers"]
        cmd = container["command"]
        assert cmd[:3] == ["torchrun", "-m", "autoglm.distributed.worker"] and cmd[3] == "train"
        config = Path(cmd[cmd.index("--config") + 1])
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert config.parent == Path(mounts["config"])
        assert str(cfg.out).startswith(mounts["runs"])  # checkpoints on the shared volume
        claim = {v["name"]: v for v in pod["volumes"]}["runs"]["persistentVolumeClaim"]["claimName"]
        assert kinds["PersistentVolumeClaim"]["metadata"]["name"] == claim
    assert "ReadWriteMany" in kinds["PersistentVolumeClaim"]["spec"]["accessModes"]


@pytest.mark.slow
def test_autoglm_train_nproc_2_fsdp_then_resume_under_ddp(tmp_path):
    base = [sys.executable, "-m", "autoglm.distributed.worker", "train", "--preset", "tiny", "--batch-size", "4", "--seq-len",
            "32", "--eval-batches", "1", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "run"),
            "--sample-prompt", "", "--nproc", "2"]
    subprocess.run([*base, "--steps", "4", "--strategy", "fsdp"], check=True, timeout=600)
    ckpt = tmp_path / "run" / "checkpoints" / "step-000004"
    assert (ckpt / ".metadata").is_file() and len(list(ckpt.glob("__*_0.distcp"))) == 2
    assert (tmp_path / "run" / "model.safetensors").is_file()  # consolidated by rank 0
    subprocess.run([*base, "--steps", "6", "--strategy", "ddp", "--resume"], check=True, timeout=600)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == 6
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-000006" / "trainer_state.json").read_text())
    assert state["strategy"] == "ddp" and state["world_size"] == 2
