"""Two-process (gloo, CPU) runs of the model-parallel pieces, for tests/distributed/test_{tp,pp,ep}.py.

`worker_results()` starts this file twice (ranks 0 and 1) once per pytest process: the
workers run every check below on the same tiny models the tests rebuild, save what they
computed (full tensors: DTensors gathered, pipeline stages' gradients per rank) to
`rank{r}.pt`, and the tests compare those against a single-process run of the same model
with the same weights. One launch serves the three test files (starting torch twice is
most of the cost on a loaded machine).
"""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

WORLD = 2
SEQ = 16  # a multiple of WORLD (sequence parallelism) and of the attention chunk
BATCH = 4  # two pipeline micro-batches of 2


def tiny_config(**overrides):
    from autoglm import OpenAutoGLMConfig

    fields = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64, window_size=6, num_global_tokens=2, attn_impl="chunked",
                  attn_chunk_size=4, intermediate_size=48, num_experts=4, num_experts_per_tok=2,
                  expert_intermediate_size=24, moe_every=2)
    fields.update(overrides)
    return OpenAutoGLMConfig(**fields)


# variants the workers run and the tests rebuild: name -> (config overrides, sequence_parallel)
TP_VARIANTS = {
    "rope_sp": (dict(), True),  # dense FFN layer + MoE layer, rotary, sequence-parallel norms
    "relative_nosp": (dict(position="relative", moe_every=1), False),  # head-sharded bias table, all MoE
    "absolute_dense": (dict(attention="dense", position="absolute", num_experts=0), True),  # SP falls back off
}
PP_VARIANTS = {
    "gpipe": (dict(num_hidden_layers=3, moe_every=1), "gpipe"),  # stages of 2 and 1 blocks
    "1f1b": (dict(num_hidden_layers=3), "1f1b"),
}
EP_VARIANTS = ("random", "skewed")  # skewed: only rank 0's experts are ever chosen


def build_model(config, seed: int = 0):
    from autoglm import OpenAutoGLMForCausalLM

    torch.manual_seed(seed)
    return OpenAutoGLMForCausalLM(config).float()


def batch(config, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (BATCH, SEQ), generator=g)
    labels = torch.randint(0, config.vocab_size, (BATCH, SEQ), generator=g)
    return ids, labels


def ep_layer(variant: str):
    """The MoE layer of the EP checks (same weights in every process)."""
    from autoglm.modules.moe import MoEFeedForward

    torch.manual_seed(3)
    moe = MoEFeedForward(dim=16, hidden=24, num_experts=4, top_k=2)
    if variant == "skewed":
        with torch.no_grad():
            moe.router.weight[:2] = moe.router.weight[:2].abs() + 0.5
            moe.router.weight[2:] = -moe.router.weight[2:].abs() - 0.5
    return moe


def ep_inputs(rank: int, variant: str):
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(3, 5, 16, generator=g)
    if variant == "skewed":
        x = x.abs()
    w = torch.randn(3, 5, 16, generator=g)  # loss = (y * w).sum(): a non-uniform output gradient
    return x, w


