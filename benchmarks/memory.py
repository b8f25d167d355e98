"""The memory table of distributed training, measured: per-rank bytes of parameters, gradients
and optimizer state, activation memory and step time, for each memory-saving technique on 2 ranks.

Every row is a run of the pretrain recipe (`autoglm train`) on the same model, data and
global batch, all inside one torchrun job of `--nproc` processes (gloo on CPU, nccl on
GPUs), the rows interleaved round by round so that load on a shared machine hits them alike:

    ddp fp32                  the baseline: DistributedDataParallel, fp32
    ddp bf16 autocast         mixed precision (fp32 weights, bf16 compute)
    ddp + checkpointing       activation (gradient) checkpointing of every block
    zero1                     ZeroRedundancyOptimizer over DDP (ZeRO-1)
    fsdp                      FSDP2 fully_shard per block (ZeRO-3)
    fsdp bf16 params          FSDP2 with bf16 parameters for compute, fp32 reduction
    tp                        tensor parallelism (when a `tp` strategy is registered)

What is counted, per rank, from the tensors that rank holds (a DTensor counts its local shard):

* parameters: `model.parameters()`; gradients: their `.grad` right after an optimizer step;
  optimizer state: every tensor in the optimizer's state (ZeRO-1: the local partition's);
* activations: the bytes saved for backward during the forward of one training step,
  counted with `torch.autograd.graph.saved_tensors_hooks` (distinct storages; parameters
  saved by their own layers are not activations and are left out). Under checkpointing
  `torch.utils.checkpoint` keeps each block's input itself instead of passing it through
  the hooks, so those inputs are counted from forward pre-hooks on the blocks;
* step time: the median wall time of the steps between the first and the measured one;
* on CUDA also `torch.cuda.max_memory_allocated`.

    python benchmarks/memory.py                              # tiny preset, 2 ranks, docs/results/memory.*
    python benchmarks/memory.py --preset small --batch-size 4   # a bigger model (CPU bf16 is slow there)
    python benchmarks/memory.py --steps 4 --rounds 1 --out /tmp   # smoke run

Targets: checkpointing cuts activation memory by >= 50% for <= 35% more step time; FSDP's
per-rank parameter + gradient + optimizer memory is <= 0.55x DDP's on 2 ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent

ROWS: dict[str, dict[str, Any]] = {
    "ddp fp32": {"dist.strategy": "ddp", "train.precision": "fp32"},
    "ddp bf16 autocast": {"dist.strategy": "ddp", "train.precision": "bf16"},
    "ddp + checkpointing": {"dist.strategy": "ddp", "train.precision": "fp32", "train.grad_checkpointing": True},
    "zero1": {"dist.strategy": "zero1", "train.precision": "fp32"},
    "fsdp": {"dist.strategy": "fsdp", "train.precision": "fp32"},
    "fsdp bf16 params": {"dist.strategy": "fsdp", "train.precision": "fp32", "dist.param_dtype": "bf16"},
    "tp": {"dist.strategy": "tp", "train.precision": "fp32"},
}
BASELINE = "ddp fp32"
# what the reference text claims for each technique (memory saved)
CLAIMS = {"ddp bf16 autocast": "~50% less memory", "ddp + checkpointing": "60-80% less activation memory",
          "zero1": "ZeRO: 70-90% less", "fsdp": "ZeRO: 70-90% less", "fsdp bf16 params": "ZeRO: 70-90% less"}


# ------------------------------------------------------------------ relaunch
def relaunch_under_torchrun(script: str, nproc: int, args: list[str], result_file: Path) -> None:
    """Run `script --worker result_file args...` on `nproc` local processes with torchrun."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", script,
           "--worker", str(result_file), *args]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    code = subprocess.run(cmd, env=env, check=False).returncode
    if code:
        raise SystemExit(f"torchrun exited with code {code}; the failing rank's error is printed above")


