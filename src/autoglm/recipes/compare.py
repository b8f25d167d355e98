"""The comparison recipe: several presets trained side by side for the same training time.

This is what `make demo` runs: the sparse-attention MoE model (`small`) and the dense
Transformer of equal total size (`standard-small`) each get `minutes` of training on the same
corpus, tokenizer, batches and schedule. Before any training, every model's optimizer step is
timed side by side (a few rounds, one step of each model in turn), and each run gets the steps
that fit `minutes` at its own step time; evaluations are not counted. So a machine that slows
down while one model trains (a shared VM) changes how long that run takes, not how much it
trains; a run that takes more than twice its budget is stopped. The result is a table (with
each trained model's batch-1 forward latency at long inputs, where sparse attention pays off),
a plot of validation loss against wall-clock time and of latency against input length, and a
sample from the model with the lower validation loss.

`hf-llama` and `hf-mixtral` in `presets` add transformers' own Llama and Mixtral built at the
size of the first Mixture-of-Experts preset (`autoglm.baselines`), trained by the same Trainer
on the same batches, schedule and budget.

Files under `out`: one run directory per preset (`out/<preset>/`, loadable like any
`autoglm train` run; transformers' twins keep their metrics only), `compare.json`,
`compare.md` and `val_loss.png`.

Example:
    >>> from autoglm.settings import load_config
    >>> cfg = load_config(CompareConfig, overrides={"minutes": 0.5})
    >>> cfg.presets, cfg.train.batch_size, cfg.train.seq_len
    (('small', 'standard-small'), 8, 64)
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..settings import section, setting
from ..training.config import TrainConfig
from .common import ModelSpec, TextData

__all__ = ["CompareConfig", "compare", "side_by_side_seconds_per_step", "steps_for_budget", "forward_latency_ms",
           "interleaved_latencies", "training_step"]

log = logging.getLogger(__name__)


@dataclass
class CompareConfig:
    out: Path = setting(Path("runs/compare"), "folder for the runs (one per preset), the table and the plot")
    presets: tuple[str, ...] = setting(("small", "standard-small"), "presets to train side by side; hf-llama and "
                                       "hf-mixtral add transformers' own Llama / Mixtral at the size of the "
                                       "first Mixture-of-Experts preset listed (autoglm.baselines)")
    minutes: float = setting(2.0, "training time per model, at its step time measured side by side with the "
                                  "others before training (evaluations not counted)")
    vocab_size: int = setting(2048, "BPE vocabulary trained once on the corpus and shared by every model")
    data: TextData = section(TextData)
    # many small steps learn the most in a short budget: on 2 CPU cores 8 x 64 tokens per step
    # reached a lower validation loss in 2 minutes than 16 x 128 or 4 x 64 (and lr 4e-3 than 3e-3 or 6e-3)
    train: TrainConfig = section(TrainConfig, batch_size=8, seq_len=64, lr=4e-3, eval_every=25, eval_batches=8,
                                 save_every=0, log_every=10, max_steps=1)
    sample_prompt: str = setting("Return the", "prompt of the sample from the better model; '' = none")
    sample_tokens: int = setting(60, "tokens in the sample")
    sample_temperature: float = setting(0.7, "sampling temperature of the sample (top-k 40, top-p 0.95)")
    latency_lengths: tuple[int, ...] = setting((512, 2048, 8192), "input lengths at which each trained model's "
                                                                  "batch-1 forward is timed; empty = none")
    latency_repeats: int = setting(3, "timed forwards per length (the median counts, after a warm-up)")
    device: str | None = setting(None, "cpu, cuda or cuda:N; none = cuda when available")
    lrs: tuple[float, ...] = setting((), "learning-rate grid: every preset trains once per rate (each for "
                                         "`minutes`); the validation split is halved, the rate with the lowest "
                                         "loss on the first half is kept and its loss and bits per byte on the "
                                         "second (test) half reported; empty = train.lr alone, no test half")

    def __post_init__(self) -> None:
        if len(self.presets) < 1:
            raise ValueError("presets is empty; name at least one, e.g. small,standard-small")
        from ..baselines import TRANSFORMERS_BASELINES

        for p in self.presets:
            if p not in TRANSFORMERS_BASELINES:
                ModelSpec(p)  # an unknown preset fails here, before any training
        if set(self.presets) & set(TRANSFORMERS_BASELINES) and self.size_preset() is None:
            raise ValueError(f"presets {list(self.presets)}: {'/'.join(TRANSFORMERS_BASELINES)} are built at the size "
                             f"of the first Mixture-of-Experts preset listed, and there is none; add one, e.g. "
                             f"small,standard-small,hf-llama,hf-mixtral")
        if self.minutes <= 0:
            raise ValueError(f"minutes must be > 0, got {self.minutes}")
        self.lrs = tuple(float(x) for x in self.lrs)
        if any(x <= 0 for x in self.lrs):
            raise ValueError(f"lrs must all be positive, got {list(self.lrs)}")

    def size_preset(self) -> str | None:
        """The first Open-AutoGLM preset with experts: the size transformers' twins are built at."""
        from ..baselines import TRANSFORMERS_BASELINES

        return next((p for p in self.presets if p not in TRANSFORMERS_BASELINES
                     and ModelSpec(p).config().num_experts), None)

    def builder(self, name: str, vocab: int):
        """() -> a freshly initialised model of row `name` for a tokenizer of `vocab` tokens."""
        from ..baselines import TRANSFORMERS_BASELINES, build_baseline
        from .common import build_model

        if name in TRANSFORMERS_BASELINES:
            size = ModelSpec(self.size_preset(), vocab).config(vocab)
            return lambda: build_baseline(name, size, self.train.seq_len)
        spec = ModelSpec(name, self.vocab_size)
        return lambda: build_model(spec, vocab)