# ------------------------------------------------------------------------------ worker side
def _plain(t):
    """A plain tensor (DTensor gathered, a pending collective's result waited for)."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    if hasattr(t, "wait"):
        t = t.wait()
    return torch.Tensor(t.detach()).clone() if type(t) is not torch.Tensor else t.detach().clone()


def _tp_checks(rank: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    from autoglm.distributed.tensor import apply_tensor_parallel, clip_grad_norm, full_state_dict
    from autoglm.losses import lm_loss

    mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("tp",))
    out = {}
    for name, (overrides, sp) in TP_VARIANTS.items():
        cfg = tiny_config(**overrides)
        model = apply_tensor_parallel(build_model(cfg), mesh, sequence_parallel=sp)
        ids, labels = batch(cfg)
        res = model(ids)
        loss = lm_loss(res.logits, labels) + (res.aux_loss if res.aux_loss is not None else 0.0)
        loss.backward()
        norm = clip_grad_norm(model, 0.0)
        grads = {n: _plain(p.grad) for n, p in model.named_parameters() if p.grad is not None}
        local_shapes = {n: tuple(p.to_local().shape) for n, p in model.named_parameters() if hasattr(p, "to_local")}
        out[name] = {"local_shapes": local_shapes, "logits": _plain(res.logits), "loss": _plain(loss), "grads": grads, "grad_norm": _plain(norm),
                     "state": {k: _plain(v) for k, v in full_state_dict(model).items()},
                     "sp": model._tensor_parallel["sequence_parallel"]}
    return out


def _pp_checks(rank: int) -> dict:
    from autoglm.distributed.pipeline import PipelineRunner

    out = {}
    for name, (overrides, schedule) in PP_VARIANTS.items():
        cfg = tiny_config(**overrides)
        runner = PipelineRunner(build_model(cfg), n_microbatches=2, schedule=schedule)
        ids, labels = batch(cfg)
        metrics = runner.step(ids, labels)
        grads = {n: p.grad.clone() for n, p in runner.model.named_parameters() if p.grad is not None}
        logits = runner.forward(ids)
        out[name] = {"metrics": {k: v.clone() for k, v in metrics.items()}, "grads": grads, "logits": logits[0],
                     "params": sorted(n for n, _ in runner.model.named_parameters())}
    out["loop"] = _pp_loop_check(rank)
    return out


def _pp_loop_check(rank: int) -> dict:
    """The `pp` strategy inside the training loop's contract: per micro-batch the objective
    computes the loss from the logits every rank gets, the strategy's backward sends its
    gradients through the stages; 2 accumulated micro-batches, each cut into 2 pipeline
    micro-batches."""
    from autoglm.distributed.pipeline import PipelineParallelStrategy
    from autoglm.training import CausalLMObjective
    from autoglm.training.config import TrainConfig

    cfg = tiny_config(**PP_VARIANTS["1f1b"][0])
    strategy = PipelineParallelStrategy(device="cpu")
    strategy.check(cfg, TrainConfig(batch_size=BATCH // 2, seq_len=SEQ, grad_accum=2))
    model = strategy.setup(build_model(cfg))
    model.train()
    ids, labels = batch(cfg)
    metrics = []
    for mb_ids, mb_labels in zip(ids.chunk(2), labels.chunk(2)):
        out = CausalLMObjective()(model, (mb_ids, mb_labels))
        strategy.backward(out["loss"] / 2)
        metrics.append({k: v.detach().clone() for k, v in out.items()})
    norm = strategy.clip_grad_norm(model, 0.0)
    grads = {n: p.grad.clone() for n, p in strategy.unwrap(model).named_parameters() if p.grad is not None}
    return {"metrics": metrics, "grads": grads, "grad_norm": norm}


def _ep_checks(rank: int) -> dict:
    from autoglm.distributed.expert import ExpertParallelMoE

    out = {}
    for variant in EP_VARIANTS:
        layer = ExpertParallelMoE(ep_layer(variant))
        x, w = ep_inputs(rank, variant)
        x.requires_grad_(True)
        y, r = layer(x)
        (y * w).sum().backward()
        out[variant] = {"y": y.detach(), "x_grad": x.grad, "topk_idx": r.topk_idx,
                        "grads": {n: p.grad for n, p in layer.named_parameters() if p.grad is not None},
                        "experts": sorted(layer.experts)}
    return out


def _ep_strategy_checks(rank: int) -> dict:
    """The `ep` strategy on a whole model: experts split, the dense part under DDP or FSDP2;
    each rank trains on its half of the batch."""
    import torch.distributed as dist

    from autoglm.distributed.expert import ExpertParallelStrategy
    from autoglm.training import CausalLMObjective

    cfg = tiny_config(moe_every=1)
    ids, labels = batch(cfg)
    rows = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    out = {}
    for dense in ("ddp", "fsdp"):
        strategy = ExpertParallelStrategy(device="cpu", dense=dense)
        model = strategy.setup(build_model(cfg))
        with strategy.no_sync(model, sync=True):
            res = CausalLMObjective()(model, (ids[rows], labels[rows]))
            strategy.backward(res["loss"])
        norm = strategy.clip_grad_norm(model, 0.0)
        inner = strategy.unwrap(model)
        grads = {n: _plain(p.grad) for n, p in inner.named_parameters() if p.grad is not None}
        exported = strategy.export_model(model)
        out[dense] = {"loss": strategy.reduce_mean(res["loss"].detach()), "grads": grads, "grad_norm": _plain(norm),
                      "exported": None if exported is None else {k: v.clone() for k, v in exported.state_dict().items()}}
        dist.barrier()
    return out


def _resume_checks(rank: int) -> dict:
    """pp and ep: one optimizer step, a DCP checkpoint, then a fresh model (other seed) and
    optimizer loaded from it on every rank (each rank holds different parameters)."""
    from autoglm.distributed.expert import ExpertParallelStrategy
    from autoglm.distributed.pipeline import PipelineParallelStrategy
    from autoglm.training import CausalLMObjective
    from autoglm.training.config import TrainConfig
    from autoglm.training.optim import build_scheduler

    cfg = tiny_config(num_hidden_layers=3)
    tc = TrainConfig(batch_size=2, seq_len=SEQ, grad_accum=1, warmup_steps=2)
    ids, labels = batch(cfg)
    root = Path(os.environ["AUTOGLM_MP_OUT"]) / "ckpt"
    out = {}
    for name, cls in (("pp", PipelineParallelStrategy), ("ep", ExpertParallelStrategy)):
        runs = []
        for seed in (0, 5):
            s = cls(device="cpu")
            s.check(cfg, tc)
            m = s.setup(build_model(cfg, seed=seed))
            opt = s.build_optimizer(s.unwrap(m), tc)
            sched = build_scheduler(opt, tc)
            runs.append((s, m, opt, sched))
        s, m, opt, sched = runs[0]
        with s.no_sync(m, sync=True):
            s.backward(CausalLMObjective()(m, (ids[:2], labels[:2]))["loss"])
        s.clip_grad_norm(m, 1.0)
        opt.step()
        sched.step()
        path = s.save_checkpoint(root / name, 1, m, opt, sched, {"note": "test"})
        s2, m2, opt2, sched2 = runs[1]
        s2.load_checkpoint(path, m2, opt2, sched2)
        a, b = s.unwrap(m), s2.unwrap(m2)
        exported = s.export_model(m)  # the unsplit model, gathered from every rank (main rank)
        out[name] = {
            "ckpt": str(path),
            "exported": None if exported is None else {k: v.clone() for k, v in exported.state_dict().items()},
            "weights_equal": all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values())),
            "moments_equal": all(torch.equal(opt.state[p]["exp_avg_sq"], opt2.state[q]["exp_avg_sq"])
                                 for p, q in zip(a.parameters(), b.parameters()) if p in opt.state),
            "groups": [(g["lr"], g["weight_decay"], len(g["params"])) for g in opt2.param_groups],
            "groups_saved": [(g["lr"], g["weight_decay"], len(g["params"])) for g in opt.param_groups],
        }
    return out


CHECKS = {"tp": _tp_checks, "pp": _pp_checks, "ep": _ep_checks, "ep_strategy": _ep_strategy_checks,
          "resume": _resume_checks}


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results = {}
        for name, fn in CHECKS.items():
            results[name] = fn(rank)
            dist.barrier()
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------- test side
def train_cli(out: Path, strategy: str | None = None, steps: int = 4) -> list[dict]:
    """`autoglm train` on the tiny preset (built-in corpus), `--nproc 2 --strategy S` when
    given, else one process; returns the metrics.jsonl rows."""
    import json

    cmd = [sys.executable, "-c", "from autoglm.cli import main; main()", "train", "--preset", "tiny", "--out", str(out), "--steps", str(steps),
           "--batch-size", "4", "--seq-len", "64", "--eval-every", "0", "--eval-batches", "2"]
    if strategy is not None:
        cmd += ["--strategy", strategy, "--nproc", str(WORLD)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


@functools.lru_cache(maxsize=1)
def single_process_rows() -> tuple[dict, ...]:
    return tuple(train_cli(Path(tempfile.mkdtemp(prefix="autoglm-single-")) / "run"))


def assert_consolidates_to_exported(strategy: str, tmp_path: Path) -> None:
    """The strategy's 2-rank DCP checkpoint (ranks holding different experts / stages),
    consolidated in this process without a process group, equals the model the ranks gathered:
    every weight of every rank is in the file."""
    from safetensors.torch import load_file

    from autoglm.distributed.consolidate import consolidate

    r = worker_results()[0]["resume"][strategy]
    got = load_file(consolidate(r["ckpt"], tmp_path / "model") / "model.safetensors")
    want = r["exported"]
    assert set(want) - set(got) <= {"lm_head.weight"}, sorted(set(want) - set(got))  # tied: stored once
    assert set(got) <= set(want)
    assert all(torch.equal(got[k], want[k]) for k in got), strategy


def assert_resumed(strategy: str) -> None:
    """Every rank's DCP round trip of `strategy` restored weights, AdamW moments and its own groups."""
    for rank, res in enumerate(worker_results()):
        r = res["resume"][strategy]
        assert r["weights_equal"] and r["moments_equal"], rank
        assert r["groups"] == r["groups_saved"], rank