def prepare_data(preset: str, cache_dir: str | None) -> Any:
    """The built-in corpus, tokenized once (main rank first, then the others read the cache)."""
    import torch.distributed as dist

    from autoglm.config import OpenAutoGLMConfig
    from autoglm.data import prepare_corpus
    from autoglm.distributed import init_distributed
    from autoglm.recipes.common import DEFAULT_CACHE

    init_distributed("auto", 600.0)
    vocab = OpenAutoGLMConfig.from_name(preset).vocab_size
    cache = Path(cache_dir) if cache_dir else DEFAULT_CACHE
    data = prepare_corpus(None, cache, vocab, None, 0.1, ()) if dist.get_rank() == 0 else None
    dist.barrier()
    if data is None:  # BPE training is deterministic: the same tokenizer, so rank 0's token cache is reused
        data = prepare_corpus(None, cache, vocab, None, 0.1, ())
    return data


# --------------------------------------------------------------- measurement
def _local(t: Any) -> Any:
    return t.to_local() if hasattr(t, "to_local") else t


def _storage(t: Any) -> tuple[int, int]:
    """(key, bytes) of the storage behind `t`; tensors without a real storage (wrapper
    subclasses) count by their own size."""
    try:
        st = t.untyped_storage()
        return st.data_ptr(), st.nbytes()
    except (RuntimeError, NotImplementedError):
        return id(t), t.numel() * t.element_size()


def _bytes(tensors: Any) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        t = _local(t)
        if t is None or t.numel() == 0:
            continue
        key, n = _storage(t)
        seen[key] = n
    return sum(seen.values())


def held_bytes(trainer: Any) -> dict[str, int]:
    """Parameters, gradients and optimizer state this rank holds now."""
    params = list(trainer.model.parameters())
    opt = trainer.optimizer
    state = getattr(opt, "optim", opt).state  # ZeroRedundancyOptimizer keeps its partition in .optim
    opt_tensors = [v for s in state.values() for v in s.values() if hasattr(v, "untyped_storage")
                   or hasattr(v, "to_local")]
    return {"params": _bytes(params), "grads": _bytes(p.grad for p in params if p.grad is not None),
            "optimizer": _bytes(opt_tensors)}


class Probe:
    """Callback: step times, held bytes after step `steps - 1`, activation bytes of step `steps`."""

    def __init__(self, steps: int, measure: bool = True) -> None:
        self.steps = steps
        self.measure = measure  # False: step times only
        self.times: list[float] = []
        self.held: dict[str, int] = {}
        self.activations = 0
        self._objective = None

    def on_step(self, trainer: Any, row: dict) -> None:
        import torch

        if trainer.strategy.device.type == "cuda":
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        if trainer.step == self.steps - 1 and self.measure:
            self.held = held_bytes(trainer)
            self._wrap(trainer)
        elif trainer.step == self.steps and self._objective is not None:
            trainer.objective = self._objective

    def _wrap(self, trainer: Any) -> None:
        import torch
        from torch import nn

        from autoglm.distributed.data_parallel import model_blocks

        self._objective = objective = trainer.objective
        probe = self

        def measured(model: nn.Module, batch: Any) -> Any:
            params = {_storage(_local(p))[0] for p in model.parameters()}
            seen: dict[int, int] = {}

            def note(t: torch.Tensor) -> None:
                t = _local(t)
                if isinstance(t, nn.Parameter) or not t.numel():
                    return
                key, n = _storage(t)
                if key not in params:
                    seen[key] = n

            def pack(t: torch.Tensor) -> torch.Tensor:
                note(t)
                return t

            handles = []
            if trainer.cfg.grad_checkpointing:  # checkpoint() holds the block inputs itself
                handles = [b.register_forward_pre_hook(lambda m, args: note(args[0])) for b in model_blocks(model)]
            try:
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    out = objective(model, batch)
            finally:
                for h in handles:
                    h.remove()
            probe.activations = max(probe.activations, sum(seen.values()))
            return out

        trainer.objective = measured

    def summary(self) -> dict[str, Any]:
        import torch

        diffs = [b - a for a, b in zip(self.times[:-1], self.times[1:])][:-1]  # steps 2 .. steps-1
        out = {**self.held, "activations": self.activations, "step_s": diffs}
        if torch.cuda.is_available():
            out["cuda_max_allocated"] = torch.cuda.max_memory_allocated()
        return out


