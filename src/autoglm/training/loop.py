"""The training loop: gradient accumulation, clipping, schedule, eval, checkpoints, metrics.

`Trainer` knows nothing about the data or the loss: `train_batch(i)` returns micro-batch
`i` (for optimizer step `s`, micro-batches `s * grad_accum + m`), the objective turns
(model, batch) into {"loss", metrics...}, and the strategy owns devices and collectives.
Because a batch is a pure function of its index and the checkpoint holds the model,
optimizer, scheduler and RNG states, `fit(resume=True)` reproduces an uninterrupted run's
losses exactly.

Files under `out_dir`: `metrics.jsonl` (one JSON row per logged step or evaluation) and
`checkpoints/step-NNNNNN/` + `checkpoints/latest` (see `autoglm.training.checkpoint`).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from torch import nn

from .checkpoint import CheckpointError, list_checkpoints, load_latest
from .config import TrainConfig
from .evaluate import evaluate
from .objectives import CausalLMObjective, Objective
from .optim import build_scheduler
from .strategy import SingleDevice, Strategy, resolve_precision
from .throughput import mfu, model_flops_per_token, peak_flops

__all__ = ["Trainer", "TrainResult", "Callback", "enable_grad_checkpointing"]

log = logging.getLogger(__name__)

Batch = Any
# fields a resumed run may change without changing what a step computes
_RUN_LENGTH_FIELDS = {"max_steps", "max_seconds", "eval_every", "eval_batches", "save_every",
                      "keep_checkpoints", "log_every", "compile"}


class Callback:
    """Optional hooks; any object with some of these methods works (duck-typed).
    Set `trainer.should_stop = True` to end training early (final eval + save still run)."""

    def on_step(self, trainer: "Trainer", metrics: dict[str, float]) -> None:
        """After every logged optimizer step (every `log_every` steps), with the metrics row."""

    def on_eval(self, trainer: "Trainer", metrics: dict[str, float]) -> None:
        """After every evaluation, with the eval row (val_loss, val_ppl, val_acc, ...)."""


@dataclass
class TrainResult:
    history: list[dict[str, float]]  # rows this fit() logged (train and eval), as in metrics.jsonl
    final_eval: dict[str, float] | None  # evaluate() at the last step; None without eval data
    steps: int  # optimizer steps done in total, across resumes
    steps_run: int  # optimizer steps this fit() call ran
    elapsed: float  # wall seconds of this call (training, eval and saving)
    rate: float  # `unit` trained on / seconds spent in training steps (eval + saving excluded)
    stop_reason: str  # "max_steps", "max_seconds" or "callback"
    checkpoint: Path | None = None  # the last checkpoint written or loaded
    unit: str = "tokens"  # what the objective counts: tokens (language models), pairs (align), nodes (graphs)

    @property
    def tokens_per_s(self) -> float:
        """Training tokens per second; an error for objectives that count something else."""
        if self.unit != "tokens":
            raise AttributeError(f"this run counted {self.unit}, not tokens: read .rate ({self.unit}/s)")
        return self.rate


def enable_grad_checkpointing(model: nn.Module) -> None:
    """Turn on activation checkpointing in every submodule exposing a boolean
    `gradient_checkpointing` flag (the Open-AutoGLM backbone does)."""
    found = False
    for m in model.modules():
        if isinstance(getattr(m, "gradient_checkpointing", None), bool):
            m.gradient_checkpointing = True
            found = True
    if not found:
        raise ValueError(f"{type(model).__name__} has no submodule with a `gradient_checkpointing` flag; "
                         f"set grad_checkpointing=False or add activation checkpointing to the model")


def _to_device(batch: Batch, device: torch.device) -> Batch:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def count_tokens(batch: Batch) -> int:
    """Tokens in a batch: input_ids of a (input_ids, ...) tuple or an {"input_ids": ...} dict.
    The throughput an objective reports unless it names its own `unit` and `count(batch)`."""
    first = batch.get("input_ids") if isinstance(batch, dict) else (
        batch[0] if isinstance(batch, (tuple, list)) and batch else batch)
    return first.numel() if isinstance(first, torch.Tensor) else 0


class _NoProgress:
    def __enter__(self) -> "_NoProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add_task(self, *args: Any, **kwargs: Any) -> int:
        return 0

    def update(self, *args: Any, **kwargs: Any) -> None:
        return None


class Trainer:
    def __init__(self, model: nn.Module, cfg: TrainConfig, train_batch: Callable[[int], Batch],
                 eval_batches: Callable[[], Iterable[Batch]] | None = None, out_dir: str | Path | None = None,
                 objective: Objective | None = None, strategy: Strategy | None = None,
                 callbacks: Sequence[Any] = (), progress: bool = True, console: Console | None = None) -> None:
        self.cfg = cfg
        self.strategy = strategy or SingleDevice()
        self.objective = objective or CausalLMObjective()
        self.train_batch = train_batch
        self.eval_batches = eval_batches
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.callbacks = list(callbacks)
        self.progress = progress
        self.console = console  # share the CLI's console so log lines print above the bar
        self.precision = resolve_precision(cfg.precision, self.strategy.device)
        self.strategy.configure(self.precision)
        model = self.strategy.setup(model)
        if cfg.grad_checkpointing:
            enable_grad_checkpointing(model)
        self.model = torch.compile(model) if cfg.compile else model
        self.optimizer = self.strategy.build_optimizer(self.strategy.unwrap(self.model), cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.step = 0  # optimizer steps done
        self.unit: str = getattr(self.objective, "unit", "tokens")  # what the progress bar and rows count
        self._count: Callable[[Batch], int] = getattr(self.objective, "count", count_tokens)
        self.tokens_seen = 0  # of `unit` (tokens for language models), over every data-parallel rank
        self.best_val_loss: float | None = None
        self.should_stop = False
        self.history: list[dict[str, float]] = []
        self._metrics_rows = 0  # rows in metrics.jsonl, across resumes
        self._prior_elapsed = 0.0  # wall seconds of earlier fit() calls (restored on resume)
        self._fit_start = time.perf_counter()
        self._last_eval: tuple[int, dict[str, float]] | None = None
        self._last_checkpoint: tuple[int, Path] | None = None
        self._flops_per_token = self._model_flops(model) if self.unit == "tokens" else None  # None: no MFU
        self._peak: tuple[float, str] | None = None  # peak FLOP/s of the device, looked up at the first row

    # ------------------------------------------------------------------ paths
    @property
    def ckpt_root(self) -> Path | None:
        return self.out_dir / "checkpoints" if self.out_dir is not None else None

    @property
    def metrics_path(self) -> Path | None:
        return self.out_dir / "metrics.jsonl" if self.out_dir is not None else None

    def elapsed(self) -> float:
        """Wall seconds of training so far, across resumes."""
        return self._prior_elapsed + time.perf_counter() - self._fit_start

    # ------------------------------------------------------------------- steps
    def forward_backward(self, step: int) -> dict[str, torch.Tensor]:
        """Accumulate gradients of optimizer step `step` over its `grad_accum` micro-batches
        (each loss scaled by 1/grad_accum); returns the detached metrics averaged over them.
        Does not zero gradients or step the optimizer."""
        accum = self.cfg.grad_accum
        device = self.strategy.device
        sums: dict[str, torch.Tensor] = {}
        for micro in range(accum):
            batch = _to_device(self.train_batch(step * accum + micro), device)
            self.tokens_seen += self._count(batch) * self.strategy.data_parallel_size
            with self.strategy.no_sync(self.model, sync=micro == accum - 1):
                with self.strategy.autocast(self.precision):
                    out = self.objective(self.model, batch)
                if "loss" not in out:
                    raise KeyError(f"objective {self.objective!r} returned {sorted(out)} without a 'loss' entry; "
                                   f"return {{'loss': scalar_to_backprop, **metrics}}")
                self.strategy.backward(out["loss"] / accum)
            for k, v in out.items():
                v = v.detach().float() / accum
                sums[k] = sums[k] + v if k in sums else v
        return sums

    def train_step(self, step: int) -> dict[str, Any]:
        """One optimizer step: zero grads, accumulate, clip, AdamW step, schedule step.
        Returns metrics (tensors, plus "lr" used for this step and "grad_norm" before clipping)."""
        self.optimizer.zero_grad(set_to_none=True)
        metrics: dict[str, Any] = self.forward_backward(step)
        metrics["grad_norm"] = self.strategy.clip_grad_norm(self.model, self.cfg.grad_clip)
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        self.strategy.optimizer_step(self.optimizer)
        self.scheduler.step()
        return metrics

    # --------------------------------------------------------------------- fit
    def fit(self, resume: bool = False) -> TrainResult:
        """Train until `max_steps` (or `max_seconds`, or a callback's `should_stop`), then
        evaluate and checkpoint once more. `resume=True` continues from the latest
        checkpoint under `out_dir` and raises CheckpointError when there is none."""
        cfg = self.cfg
        self._fit_start = time.perf_counter()
        if resume:
            self._resume()
        elif self.step == 0:
            self._start_fresh()
        self.history = []
        self.should_stop = False
        self.model.train()
        start_step, start_tokens = self.step, self.tokens_seen
        train_seconds = window_seconds = 0.0
        window_tokens = 0
        stop_reason = "max_steps"
        with self._progress_bar() as bar:
            task = bar.add_task("train", total=cfg.max_steps, completed=self.step, loss=float("nan"), rate=0.0,
                                mfu="")
            while self.step < cfg.max_steps:
                if self.should_stop:
                    stop_reason = "callback"
                    break
                t0, tokens0 = time.perf_counter(), self.tokens_seen
                metrics = self.train_step(self.step)
                self.step += 1
                time_up = cfg.max_seconds is not None and time.perf_counter() - self._fit_start >= cfg.max_seconds
                log_now = (self.step % cfg.log_every == 0 or self.step == cfg.max_steps
                           or self.step == start_step + 1 or time_up)
                if log_now and self.strategy.device.type == "cuda":
                    torch.cuda.synchronize(self.strategy.device)  # so the window's time covers its kernels
                dt = time.perf_counter() - t0  # between logged rows the GPU may run behind; the sync evens it out
                train_seconds += dt
                window_seconds += dt
                window_tokens += self.tokens_seen - tokens0
                if log_now:
                    row = self._train_row(metrics, window_tokens / max(window_seconds, 1e-9))
                    window_seconds, window_tokens = 0.0, 0
                    bar.update(task, loss=row["loss"], rate=row[f"{self.unit}_per_s"],  # no MFU without a FLOP count
                               mfu=f"MFU {100 * row['mfu']:.1f}%" if "mfu" in row else "")
                    self._emit(row, "on_step")
                bar.update(task, completed=self.step)
                if cfg.eval_every and self.step % cfg.eval_every == 0:
                    self._run_eval()
                if cfg.save_every and self.step % cfg.save_every == 0:
                    self._save()
                if time_up:
                    stop_reason = "max_seconds"
                    log.info("time budget of %.0f s reached at step %d/%d; stopping", cfg.max_seconds,
                             self.step, cfg.max_steps)
                    break
        final_eval = self._last_eval[1] if self._last_eval and self._last_eval[0] == self.step else self._run_eval()
        if not (self._last_checkpoint and self._last_checkpoint[0] == self.step):
            self._save()
        steps_run = self.step - start_step
        return TrainResult(history=self.history, final_eval=final_eval, steps=self.step, steps_run=steps_run,
                           elapsed=time.perf_counter() - self._fit_start,
                           rate=(self.tokens_seen - start_tokens) / max(train_seconds, 1e-9), unit=self.unit,
                           stop_reason=stop_reason,
                           checkpoint=self._last_checkpoint[1] if self._last_checkpoint else None)

    # ------------------------------------------------------------- start/resume
    def _start_fresh(self) -> None:
        root = self.ckpt_root
        if root is not None and list_checkpoints(root):
            raise ValueError(f"{self.out_dir} already holds checkpoints (newest: {list_checkpoints(root)[-1].name}); "
                             f"pass resume=True (--resume) to continue that run, or choose an empty output directory")
        torch.manual_seed(self.cfg.seed)
        if self.strategy.is_main and self.metrics_path is not None and self.metrics_path.exists():
            self.metrics_path.unlink()  # rows of an earlier run that never saved a checkpoint

    def _resume(self) -> None:
        root = self.ckpt_root
        if root is None:
            raise ValueError("resume=True needs out_dir (the run directory holding checkpoints/); "
                             "pass out_dir or train without resuming")
        path = load_latest(root)
        if path is None:
            raise CheckpointError(f"resume requested but {root} holds no checkpoint; start without resuming "
                                  f"(drop --resume) or choose the output directory of a run that saved one")
        state = self.strategy.load_checkpoint(path, self.model, self.optimizer, self.scheduler)
        self.step = int(state["step"])
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.best_val_loss = state.get("best_val_loss")
        self._prior_elapsed = float(state.get("elapsed", 0.0))
        self._last_checkpoint = (self.step, path)
        self._warn_config_drift(state.get("train_config") or {})
        self._truncate_metrics(self.step)
        log.info("resumed from %s at step %d (%d tokens seen)", path, self.step, self.tokens_seen)

    def _warn_config_drift(self, saved: dict[str, Any]) -> None:
        now = json.loads(json.dumps(dataclasses.asdict(self.cfg)))
        changed = sorted(k for k in now if k in saved and saved[k] != now[k] and k not in _RUN_LENGTH_FIELDS)
        if changed:
            log.warning("resuming with a different train config for %s (checkpoint: %s; now: %s); the run will "
                        "not reproduce an uninterrupted one", changed, {k: saved[k] for k in changed},
                        {k: now[k] for k in changed})

    def _truncate_metrics(self, step: int) -> None:
        """Drop metrics rows logged after `step` by the interrupted run (they will be redone)."""
        path = self.metrics_path
        if path is None or not path.exists():
            self._metrics_rows = 0
            return
        rows = [line for line in path.read_text().splitlines() if line.strip()]
        kept = [line for line in rows if json.loads(line).get("step", 0) <= step]
        self._metrics_rows = len(kept)
        if self.strategy.is_main and len(kept) != len(rows):
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, path)

    # ---------------------------------------------------------- eval and save
    def _run_eval(self) -> dict[str, float] | None:
        if self.eval_batches is None:
            return None
        batches = itertools.islice(self.eval_batches(), self.cfg.eval_batches)
        result = evaluate(self.model, batches, precision=self.precision)
        if self.best_val_loss is None or result["loss"] < self.best_val_loss:
            self.best_val_loss = result["loss"]
        self._last_eval = (self.step, result)
        row = {"step": self.step, "val_loss": result["loss"], "val_ppl": result["perplexity"],
               "val_acc": result["accuracy"], "val_tokens": result["tokens"], "elapsed": self.elapsed()}
        log.info("step %d | val loss %.4f | ppl %.2f | acc %.3f", self.step, row["val_loss"], row["val_ppl"],
                 row["val_acc"])
        self._emit(row, "on_eval")
        return result

    def _save(self) -> Path | None:
        root = self.ckpt_root
        if root is None:
            return None
        state = {"tokens_seen": self.tokens_seen, "best_val_loss": self.best_val_loss,
                 "elapsed": self.elapsed(), "train_config": dataclasses.asdict(self.cfg),
                 "metrics_rows": self._metrics_rows, "precision": self.precision,
                 "objective": repr(self.objective), "world_size": self.strategy.world_size}
        # the strategy writes it (one process: safetensors; several: every rank its shards)
        path = self.strategy.save_checkpoint(root, self.step, self.model, self.optimizer, self.scheduler, state,
                                             keep=self.cfg.keep_checkpoints)
        self._last_checkpoint = (self.step, path)
        return path

    # ----------------------------------------------------------------- metrics
    def _train_row(self, metrics: dict[str, Any], rate: float) -> dict[str, float]:
        """The logged row: the step's metrics (averaged over ranks), `<unit>_per_s` over the window
        since the last row, `<unit>_seen`, elapsed seconds and, for language models, MFU."""
        row: dict[str, float] = {"step": self.step}
        for k, v in metrics.items():
            if isinstance(v, torch.Tensor):
                v = self.strategy.reduce_mean(v) if k != "grad_norm" else v
                v = v.item()  # device sync, once per logged row
            row[k] = float(v)
        row.update({f"{self.unit}_per_s": rate, f"{self.unit}_seen": self.tokens_seen, "elapsed": self.elapsed()})
        if self._flops_per_token is not None:  # model-FLOPs utilisation (autoglm.training.throughput)
            if self._peak is None:
                self._peak = peak_flops(self.strategy.device, "bf16" if self.precision == "bf16" else "fp32")
                log.info("MFU counts %.1f MFLOPs per training token against a peak of %.3g TFLOP/s (%s)",
                         self._flops_per_token / 1e6, self._peak[0] / 1e12, self._peak[1])
            row["mfu"] = mfu(rate / self.strategy.data_parallel_size, self._flops_per_token,
                             self._peak[0])
        if torch.cuda.is_available() and self.strategy.device.type == "cuda":
            row["max_mem_gb"] = torch.cuda.max_memory_allocated(self.strategy.device) / 2**30
        if not math.isfinite(row["loss"]):
            last = self._last_checkpoint[1] if self._last_checkpoint else "none yet"
            raise FloatingPointError(
                f"training loss is {row['loss']} at step {self.step}; lower lr ({self.cfg.lr}), raise "
                f"warmup_steps ({self.cfg.warmup_steps}), keep grad_clip > 0, or use precision='fp32' "
                f"(last checkpoint: {last})")
        level = logging.DEBUG if self.progress else logging.INFO  # the bar already shows it
        speed = f" | {rate:,.0f} {self.unit}/s" if rate else ""
        if "mfu" in row:
            speed += f" | MFU {100 * row['mfu']:.1f}%"
        log.log(level, "step %d/%d | loss %.4f | lr %.2e | grad norm %.3f%s", self.step, self.cfg.max_steps,
                row["loss"], row["lr"], row["grad_norm"], speed)
        return row

    def _model_flops(self, model: nn.Module) -> float | None:
        """Training FLOPs per token of a language model with a transformers-style config (active
        parameters and attention at cfg.seq_len), or None for other models."""
        config = getattr(self.strategy.unwrap(model), "config", None)
        try:
            return model_flops_per_token(config, self.cfg.seq_len)["train"]
        except (AttributeError, TypeError):
            return None

    def _emit(self, row: dict[str, float], hook: str) -> None:
        self.history.append(row)
        self._metrics_rows += 1
        if self.strategy.is_main and self.metrics_path is not None:
            self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        for cb in self.callbacks:
            fn = getattr(cb, hook, None)
            if fn is not None:
                fn(self, row)

    def _progress_bar(self) -> Progress | _NoProgress:
        if not (self.progress and self.strategy.is_main):
            return _NoProgress()
        return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[rate]:,.0f} " + self.unit + "/s"),
                        TextColumn("{task.fields[mfu]}"),
                        TimeElapsedColumn(), TimeRemainingColumn(),
                        console=self.console or Console(stderr=True))
