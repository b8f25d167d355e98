"""`autoglm distill`, `autoglm finetune [--lora]`, `autoglm merge`, `autoglm adapters train|list`.

Registered in `autoglm.cli` with `app.add_typer(...)` (no group name, so the commands sit
at the top level next to `train`). Reads argv through typer only; the library gets
explicit arguments.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from .common import err, fail

__all__ = ["app"]

app = typer.Typer(add_completion=False)
adapters_app = typer.Typer(add_completion=False, no_args_is_help=True,
                           help="Task adapters (e.g. sequence classification) on a frozen backbone.")
app.add_typer(adapters_app, name="adapters")
console = Console()
DEFAULT_CACHE = Path.home() / ".cache" / "autoglm"
_ERRORS = (ValueError, FileNotFoundError, KeyError, UnicodeDecodeError)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=err, show_path=False, show_time=False)], force=True)


def _train_config(steps: int, batch_size: int, seq_len: int, lr: float, seed: int, eval_every: int = 0,
                  save_every: int = 0, **kw):
    from ..training import TrainConfig

    return TrainConfig(batch_size=batch_size, seq_len=seq_len, lr=lr, max_steps=steps,
                       warmup_steps=min(100, max(1, steps // 10)), eval_every=eval_every, save_every=save_every,
                       seed=seed, **kw)


@app.command()
def distill(
    teacher: List[Path] = typer.Option(..., help="Teacher model directory; give --teacher twice for two teachers."),
    out: Path = typer.Option(..., help="Run directory for the distilled student."),
    student: str = typer.Option("tiny", help="Student preset (see `autoglm info`)."),
    data: Optional[Path] = typer.Option(None, help="Text file or folder; default: the built-in corpus."),
    steps: int = typer.Option(500), batch_size: int = typer.Option(16), seq_len: int = typer.Option(128),
    lr: float = typer.Option(3e-3), seed: int = typer.Option(1337),
    alpha: float = typer.Option(0.7, help="Weight of the teachers in the soft target (first round)."),
    alpha_end: Optional[float] = typer.Option(None, help="Alpha in the last round (progressive schedule)."),
    rounds: int = typer.Option(1, help="Rounds of the progressive alpha schedule."),
    temperature: float = typer.Option(1.0), hard_weight: float = typer.Option(0.0, help="Hard-label CE weight."),
    combine: str = typer.Option("fixed", help="fixed or confidence (per-token teacher weighting)."),
    teacher_weights: Optional[str] = typer.Option(None, help="Fixed weights, comma separated, e.g. 0.6,0.4."),
    cache_top_k: int = typer.Option(0, help="Cache the teachers' top-k logits on disk (0: off)."),
    logit_cache: Optional[Path] = typer.Option(None, help="Teacher-logit cache directory (default OUT/logit-cache)."),
    epoch_batches: Optional[int] = typer.Option(None, help="Repeat the data every N micro-batches (an epoch)."),
    cache_dir: Path = typer.Option(DEFAULT_CACHE, help="Where tokenized corpora are cached."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Train a student from one or two teachers (progressive KD, reference loss)."""
    from ..training.distill import AlphaSchedule, DistillConfig
    from ..training.finetune import distill as run

    _setup_logging(verbose)
    try:
        weights = tuple(float(w) for w in teacher_weights.split(",")) if teacher_weights else None
        sched = AlphaSchedule(alpha, alpha if alpha_end is None else alpha_end,
                              "progressive" if rounds > 1 else "constant", rounds, steps)
        dcfg = DistillConfig(alpha=sched, temperature=temperature, combine=combine, teacher_weights=weights,
                             hard_weight=hard_weight, cache_top_k=cache_top_k)
        cfg = _train_config(steps, batch_size, seq_len, lr, seed, eval_every=max(steps // 4, 1))
        _, result = run(student, list(teacher), out, cfg, dcfg, data=data, cache_dir=cache_dir,
                        logit_cache_dir=logit_cache or out / "logit-cache", epoch_batches=epoch_batches,
                        console=err)
    except _ERRORS as e:
        fail(e)
    ev = result.final_eval
    console.print(f"[bold green]done[/]: {result.steps} steps; student validation loss {ev['loss']:.3f}, "
                  f"next-token accuracy {ev['accuracy'] * 100:.1f}%; saved to {out}")


@app.command()
def finetune(
    base: Path = typer.Argument(..., help="Base model directory (written by `autoglm train`)."),
    data: Path = typer.Option(..., help="A .jsonl of {\"prompt\", \"completion\"} (loss on completions) or text."),
    out: Path = typer.Option(..., help="Output directory (with --lora: the adapter only)."),
    lora: bool = typer.Option(False, "--lora/--full", help="LoRA through PEFT (default: full fine-tuning)."),
    target: List[str] = typer.Option(["q_proj", "v_proj"], help="LoRA target module (repeat); 'experts' too."),
    r: int = typer.Option(8), lora_alpha: int = typer.Option(16), lora_dropout: float = typer.Option(0.05),
    steps: int = typer.Option(200), batch_size: int = typer.Option(8), seq_len: int = typer.Option(128),
    lr: float = typer.Option(1e-3), seed: int = typer.Option(1337),
    save_every: int = typer.Option(100, help="Checkpoint every N steps (0: only at the end)."),
    resume: bool = typer.Option(False, help="Continue from OUT/checkpoints/latest (same options as the run)."),
    cache_dir: Path = typer.Option(DEFAULT_CACHE, help="Where tokenized corpora are cached."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Fine-tune a saved model fully or with LoRA; with --lora only the adapter is saved.
    Checkpoints (with --lora: adapter, optimizer, scheduler, step) go to OUT/checkpoints."""
    from ..training.checkpoint import CheckpointError
    from ..training.finetune import finetune as run

    _setup_logging(verbose)
    try:
        cfg = _train_config(steps, batch_size, seq_len, lr, seed, save_every=save_every)
        _, result, info = run(base, data, out, cfg, lora=lora, targets=list(target), r=r, alpha=lora_alpha,
                              dropout=lora_dropout, cache_dir=cache_dir, console=err, resume=resume)
    except (*_ERRORS, CheckpointError) as e:
        fail(e)
    pct = 100 * info["trainable_params"] / info["total_params"]
    msg = f"[bold green]done[/]: {result.steps} steps, {info['trainable_params']:,} trainable params ({pct:.2f}%)"
    if info["eval_after"]:
        msg += f"; held-out loss {info['eval_before']['loss']:.3f} -> {info['eval_after']['loss']:.3f}"
    console.print(msg + f"; saved to {out}")


@app.command()
def merge(
    adapter: Path = typer.Argument(..., help="LoRA adapter directory (from `autoglm finetune --lora`)."),
    out: Path = typer.Option(..., help="Where to write the merged, plain model."),
    base: Optional[Path] = typer.Option(None, help="Base model directory (default: the one the adapter records)."),
) -> None:
    """Fold a LoRA adapter into its base model and save a plain model (loads without PEFT)."""
    from ..training.lora import merge_lora

    _setup_logging(False)
    try:
        merge_lora(adapter, out, base)
    except _ERRORS as e:
        fail(e)
    console.print(f"merged model saved to {out}")


@adapters_app.command("train")
def adapters_train(
    model_dir: Path = typer.Argument(..., help="Model directory; the adapter goes to MODEL_DIR/adapters/NAME."),
    name: str = typer.Option(..., help="Adapter name (letters, digits, '_' or '-')."),
    data: Path = typer.Option(..., help="JSONL of {\"text\", \"label\"} records."),
    steps: int = typer.Option(200), batch_size: int = typer.Option(16), max_len: int = typer.Option(128),
    lr: float = typer.Option(1e-2), seed: int = typer.Option(1337),
    pooling: str = typer.Option("last", help="last (last real token) or mean."),
) -> None:
    """Train a sequence-classification adapter with the backbone frozen and save it by name."""
    from ..hf import OpenAutoGLMForCausalLM
    from ..tokenizer import load_tokenizer
    from ..training.task_adapters import read_labeled_jsonl, save_named_adapter, train_classifier

    _setup_logging(False)
    try:
        texts, labels = read_labeled_jsonl(data)
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"{model_dir} is not a saved model directory (no config.json)")
        model = OpenAutoGLMForCausalLM.from_pretrained(model_dir)
        cfg = _train_config(steps, batch_size, max_len, lr, seed, weight_decay=0.0)
        _, classes, stats = train_classifier(model, load_tokenizer(model_dir), name, texts, labels, cfg,
                                             pooling=pooling, max_len=max_len, progress=True)
        path = save_named_adapter(model, name, model_dir, classes)
    except _ERRORS as e:
        fail(e)
    console.print(f"adapter {name!r} ({len(classes)} labels) saved to {path}; train accuracy "
                  f"{stats['train_accuracy'] * 100:.1f}%")


@adapters_app.command("list")
def adapters_list(model_dir: Path = typer.Argument(..., help="Model directory.")) -> None:
    """List the adapters saved with a model (MODEL_DIR/adapters/*)."""
    from ..training.task_adapters import list_saved_adapters

    items = list_saved_adapters(model_dir)
    if not items:
        console.print(f"no adapters saved in {model_dir / 'adapters'}")
        return
    t = Table(title=f"adapters of {model_dir}")
    for col in ("name", "type", "labels", "kwargs"):
        t.add_column(col)
    for a in items:
        t.add_row(a["name"], str(a["type"]), ", ".join(a["labels"] or []), json.dumps(a["kwargs"]))
    console.print(t)
