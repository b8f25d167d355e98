"""Training throughput per distributed strategy, and the scaling table, measured.

For each world size (default 1 and 2; on a GPU machine 1, 2, 4, ... up to every GPU) one
torchrun job runs the pretrain recipe (`autoglm train`) once per strategy (single, ddp,
fsdp, zero1 on one process; ddp, fsdp, zero1 on several), with a fixed per-device batch (weak
scaling: the global batch grows with the devices). The jobs alternate world sizes round by
round, so load on a shared machine hits them alike. Backend: nccl on GPUs, gloo on CPU.

* tokens/s: global tokens per step over the median step time (steps after the first, the
  strategy's own collectives included);
* MFU: model FLOPs per token (`autoglm.training.throughput.model_flops_per_token`, training =
  3x forward, recomputation not counted) x tokens/s, over the devices' summed peak. On CPU the
  peak is measured (`peak_flops`: the FLOP rate of one large matmul in the run's precision on
  one thread, which is what each rank has), so CPU MFU says how close the model gets to
  matmul speed on that core, not a datasheet fraction;
* scaling efficiency: tokens/s on N devices / (N x tokens/s on 1 device), for ddp.

    python benchmarks/throughput.py                            # small preset, 1 and 2 ranks, docs/results/throughput.*
    python benchmarks/throughput.py --preset tiny --steps 4 --rounds 1 --out /tmp   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from memory import Probe, prepare_data, relaunch_under_torchrun  # noqa: E402


def worker(result_file: Path, args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from autoglm.recipes.pretrain import PretrainConfig, pretrain
    from autoglm.settings import load_config
    from autoglm.training.throughput import model_flops_per_token, peak_flops

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    load0 = os.getloadavg()
    data = prepare_data(args.preset, args.cache_dir)
    world = dist.get_world_size()
    strategies = (["single"] if world == 1 else []) + [s for s in args.strategies.split(",") if s]
    rows = []
    with tempfile.TemporaryDirectory(prefix="autoglm-throughput-") as tmp:
        box = [tmp if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(box)
        for name in strategies:
            cfg = load_config(PretrainConfig, overrides={
                "dist.strategy": name, "dist.nproc": world if name != "single" else 1, "model.preset": args.preset,
                "out": f"{box[0]}/{name}", "train.batch_size": args.per_device_batch * world,
                "train.seq_len": args.seq_len, "train.max_steps": args.steps + 1, "train.warmup_steps": 1,
                "train.eval_every": 0, "train.eval_batches": 1, "train.save_every": 0, "train.log_every": 1,
                "train.precision": args.precision, "device": args.device})
            probe = Probe(args.steps + 1, measure=False)  # every step after the first is timed
            pretrain(cfg, progress=False, callbacks=[probe], tokenizer=data.tokenizer, prepared=data)
            steps = [b - a for a, b in zip(probe.times[:-1], probe.times[1:])]
            mine = {"step_s": steps}
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, mine)
            step = statistics.median(max(g["step_s"][i] for g in gathered) for i in range(len(steps)))
            tokens = cfg.train.batch_size * cfg.train.seq_len * cfg.train.grad_accum
            model_cfg = cfg.model.config(len(data.tokenizer))
            flops = model_flops_per_token(model_cfg, cfg.train.seq_len)["train"]
            device = "cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu"
            peak, how = peak_flops(device, args.precision)
            rows.append({"strategy": name, "devices": world, "per_device_batch": args.per_device_batch,
                         "global_batch": cfg.train.batch_size, "seq_len": cfg.train.seq_len,
                         "step_s": step, "tokens_per_s": tokens / step, "flops_per_token": flops,
                         "peak_flops_per_device": peak, "peak_source": how,
                         "mfu": flops * tokens / step / (peak * world)})
    if dist.get_rank() == 0:
        result_file.write_text(json.dumps({"rows": rows, "load": [load0, os.getloadavg()]}))
    dist.destroy_process_group()


def summarize(runs: list[dict[str, Any]], args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    # median over rounds of each (strategy, devices)
    keyed: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for run in runs:
        for r in run["rows"]:
            keyed.setdefault((r["strategy"], r["devices"]), []).append(r)
    rows = []
    for (name, n), rs in sorted(keyed.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        tps = statistics.median(r["tokens_per_s"] for r in rs)
        rows.append({**rs[0], "tokens_per_s": tps, "mfu": statistics.median(r["mfu"] for r in rs),
                     "rounds": [r["tokens_per_s"] for r in rs]})
    base = {r["strategy"]: r for r in rows if r["devices"] == 1}
    for r in rows:
        ref = base.get(r["strategy"]) or base.get("single")
        r["efficiency"] = r["tokens_per_s"] / (r["devices"] * ref["tokens_per_s"]) if ref else None
    lines = ["| strategy | devices | tokens/s | MFU | vs 1 device (same strategy) |", "|---|---|---|---|---|"]
    for r in rows:
        vs = "n/a" if r["efficiency"] is None else f"{r['efficiency'] * r['devices']:.2f}x"  # no 1-device run
        lines.append(f"| {r['strategy']} | {r['devices']} | {r['tokens_per_s']:,.0f} | {r['mfu'] * 100:.1f}% | {vs} |")
    scaling = [r for r in rows if r["strategy"] == "ddp"]
    s_lines = ["| devices | per-device batch | global batch | tokens/s | efficiency |", "|---|---|---|---|---|"]
    for r in scaling:
        s_lines.append(f"| {r['devices']} | {r['per_device_batch']} | {r['global_batch']} | "
                       f"{r['tokens_per_s']:,.0f} | "
                       + ("n/a" if r["efficiency"] is None else f"{r['efficiency'] * 100:.0f}%") + " |")
    loads = [run["load"] for run in runs]
    peak = rows[0]["peak_source"] if rows else ""
    md = (f"# Training throughput per strategy ({args.preset} preset, {args.seq_len}-token sequences, "
          f"{args.per_device_batch} per device, {args.precision})\n\n" + "\n".join(lines)
          + "\n\n## Scaling (ddp, weak scaling: fixed per-device batch)\n\n" + "\n".join(s_lines)
          + f"\n\nTokens/s: global tokens per step over the median step time ({args.steps} timed steps, median "
            f"over {args.rounds} round(s), world sizes alternating). MFU: model FLOPs per token x tokens/s over "
            f"the devices' summed peak; peak: {peak}. Efficiency: tokens/s / (devices x the 1-device tokens/s of "
            f"ddp).\n\nLoad average (1/5/15 min) at start / end of each job: {loads}.\n")
    return {"rows": rows, "settings": vars(args), "loads": loads}, md


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--per-device-batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=4, help="timed steps (one more runs first as warm-up)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--devices", default=None, help="world sizes, e.g. 1,2,4,8; default 1,2 (CPU) or 1,2,..,#GPUs")
    p.add_argument("--strategies", default="ddp,fsdp,zero1")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--device", default=None)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--name", default="throughput")
    p.add_argument("--out", default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(Path(args.worker), args)
        return
    import torch

    from results_io import save_results

    if args.devices:
        sizes = [int(x) for x in args.devices.split(",")]
    elif torch.cuda.is_available():
        n = torch.cuda.device_count()
        sizes = sorted({2 ** i for i in range(n.bit_length()) if 2 ** i <= n} | {n})
    else:
        sizes = [1, 2]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(args.rounds):
            for n in sizes:
                result_file = Path(tmp) / f"{rnd}-{n}.json"
                relaunch_under_torchrun(str(Path(__file__).resolve()), n, sys.argv[1:], result_file)
                runs.append(json.loads(result_file.read_text()))
    res, md = summarize(runs, args)
    save_results(args.out, args.name, res, md)
    print(md)


if __name__ == "__main__":
    main()
