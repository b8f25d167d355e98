"""Helpers for the data-parallel tests: a tiny dense model, a token stream, a Trainer factory
and a launcher that runs a function on N spawned gloo processes (as torchrun would, with
RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set). Worker functions live here so the
spawned processes can import them."""

from __future__ import annotations

import os
import shutil
import socket
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp

from autoglm import OpenAutoGLMConfig, OpenAutoGLMForCausalLM
from autoglm.distributed import make_strategy
from autoglm.distributed.data import rank_batch
from autoglm.training import Callback, SingleDevice, TrainConfig, Trainer

# ~5.7k parameters; dense FFN (num_experts=0): MoE's load-balancing loss is a product of batch
# means, so a sum over ranks of per-rank aux losses is not the one-process aux loss
MODEL = dict(vocab_size=64, hidden_size=16, num_attention_heads=2, num_key_value_heads=1, num_experts=0,
             intermediate_size=32, max_position_embeddings=64, window_size=8, num_global_tokens=2)
TOKENS = np.random.default_rng(0).integers(0, 64, size=4000).astype(np.int64)


def make_model() -> OpenAutoGLMForCausalLM:
    torch.manual_seed(0)
    return OpenAutoGLMForCausalLM(OpenAutoGLMConfig.from_name("tiny", **MODEL))


def train_cfg(**kw) -> TrainConfig:
    base = dict(batch_size=4, seq_len=16, grad_accum=2, max_steps=4, warmup_steps=1, lr=1e-2, eval_every=0,
                save_every=0, log_every=1, precision="fp32", grad_clip=0.5)
    return TrainConfig(**{**base, **kw})


class StopAt(Callback):
    """End fit() after `step` steps (the schedule still spans max_steps)."""

    def __init__(self, step: int) -> None:
        self.at = step

    def on_step(self, trainer, metrics) -> None:
        if trainer.step >= self.at:
            trainer.should_stop = True


def make_trainer(strategy, cfg: TrainConfig, out_dir=None, callbacks=()) -> Trainer:
    r, w = strategy.data_parallel_rank, strategy.data_parallel_size
    return Trainer(make_model(), cfg, lambda i: rank_batch(TOKENS, cfg.batch_size, cfg.seq_len, i, cfg.seed, r, w),
                   out_dir=out_dir, strategy=strategy, progress=False, callbacks=callbacks)


def losses(result) -> list[float]:
    return [row["loss"] for row in result.history if "loss" in row]


def full_params(strategy, trainer) -> dict[str, torch.Tensor] | None:
    model = strategy.export_model(trainer.model)
    return None if model is None else {k: v.detach().clone() for k, v in model.state_dict().items()}


def single_run(out_dir=None, resume=False, stop_at=None) -> tuple[list[float], dict[str, torch.Tensor]]:
    s = SingleDevice("cpu")
    t = make_trainer(s, train_cfg(), out_dir, callbacks=[StopAt(stop_at)] if stop_at else ())
    r = t.fit(resume=resume)
    return losses(r), full_params(s, t)


# ------------------------------------------------------------------ launcher
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank: int, world: int, port: int, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    try:
        fn(rank, world, *args)
    except SystemExit:
        raise
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def spawn(fn, world: int, *args, timeout: float = 120.0) -> tuple[list[int | None], float]:
    """Run fn(rank, world, *args) on `world` processes; returns their exit codes (None = still
    running at `timeout`, then killed) and the wall seconds until the last one ended.

    The processes are forked: they inherit the imported modules (importing torch and
    transformers again costs tens of seconds on a loaded machine). Safe here because the
    parent runs torch with one thread and has no process group."""
    ctx = mp.get_context("fork")
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, args)) for r in range(world)]
    t0 = time.monotonic()
    for p in procs:
        p.start()
    for p in procs:
        p.join(max(0.1, timeout - (time.monotonic() - t0)))
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    return codes, time.monotonic() - t0


# ------------------------------------------------------------------- workers
def equivalence_worker(rank: int, world: int, out: str) -> None:
    """ddp, fsdp and zero1 for 4 steps; then fsdp for 2 steps with a checkpoint, resumed
    under fsdp and under zero1 to step 4. Rank 0 saves losses and full parameters."""
    out_dir = Path(out)
    results: dict = {}
    for name in ("ddp", "fsdp", "zero1"):
        s = make_strategy(name, device="cpu", backend="gloo", timeout_s=60)
        t = make_trainer(s, train_cfg())
        r = t.fit()
        results[name] = {"losses": losses(r), "params": full_params(s, t)}
    s = make_strategy("fsdp", device="cpu", backend="gloo", timeout_s=60)
    make_trainer(s, train_cfg(), out_dir / "fsdp-ckpt", callbacks=[StopAt(2)]).fit()
    for name in ("fsdp", "zero1"):
        run = out_dir / f"resume-{name}"
        if rank == 0:
            shutil.copytree(out_dir / "fsdp-ckpt", run)
        s.barrier()
        s2 = make_strategy(name, device="cpu", backend="gloo", timeout_s=60)
        t = make_trainer(s2, train_cfg(), run)
        r = t.fit(resume=True)
        results[f"resume-{name}"] = {"losses": losses(r), "params": full_params(s2, t)}
    if rank == 0:
        torch.save(results, out_dir / "results.pt")