def side_by_side_seconds_per_step(builds: dict, t: TrainConfig, tokens, device: str | None = None,
                                  rounds: int = 3) -> dict[str, float]:
    """{name: median seconds of one optimizer step} of fresh models from `builds` ({name: build}),
    timed side by side: a warm-up step each, then `rounds` rounds of one step of every model in
    turn (the order reversed every other round), so a change in the machine's speed touches
    every model alike instead of whichever was being timed."""
    from ..baselines import baseline_objective
    from ..training import SingleDevice

    strategy = SingleDevice(device)
    steps = {}
    for name, build in builds.items():
        model = strategy.setup(build())
        steps[name] = training_step(model, t, tokens, baseline_objective(model), strategy)
        steps[name](0)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in builds}
    for r in range(rounds):
        for name in (list(builds) if r % 2 == 0 else list(builds)[::-1]):
            times[name].append(steps[name](r + 1))
    return {name: sorted(v)[len(v) // 2] for name, v in times.items()}


def training_step(model, t: TrainConfig, tokens, objective, strategy=None):
    """A function i -> wall-clock seconds of optimizer step i (forward, backward, AdamW) of
    `model` (already on the strategy's device) on real batches of `tokens`; several models'
    steps can be interleaved to time them side by side. `objective(model, (x, y))` gives the
    loss (any causal LM: see `CausalLMObjective`)."""
    import torch

    from ..data import sample_batch
    from ..training import SingleDevice, build_optimizer

    strategy = strategy or SingleDevice(str(next(model.parameters()).device))
    opt = build_optimizer(model, t)
    model.train()

    def step(i: int) -> float:
        if strategy.device.type == "cuda":
            torch.cuda.synchronize(strategy.device)
        t0 = time.perf_counter()
        for m in range(t.grad_accum):
            x, y = (b.to(strategy.device) for b in sample_batch(tokens, t.batch_size, t.seq_len, i * 7 + m, t.seed))
            with strategy.autocast(t.precision):
                loss = objective(model, (x, y))["loss"] / t.grad_accum
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if strategy.device.type == "cuda":
            torch.cuda.synchronize(strategy.device)
        return time.perf_counter() - t0

    return step


def forward_latency_ms(model, seq_len: int, repeats: int = 3, precision: str = "fp32") -> float:
    """Median wall-clock ms of one batch-1 forward over `seq_len` tokens (every layer, and the
    logits of the last position, as in prefill), no KV cache, after one warm-up. The model's
    context must already cover `seq_len` (`model.extend_context`)."""
    import torch

    from ..training import autocast_context

    device = next(model.parameters()).device
    x = torch.randint(2, model.config.vocab_size, (1, seq_len), device=device)
    times = []
    with torch.inference_mode(), autocast_context(precision, device):
        for i in range(repeats + 1):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            model(x, use_cache=False, logits_to_keep=1)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i:  # the first call is the warm-up
                times.append(time.perf_counter() - t0)
    return 1000 * sorted(times)[len(times) // 2]


def interleaved_latencies(models: dict, lengths, repeats: int, precision: str = "fp32") -> dict[str, dict[int, float]]:
    """Median batch-1 forward ms of every model at every length, timed side by side: one
    warm-up per (model, length), then `repeats` rounds that each time every model once, so a
    machine whose load drifts slows all of them alike. Contexts must cover the lengths."""
    import torch

    from ..training import autocast_context

    times: dict[str, dict[int, list[float]]] = {n: {T: [] for T in lengths} for n in models}
    inputs = {}
    for name, m in models.items():
        device = next(m.parameters()).device
        for T in lengths:
            inputs[name, T] = torch.randint(2, min(m.config.vocab_size, 30000), (1, T), device=device)
    with torch.inference_mode():
        for r in range(repeats + 1):
            for T in lengths:
                for name, m in models.items():
                    device = next(m.parameters()).device
                    with autocast_context(precision, device):
                        if device.type == "cuda":
                            torch.cuda.synchronize(device)
                        t0 = time.perf_counter()
                        m(inputs[name, T], use_cache=False, logits_to_keep=1)
                        if device.type == "cuda":
                            torch.cuda.synchronize(device)
                    if r:  # round 0 is the warm-up
                        times[name][T].append(1000 * (time.perf_counter() - t0))
    return {n: {T: sorted(v)[len(v) // 2] for T, v in d.items()} for n, d in times.items()}


def latencies(model, lengths, repeats: int, precision: str = "fp32") -> dict[int, float]:
    """forward_latency_ms at each length, on a copy of `model` whose context is extended to the
    longest one (an absolute position table is interpolated: the copy, not the model)."""
    import copy

    if not lengths:
        return {}
    m = copy.deepcopy(model).eval()
    if hasattr(m, "extend_context"):  # transformers' twins use RoPE: any length
        m.extend_context(max(max(lengths), m.config.max_position_embeddings))
    return {T: forward_latency_ms(m, T, repeats, precision) for T in lengths}


def steps_for_budget(budget_s: float, step_s: float) -> int:
    """Optimizer steps that fit `budget_s` of training at `step_s` per step (at least 10)."""
    return max(10, int(budget_s / step_s))


def compare(cfg: CompareConfig, progress: bool = True, console: Any = None) -> dict[str, Any]:
    """Train every preset for `cfg.minutes` and write the table, the plot and the sample."""
    from ..atomic import atomic_write_text
    from ..baselines import TRANSFORMERS_BASELINES, parameter_counts
    from ..data import prepare_corpus
    from ..settings import to_dict
    from .generate import generate_text
    from .pretrain import PretrainConfig, pretrain

    out = Path(cfg.out)
    earlier = sorted(str(p.parent) for p in out.glob("**/run.json")) if out.is_dir() else []
    if earlier:  # checked before the corpus is read and anything is timed
        raise FileExistsError(f"{out} already holds the runs of an earlier comparison ({', '.join(earlier[:3])}"
                              f"{', ...' if len(earlier) > 3 else ''}); choose another --out or delete it first")
    data = prepare_corpus(cfg.data.path, cfg.data.cache_dir, cfg.vocab_size, val_fraction=cfg.data.val_fraction,
                          extra_train=cfg.data.extra_train)
    budget = cfg.minutes * 60
    rows, curves, runs = [], {}, {}
    val = data.tokens.val
    select, test = val[: len(val) // 2], val[len(val) // 2:]  # halves used only with a grid
    builds = {preset: cfg.builder(preset, len(data.tokenizer)) for preset in cfg.presets}
    step_times = side_by_side_seconds_per_step(builds, cfg.train, data.tokens.train, cfg.device)
    for preset, build in builds.items():
        step_s = step_times[preset]
        steps = steps_for_budget(budget, step_s)
        log.info("%s: %.2f s/step (timed side by side) -> %d steps in %.0f s", preset, step_s, steps, budget)
        grid, res = [], None
        for lr in cfg.lrs or (cfg.train.lr,):
            # the steps are the budget; the time cap only stops a run on a machine gone much slower
            train = replace(cfg.train, lr=lr, max_steps=steps, max_seconds=2 * budget, warmup_steps=None,
                            eval_every=max(1, min(cfg.train.eval_every, steps // 4)))
            run_out = out / preset / f"lr-{lr:g}" if cfg.lrs else out / preset
            if preset in TRANSFORMERS_BASELINES:
                r = _train_baseline(build, run_out, train, data, cfg.device, progress, console)
            else:
                run_cfg = PretrainConfig(out=run_out, model=ModelSpec(preset, cfg.vocab_size), data=cfg.data,
                                         train=train, device=cfg.device, sample_prompt="")
                r = pretrain(run_cfg, progress=progress, console=console, prepared=data)
            if not cfg.lrs:
                res = r
                break
            entry = {"lr": lr, "steps": r.result.steps,
                     "select_loss": _eval_loss(r.model, select, cfg.train)["loss"]}
            log.info("%s lr %g: loss %.4f on the selection half", preset, lr, entry["select_loss"])
            grid.append(entry)
            if res is None or entry["select_loss"] < min(g["select_loss"] for g in grid[:-1]):
                res = r
        runs[preset] = res
        counts = parameter_counts(res.model)
        curve = [(r["elapsed"], r["val_loss"]) for r in res.result.history if "val_loss" in r]
        curves[preset] = curve
        ev = res.result.final_eval
        lat = latencies(res.model, cfg.latency_lengths, cfg.latency_repeats, cfg.train.precision)
        log.info("%s forward latency (ms): %s", preset, {k: round(v, 1) for k, v in lat.items()})
        rows.append({"preset": preset, "params_total": counts["total"], "params_active": counts["active"],
                     "steps": res.result.steps, "planned_steps": steps, "seconds_per_step": round(step_s, 4),
                     "stop_reason": res.result.stop_reason, "seconds": round(res.result.elapsed, 1),
                     "tokens_per_s": round(res.result.tokens_per_s), "val_loss": ev["loss"],
                     "val_ppl": ev["perplexity"], "val_acc": ev["accuracy"], "latency_ms": lat})
        if grid:
            best_lr = min(grid, key=lambda g: g["select_loss"])
            te = _eval_loss(res.model, test, cfg.train)
            rows[-1].update(lr=best_lr["lr"], select_loss=best_lr["select_loss"], test_loss=te["loss"],
                            test_bpb=bits_per_byte(te["loss"], te["tokens"], test, data.tokenizer), grid=grid)
    best = min(rows, key=lambda r: r["val_loss"])["preset"]
    ours = [r for r in rows if r["preset"] not in TRANSFORMERS_BASELINES]
    sample_from = min(ours, key=lambda r: r["val_loss"])["preset"] if ours else None
    sample = ""
    if cfg.sample_prompt and sample_from is not None:  # the engine serves Open-AutoGLM models
        model = runs[sample_from].model.eval()
        sample = generate_text(model, data.tokenizer, cfg.sample_prompt, cfg.sample_tokens,
                               temperature=cfg.sample_temperature, top_k=40, top_p=0.95, seed=cfg.train.seed)
    result = {"rows": rows, "best": best, "sample": sample, "sample_from": sample_from, "curves": curves,
              "config": to_dict(cfg), "data": data.source}
    atomic_write_text(out / "compare.json", json.dumps(result, indent=2))
    atomic_write_text(out / "compare.md", markdown(result))
    plot = _plot(rows, curves, out / "val_loss.png", cfg.minutes)
    result["plot"] = str(plot) if plot else None
    return result


def _train_baseline(build, out: Path, t: TrainConfig, data, device: str | None, progress: bool, console: Any):
    """Train transformers' twin from `build()` as `pretrain` trains a preset: the same seed,
    batches, schedule and Trainer; metrics (no run directory: the engine does not serve it)
    under `out`. -> an object with .model and .result, as `pretrain`'s output."""
    import torch
    from types import SimpleNamespace

    from ..baselines import baseline_objective
    from ..data import iter_eval_batches
    from ..distributed.data import rank_batch
    from ..training import SingleDevice, Trainer

    torch.manual_seed(t.seed)
    model = build()
    train, val = data.tokens.train, data.tokens.val
    trainer = Trainer(model, t, train_batch=lambda i: rank_batch(train, t.batch_size, t.seq_len, i, t.seed, 0, 1),
                      eval_batches=lambda: iter_eval_batches(val, t.batch_size, t.seq_len, max_batches=t.eval_batches),
                      out_dir=out, objective=baseline_objective(model), progress=progress,
                      strategy=SingleDevice(device), console=console)
    result = trainer.fit()
    return SimpleNamespace(model=trainer.model, result=result)


def _eval_loss(model, tokens, t: TrainConfig) -> dict[str, float]:
    """Mean next-token loss of `model` over `tokens` (every window, capped at 4 x eval_batches)."""
    from ..data import iter_eval_batches
    from ..training import evaluate

    batches = iter_eval_batches(tokens, t.batch_size, t.seq_len, max_batches=4 * t.eval_batches)
    device = next(model.parameters()).device
    return evaluate(model, ((x.to(device), y.to(device)) for x, y in batches),
                    precision=t.precision if t.precision != "auto" else "fp32")


def bits_per_byte(loss: float, n_tokens: int, tokens, tokenizer) -> float:
    """Bits per UTF-8 byte of the `n_tokens` predicted tokens (tokens[1 : 1 + n_tokens], as
    `iter_eval_batches` lays them out) at a mean loss of `loss` nats per token: comparable
    across tokenizers."""
    import math

    text = tokenizer.decode([int(x) for x in tokens[1:1 + n_tokens]])
    return loss * n_tokens / (math.log(2) * max(1, len(text.encode("utf-8"))))


def markdown(result: dict[str, Any]) -> str:
    lengths = list(result["rows"][0]["latency_ms"])
    lines = ["| model | params (total / active) | steps | tokens/s | val loss | perplexity | next-token acc | "
             + "".join(f"fwd {T} ms | " for T in lengths),
             "|---|---|---|---|---|---|---|" + "---|" * len(lengths)]
    for r in result["rows"]:
        lines.append(f"| {r['preset']} | {r['params_total'] / 1e6:.1f}M / {r['params_active'] / 1e6:.1f}M | "
                     f"{r['steps']} | {r['tokens_per_s']:,} | {r['val_loss']:.3f} | {r['val_ppl']:.1f} | "
                     f"{r['val_acc'] * 100:.1f}% | " + "".join(f"{r['latency_ms'][T]:.0f} | " for T in lengths))
    if any("grid" in r for r in result["rows"]):
        lines += ["", "| model | lr grid (loss on the selection half) | chosen lr | test loss | test bits/byte |",
                  "|---|---|---|---|---|"]
        for r in result["rows"]:
            grid = ", ".join(f"{g['lr']:g}: {g['select_loss']:.3f}" for g in r["grid"])
            lines.append(f"| {r['preset']} | {grid} | {r['lr']:g} | {r['test_loss']:.3f} | {r['test_bpb']:.3f} |")
    lines.append("")
    lines.append(f"Same wall-clock per model ({result['config']['minutes']:g} min), same corpus, tokenizer, batches "
                 f"and schedule; lower validation loss: **{result['best']}**. Forward latency: batch 1, the trained "
                 f"weights, median of {result['config']['latency_repeats']}.")
    if result["sample"]:
        lines += ["", f"Sample from {result['sample_from']}:", "", "> " + result["sample"].replace("\n", "\n> ")]
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict], curves: dict[str, list], path: Path, minutes: float) -> Path | None:
    """Validation loss against wall-clock time and, when measured, forward latency against length."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed; no plot (pip install matplotlib)")
        return None
    with_latency = bool(rows and rows[0]["latency_ms"])
    fig, axes = plt.subplots(1, 2 if with_latency else 1, figsize=(11 if with_latency else 6, 4), squeeze=False)
    ax = axes[0][0]
    for name, pts in curves.items():
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=name)
    ax.set(xlabel="wall-clock seconds (training + evaluation)", ylabel="validation loss (nats / token)",
           title=f"Same budget ({minutes:g} min per model)")
    if with_latency:
        ax = axes[0][1]
        for r in rows:
            lengths = list(r["latency_ms"])
            ax.plot(lengths, [r["latency_ms"][T] for T in lengths], marker="o", label=r["preset"])
        ax.set(xscale="log", yscale="log", xlabel="input tokens", ylabel="forward latency (ms, batch 1)",
               title="Forward latency")
    for ax in axes[0]:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