def assert_cli_matches_single(strategy: str, tmp_path: Path, lm_tol: float, aux_tol: float) -> None:
    """The strategy's 4 training steps through `autoglm train --nproc 2` track one process:
    step 1 (same initial weights, same global batch) and the last step's losses, the
    exported model loads, and consolidating the last checkpoint gives the same weights."""
    from autoglm import OpenAutoGLMForCausalLM

    rows = [r for r in train_cli(tmp_path / "run", strategy) if "loss" in r]
    ref = [r for r in single_process_rows() if "loss" in r]
    for got, want in ((rows[0], ref[0]), (rows[-1], ref[-1])):
        assert got["step"] == want["step"]
        assert abs(got["lm_loss"] - want["lm_loss"]) <= lm_tol, (strategy, got, want)
        assert abs(got["aux_loss"] - want["aux_loss"]) <= aux_tol, (strategy, got, want)
    OpenAutoGLMForCausalLM.from_pretrained(tmp_path / "run")
    # the final DCP checkpoint (every rank's shards, experts or stages) consolidated in one
    # process equals the model the ranks gathered at the end
    from safetensors.torch import load_file

    from autoglm.distributed.consolidate import consolidate

    consolidate(tmp_path / "run", tmp_path / "merged")
    want = load_file(tmp_path / "run" / "model.safetensors")
    got = load_file(tmp_path / "merged" / "model.safetensors")
    assert set(got) == set(want), strategy
    assert all(torch.equal(got[k], want[k]) for k in want), strategy
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@functools.lru_cache(maxsize=1)
def worker_results(timeout: float = 240.0) -> tuple[dict, ...]:
    """Run the checks on WORLD gloo processes (once per pytest process); one dict per rank."""
    out_dir = tempfile.mkdtemp(prefix="autoglm-mp-")
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "AUTOGLM_MP_OUT": out_dir}
    src = str(Path(__file__).resolve().parents[2] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    procs = [subprocess.Popen([sys.executable, __file__, str(r), str(WORLD), str(port), out_dir], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(WORLD)]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    if any(p.returncode for p in procs):
        raise RuntimeError("model-parallel workers failed:\n" + "\n".join(
            f"--- rank {r} (exit {p.returncode})\n{log[-6000:]}" for r, (p, log) in enumerate(zip(procs, logs))))
    return tuple(torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=True) for r in range(WORLD))


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
