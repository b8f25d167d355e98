"""`align` on several processes: two CPU ranks (gloo, ddp) train as one process does on the
whole global batch (same losses, same weights, momentum queues included), only the main rank
trains the tokenizer and saves, a run stopped and resumed under ddp or in one process ends where
the uninterrupted one does; batches the ranks cannot split and sharding strategies are refused."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from autoglm.recipes.align import AlignConfig, _global_batch, align
from autoglm.settings import ConfigError, load_config

sys.path.insert(0, str(Path(__file__).parents[1] / "distributed"))
from dp_workers import spawn  # noqa: E402  (forked gloo ranks with torchrun's environment)

# dense text tower: MoE's load-balancing loss is a product of batch means, not a mean over rows
SMALL = {"image.image_size": 8, "image.patch_size": 4, "image.dim": 32, "image.layers": 1, "image.ffn_hidden": 64,
         "text.model": "standard-tiny", "text.vocab_size": 300, "loss.embed_dim": 16, "loss.queue_size": 24,
         "loss.momentum": 0.9, "train.batch_size": 16, "train.max_steps": 6, "train.save_every": 3,
         "train.eval_every": 0, "train.log_every": 1, "data.val_fraction": 0.1, "data.test_fraction": 0.1,
         "device": "cpu"}
DDP = {"dist.strategy": "ddp", "dist.nproc": "2", "dist.backend": "gloo", "dist.timeout_s": "120"}


class StopAt3:
    def on_step(self, trainer, row):
        trainer.should_stop = trainer.step >= 3


def _ranks_worker(rank: int, world: int, root: str) -> None:
    import autoglm.recipes.align as recipe

    trained = []
    real = recipe._text_backbone

    def watch(t, captions, out, resume):  # which ranks train a tokenizer (resume=False trains one)
        trained.append(not resume)
        return real(t, captions, out, resume)

    recipe._text_backbone = watch
    full = align(load_config(AlignConfig, overrides={**SMALL, **DDP, "out": f"{root}/ddp"}), progress=False,
                 evaluate_at_end=False)
    half = load_config(AlignConfig, overrides={**SMALL, **DDP, "out": f"{root}/half"})
    assert align(half, progress=False, evaluate_at_end=False, callbacks=[StopAt3()]).result.steps == 3
    resumed = load_config(AlignConfig, overrides={**SMALL, **DDP, "out": f"{root}/half", "resume": True})
    align(resumed, progress=False, evaluate_at_end=False)
    to_one = load_config(AlignConfig, overrides={**SMALL, **DDP, "out": f"{root}/to-one"})  # resumed in one process
    align(to_one, progress=False, evaluate_at_end=False, callbacks=[StopAt3()])
    assert (full.model is None) == (rank > 0)
    Path(f"{root}/trained-tokenizer-rank{rank}.json").write_text(json.dumps(trained))


def _losses(run: Path) -> dict[int, float]:
    rows = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_two_ranks_train_as_one_process_on_the_global_batch(tmp_path):
    codes, _ = spawn(_ranks_worker, 2, str(tmp_path), timeout=240)
    assert codes == [0, 0]
    one = align(load_config(AlignConfig, overrides={**SMALL, "out": str(tmp_path / "one")}), progress=False,
                evaluate_at_end=False)
    assert one.model is not None
    align(load_config(AlignConfig, overrides={**SMALL, "out": str(tmp_path / "to-one"), "resume": True}),
          progress=False, evaluate_at_end=False)
    ref = load_file(tmp_path / "one" / "model.safetensors")
    # half: stopped at step 3 and resumed from its 2-rank checkpoint on 2 ranks; to-one: in one process
    for run in ("ddp", "half", "to-one"):
        got = load_file(tmp_path / run / "model.safetensors")
        assert got.keys() == ref.keys()
        for k in ref:
            assert torch.allclose(got[k], ref[k], atol=1e-5), (run, k)
        # each rank scores its 8 rows against all 16 columns + the queue; DDP averages the ranks
        assert _losses(tmp_path / run) == pytest.approx(_losses(tmp_path / "one"), rel=1e-5)
    assert (tmp_path / "ddp" / "tokenizer.json").read_text() == (tmp_path / "one" / "tokenizer.json").read_text()
    # rank 0 trained the tokenizer of each new run and loaded it on resume; rank 1 only loaded it
    assert json.loads((tmp_path / "trained-tokenizer-rank0.json").read_text()) == [True, True, False, True]
    assert json.loads((tmp_path / "trained-tokenizer-rank1.json").read_text()) == [False, False, False, False]
    info = json.loads((tmp_path / "ddp" / "run.json").read_text())
    assert info["config"]["dist"]["strategy"] == "ddp"


def test_batches_the_ranks_cannot_split_and_sharding_are_refused():
    assert _global_batch(100, 16, 2) == 16 and _global_batch(10, 16, 2) == 10
    with pytest.raises(ValueError, match=r"global batch \(15 pairs\) must be divisible by the 2 .*--batch-size 14"):
        _global_batch(100, 15, 2)
    with pytest.raises(ValueError, match=r"15 pairs, all of the training split's 15\) .*--batch-size 14"):
        _global_batch(15, 64, 2)
    for strategy in ("fsdp", "tp", "ep"):
        with pytest.raises(ConfigError, match=rf"{strategy!r} does not train an aligned model; use single, ddp, zero1"):
            load_config(AlignConfig, overrides={"dist.strategy": strategy, "dist.nproc": "2"})


def test_cli_refuses_an_unsplittable_batch_before_torchrun(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import autoglm.distributed.launch as launch
    from autoglm.cli import app

    monkeypatch.setattr(launch.subprocess, "run", lambda *a, **k: pytest.fail("torchrun was started"))
    res = CliRunner().invoke(app, ["align", "--nproc", "2", "--strategy", "ddp", "--batch-size", "15", "--out",
                                   str(tmp_path / "x")])
    assert res.exit_code == 2
    msg = " ".join(res.output.split())
    assert "--batch-size 15 (the global batch) must be divisible by the 2 data-parallel ranks" in msg, msg
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_cli_zero1_through_torchrun_matches_one_process(tmp_path):
    """`autoglm align --nproc 2 --strategy zero1` (torchrun, gloo) against `autoglm align` in one
    process: the same weights."""
    opts = ["--image-size", "8", "--patch-size", "4", "--image-dim", "32", "--image-layers", "1", "--ffn-hidden", "64",
            "--text-model", "standard-tiny", "--vocab-size", "300", "--embed-dim", "16", "--queue-size", "24",
            "--steps", "4", "--batch-size", "16", "--eval-every", "0", "--save-every", "0", "--device", "cpu"]
    for name, extra in (("one", []), ("zero1", ["--nproc", "2", "--strategy", "zero1", "--backend", "gloo"])):
        res = subprocess.run([sys.executable, "-c", "from autoglm.cli import main; main()", "align", *opts, *extra,
                              "--out", str(tmp_path / name)], capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        assert " ".join(res.stdout.split()).count("done: 4 steps") == 1, res.stdout  # the main rank reports
    ref, got = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "zero1" / "model.safetensors")
    assert got.keys() == ref.keys() and all(torch.allclose(got[k], ref[k], atol=1e-5) for k in ref)