def worker(result_file: Path, args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from autoglm.distributed import strategy_names
    from autoglm.recipes.pretrain import PretrainConfig, pretrain
    from autoglm.settings import load_config

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    load0 = os.getloadavg()
    data = prepare_data(args.preset, args.cache_dir)
    rows = [r for r in args.rows.split(",") if r]
    available = set(strategy_names())
    results: dict[str, dict[str, Any]] = {r: {"ranks": [], "skipped": None} for r in rows}
    with tempfile.TemporaryDirectory(prefix="autoglm-memory-") as tmp:
        tmp = dist.get_rank() == 0 and tmp or None
        tmp = [tmp]
        dist.broadcast_object_list(tmp)
        for rnd in range(args.rounds):
            for name in rows:
                over = ROWS[name]
                if over["dist.strategy"] not in available:
                    results[name]["skipped"] = f"strategy {over['dist.strategy']!r} is not registered"
                    continue
                if results[name]["skipped"]:
                    continue
                cfg = load_config(PretrainConfig, overrides={
                    **over, "model.preset": args.preset, "out": f"{tmp[0]}/{rnd}-{name.replace(' ', '_')}",
                    "train.batch_size": args.batch_size, "train.seq_len": args.seq_len,
                    "train.max_steps": args.steps, "train.warmup_steps": 1, "train.eval_every": 0,
                    "train.eval_batches": 1, "train.save_every": 0, "train.log_every": 1,
                    "device": args.device, "dist.nproc": dist.get_world_size()})
                probe = Probe(args.steps)
                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()
                try:
                    pretrain(cfg, progress=False, callbacks=[probe], tokenizer=data.tokenizer, prepared=data)
                    mine: Any = probe.summary()
                except (ValueError, RuntimeError, TypeError) as e:  # a strategy that does not fit
                    mine = {"error": f"{type(e).__name__}: {e}"}
                gathered: list[Any] = [None] * dist.get_world_size()
                dist.all_gather_object(gathered, mine)
                errors = [g["error"] for g in gathered if "error" in g]
                if errors:
                    results[name]["skipped"] = errors[0]
                else:
                    results[name]["ranks"].append(gathered)
    if dist.get_rank() == 0:
        result_file.write_text(json.dumps({"results": results, "load": [load0, os.getloadavg()],
                                           "world_size": dist.get_world_size()}))
    dist.destroy_process_group()


# ------------------------------------------------------------------- report
def _mb(b: float) -> str:
    return f"{b / 2**20:,.2f}"


def summarize(raw: dict[str, Any], args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    rows = []
    for name, r in raw["results"].items():
        if r["skipped"] or not r["ranks"]:
            rows.append({"row": name, "skipped": r["skipped"] or "no measurement"})
            continue
        rounds = r["ranks"]  # [round][rank] -> measurement
        last = rounds[-1]
        per_rank = {k: max(m[k] for m in last) for k in ("params", "grads", "optimizer", "activations")}
        step = statistics.median(s for rnd in rounds for m in rnd for s in m["step_s"])
        row = {"row": name, **per_rank, "pgo": per_rank["params"] + per_rank["grads"] + per_rank["optimizer"],
               "step_s": step, "per_rank": last}
        if "cuda_max_allocated" in last[0]:
            row["cuda_max_allocated"] = max(m["cuda_max_allocated"] for m in last)
        rows.append(row)
    base = next((r for r in rows if r["row"] == BASELINE and "skipped" not in r), None)
    for r in rows:
        if base is not None and "skipped" not in r:
            r["pgo_vs_ddp"] = r["pgo"] / base["pgo"]
            r["act_vs_ddp"] = r["activations"] / base["activations"]
            r["time_vs_ddp"] = r["step_s"] / base["step_s"]
    by = {r["row"]: r for r in rows if "skipped" not in r}
    targets = {}
    if base is not None and "ddp + checkpointing" in by:
        c = by["ddp + checkpointing"]
        targets["checkpointing_activation_cut"] = {"value": 1 - c["act_vs_ddp"], "target": ">= 0.50",
                                                   "met": 1 - c["act_vs_ddp"] >= 0.5}
        targets["checkpointing_time_cost"] = {"value": c["time_vs_ddp"] - 1, "target": "<= 0.35",
                                              "met": c["time_vs_ddp"] - 1 <= 0.35}
    if base is not None and "fsdp" in by:
        targets["fsdp_pgo_vs_ddp"] = {"value": by["fsdp"]["pgo_vs_ddp"], "target": "<= 0.55",
                                      "met": by["fsdp"]["pgo_vs_ddp"] <= 0.55}
    cuda = any("cuda_max_allocated" in r for r in rows)
    head = ["row", "params MB", "grads MB", "optim MB", "p+g+o MB", "p+g+o vs DDP", "activations MB",
            "act. vs DDP", "step ms", "time vs DDP", *(["CUDA peak MB"] if cuda else []), "reference claim"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['row']} | skipped: {r['skipped'][:160]} |" + " |" * (len(head) - 2))
            continue
        cells = [r["row"], _mb(r["params"]), _mb(r["grads"]), _mb(r["optimizer"]), _mb(r["pgo"]),
                 f"{r.get('pgo_vs_ddp', float('nan')):.2f}x", _mb(r["activations"]),
                 f"{r.get('act_vs_ddp', float('nan')):.2f}x", f"{r['step_s'] * 1e3:,.0f}",
                 f"{r.get('time_vs_ddp', float('nan')):.2f}x"]
        if cuda:
            cells.append(_mb(r.get("cuda_max_allocated", 0)))
        cells.append(CLAIMS.get(r["row"], ""))
        lines.append("| " + " | ".join(cells) + " |")
    world = raw["world_size"]
    t_lines = [f"- {k}: {v['value']:.2f} (target {v['target']}): {'met' if v['met'] else 'NOT met'}"
               for k, v in targets.items()]
    md = (f"# Memory per rank, {world} ranks ({args.preset} preset, global batch {args.batch_size} x "
          f"{args.seq_len} tokens, {args.steps} steps x {args.rounds} rounds)\n\n" + "\n".join(lines) + "\n\n"
          + "Largest rank shown. Parameters, gradients and optimizer state are counted from the tensors the rank "
            "holds after an optimizer step (a DTensor by its local shard); activations are the distinct storages "
            "saved for backward in one step's forward (saved_tensors_hooks; parameters excluded; under "
            "checkpointing plus the block inputs checkpoint keeps); step time is the median over steps and "
            "rounds, the rows interleaved. DDP keeps the gradients as views into its all-reduce buckets "
            "(gradient_as_bucket_view), so they are all of its gradient memory.\n\n" + "\n".join(t_lines)
          + f"\n\nLoad average at start / end: {raw['load'][0]} / {raw['load'][1]}.\n")
    return {"rows": rows, "targets": targets, "world_size": world, "load_start": raw["load"][0],
            "load_end": raw["load"][1], "settings": vars(args)}, md


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch-size", type=int, default=8, help="global batch (sequences)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=5, help="steps per run (>= 4: 1 warm-up, timed, 1 measured)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--device", default=None, help="cpu or cuda; none = cuda when available")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--name", default="memory")
    p.add_argument("--out", default=None, help="results folder (default docs/results)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.steps < 4:
        p.error("--steps must be >= 4")
    if args.worker:
        worker(Path(args.worker), args)
        return
    sys.path.insert(0, str(ROOT))
    from results_io import save_results

    with tempfile.TemporaryDirectory() as tmp:
        result_file = Path(tmp) / "raw.json"
        argv = [a for a in sys.argv[1:]]
        relaunch_under_torchrun(str(Path(__file__).resolve()), args.nproc, argv, result_file)
        raw = json.loads(result_file.read_text())
    res, md = summarize(raw, args)
    save_results(args.out, args.name, res, md)
    print(md)


if __name__ == "__main__":
    main()