def killed_rank_worker(rank: int, world: int, out: str) -> None:
    """ddp with a 5 s collective timeout, a checkpoint every 2 steps; rank 1 dies inside the
    step-4 save. Rank 0 writes the error it got to error.txt and exits with 7."""
    s = make_strategy("ddp", device="cpu", backend="gloo", timeout_s=5)
    t = make_trainer(s, train_cfg(save_every=2), Path(out) / "run")
    if rank == 1:
        save = s.save_checkpoint

        def dying_save(root, step, *a, **k):
            if step == 4:
                (Path(out) / "died_at").write_text(repr(time.time()))
                os._exit(3)  # killed mid-save: no exception, no cleanup
            return save(root, step, *a, **k)

        s.save_checkpoint = dying_save
    try:
        with s.collective_errors():
            t.fit()
    except RuntimeError as e:
        (Path(out) / "failed_at").write_text(repr(time.time()))
        (Path(out) / "error.txt").write_text(str(e))
        os._exit(7)


# ------------------------------------------------------- MoE with an expert no token chooses
# the `sorted` dispatch calls only the experts that got tokens (as on a GPU in fp32, or with
# adapters in the experts); aux loss off, so two ranks compute exactly one process's gradients
MOE_MODEL = {**MODEL, "num_experts": 4, "num_experts_per_tok": 2, "expert_intermediate_size": 16,
             "moe_dispatch": "sorted", "router_aux_loss_coef": 0.0}
UNUSED_EXPERT = 3


def _route_without_expert(x, router_weight, top_k):
    """The model's router with expert UNUSED_EXPERT masked out: no token ever reaches it."""
    from autoglm.modules import moe

    logits = torch.nn.functional.linear(x.float(), router_weight.float())
    logits[:, UNUSED_EXPERT] = float("-inf")
    w, idx = logits.softmax(dim=-1).topk(top_k, dim=-1)
    return moe.RouterOutput(logits, idx, w / w.sum(dim=-1, keepdim=True))


def moe_unused_expert_run(strategy) -> tuple[list[float], dict[str, torch.Tensor] | None, dict[str, torch.Tensor]]:
    """4 steps (grad accumulation 2) of the MoE model with one expert never chosen; returns
    losses, the final full parameters (main process) and the initial ones."""
    from autoglm.modules import moe

    saved = moe.route
    moe.route = _route_without_expert
    try:
        torch.manual_seed(0)
        model = OpenAutoGLMForCausalLM(OpenAutoGLMConfig.from_name("tiny", **MOE_MODEL))
        init = {k: v.detach().clone() for k, v in model.state_dict().items()}
        cfg = train_cfg()
        r, w = strategy.data_parallel_rank, strategy.data_parallel_size
        t = Trainer(model, cfg, lambda i: rank_batch(TOKENS, cfg.batch_size, cfg.seq_len, i, cfg.seed, r, w),
                    strategy=strategy, progress=False)
        result = t.fit()
        return losses(result), full_params(strategy, t), init
    finally:
        moe.route = saved


def moe_unused_expert_worker(rank: int, world: int, out: str) -> None:
    results = {}
    for name in ("ddp", "zero1", "fsdp"):
        s = make_strategy(name, device="cpu", backend="gloo", timeout_s=60)
        got, params, _ = moe_unused_expert_run(s)
        results[name] = {"losses": got, "params": params}
    if rank == 0:
        torch.save(results, Path(out) / "moe.pt")


# ------------------------------------------------- rank 0 working alone past the collective timeout
SOLO_SECONDS = 6.0  # longer than the 2 s collective timeout below


def slow_main_rank_worker(rank: int, world: int, out: str) -> None:
    """ddp with a 2 s collective timeout. Rank 0 works alone for SOLO_SECONDS before a
    barrier (as when it prepares the corpus) and inside every checkpoint save (a slow fsync);
    rank 1 works alone for SOLO_SECONDS after that barrier, before the model is set up (as
    when it reads the corpus rank 0 prepared); the others wait without failing. Each rank
    writes done-<rank> at the end."""
    from autoglm.distributed import checkpoint as dist_ckpt

    s = make_strategy("ddp", device="cpu", backend="gloo", timeout_s=2)
    if rank == 0:
        time.sleep(SOLO_SECONDS)
    s.barrier()
    if rank == 0:
        fsync_tree = dist_ckpt.fsync_tree

        def slow_fsync(path):
            time.sleep(SOLO_SECONDS)
            fsync_tree(path)

        dist_ckpt.fsync_tree = slow_fsync
    else:
        time.sleep(SOLO_SECONDS)
    t = make_trainer(s, train_cfg(save_every=2), Path(out) / "run")
    with s.collective_errors():
        t.fit()
    (Path(out) / f"done-{rank}").write_text("ok")


def tokenizer_once_worker(rank: int, world: int, out: str) -> None:
    """`autoglm train` under ddp on a fresh text file: records which ranks trained a BPE
    tokenizer (trained-<rank>) and the tokenizer each rank ended up with (tok-<rank>.json)."""
    from autoglm.data import prepare as prepare_mod
    from autoglm.recipes.pretrain import PretrainConfig, pretrain
    from autoglm.settings import load_config

    real = prepare_mod.train_tokenizer

    def counting(*a, **kw):
        (Path(out) / f"trained-{rank}").write_text("yes")
        return real(*a, **kw)

    prepare_mod.train_tokenizer = counting
    cfg = load_config(PretrainConfig, overrides={
        "data.path": str(Path(out) / "corpus.txt"), "data.cache_dir": str(Path(out) / "cache"),
        "out": str(Path(out) / "run"), "model.preset": "tiny", "model.vocab_size": "300", "train.max_steps": "1",
        "train.batch_size": "4", "train.seq_len": "16", "train.eval_every": "0", "train.save_every": "0",
        "train.eval_batches": "1", "sample_prompt": "", "dist.strategy": "ddp"})
    result = pretrain(cfg, progress=False)
    (Path(out) / f"tok-{rank}.json").write_text(result.tokenizer.backend_tokenizer.to_str())
