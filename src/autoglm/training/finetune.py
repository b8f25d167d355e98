"""Recipes on saved model directories: two-teacher distillation and (LoRA) fine-tuning.

Both run the existing `Trainer` with their own objective / batches and write a run
directory like `pretrain` does:

- `distill`: teachers are loaded with `AutoModelForCausalLM` (any causal LM sharing the
  student's tokenizer), checked (same tokenizer file, same vocabulary) before anything
  trains, and the student (a preset) trains with `DistillationObjective`; the final
  student is saved as a full model with the teachers' tokenizer.
- `finetune`: a base model directory fine-tuned on a text file (random windows) or on a
  JSONL of {"prompt", "completion"} (loss on completions only), fully or with LoRA. With
  LoRA only the adapter is saved (see `autoglm.training.lora`); its resumable checkpoints
  hold the adapter with the optimizer, scheduler and RNG states.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import build_token_cache, read_corpus, sample_batch
from ..hf import OpenAutoGLMForCausalLM
from ..tokenizer import load_tokenizer
from .config import TrainConfig
from .distill import DistillationObjective, DistillConfig, check_teachers, distill_batches
from .evaluate import evaluate
from .loop import Trainer, TrainResult
from .lora import apply_lora, lora_config, save_lora, trainable_parameters
from .pretrain import build_model, eval_batches_for, save_final_model
from .sft_data import SFTDataset, encode_sft, read_sft_jsonl
from .strategy import SingleDevice
from .teacher_cache import TeacherLogitCache

__all__ = ["load_teachers", "distill", "finetune", "is_jsonl"]

log = logging.getLogger(__name__)


def _tokenizer_spec(model_dir: Path) -> dict | None:
    f = model_dir / "tokenizer.json"
    if not f.is_file():
        return None
    spec = json.loads(f.read_text())
    return {"model": spec.get("model"), "added_tokens": [t.get("content") for t in spec.get("added_tokens", [])]}


def load_teachers(teacher_dirs: list[str | Path]) -> tuple[list[nn.Module], Any]:
    """Load each teacher (AutoModelForCausalLM, eval mode) and the shared tokenizer.

    Raises ValueError when a directory is not a model, or when the teachers' tokenizers
    (vocabulary and merges) or vocabulary sizes differ."""
    from transformers import AutoModelForCausalLM

    if not teacher_dirs:
        raise ValueError("distillation needs at least one teacher directory (--teacher DIR, up to two or more)")
    dirs = [Path(d) for d in teacher_dirs]
    for d in dirs:
        if not (d / "config.json").is_file():
            raise FileNotFoundError(f"teacher {d} is not a saved model directory (no config.json); train one with "
                                    f"`autoglm train --out {d}`")
    specs = [_tokenizer_spec(d) for d in dirs]
    if specs[0] is None:
        raise FileNotFoundError(f"teacher {dirs[0]} has no tokenizer.json; the student needs the teachers' tokenizer")
    for d, s in zip(dirs[1:], specs[1:]):
        if s is not None and s != specs[0]:
            raise ValueError(f"teacher {d} uses a different tokenizer from {dirs[0]}; all teachers must share one "
                             f"tokenizer (train them with the same tokenizer, e.g. pretrain the second with the "
                             f"first's tokenizer)")
    teachers = [AutoModelForCausalLM.from_pretrained(d).eval() for d in dirs]
    vocabs = {str(d): int(t.config.vocab_size) for d, t in zip(dirs, teachers)}
    if len(set(vocabs.values())) > 1:
        raise ValueError(f"teachers have different vocabulary sizes {vocabs}; they must share one tokenizer")
    return teachers, load_tokenizer(dirs[0])


def distill(student_preset: str, teacher_dirs: list[str | Path], out_dir: str | Path, cfg: TrainConfig,
            dcfg: DistillConfig | None = None, data: str | Path | None = None, cache_dir: str | Path | None = None,
            logit_cache_dir: str | Path | None = None, epoch_batches: int | None = None,
            model_overrides: dict | None = None, progress: bool = True, device: str | None = None,
            console=None) -> tuple[OpenAutoGLMForCausalLM, TrainResult]:
    """Train a `student_preset` model from the teachers in `teacher_dirs` on `data` (None:
    built-in corpus) and save it in `out_dir`. `logit_cache_dir` is required when
    `dcfg.cache_top_k > 0`; `epoch_batches` makes the data repeat so the cache is reused."""
    dcfg = dcfg or DistillConfig()
    out_dir = Path(out_dir)
    teachers, tok = load_teachers(teacher_dirs)
    torch.manual_seed(cfg.seed)
    student = build_model(student_preset, len(tok), **(model_overrides or {}))
    check_teachers(student, teachers, [str(d) for d in teacher_dirs])
    if cfg.seq_len > student.config.max_position_embeddings:
        raise ValueError(f"seq_len ({cfg.seq_len}) exceeds the student's max_position_embeddings "
                         f"({student.config.max_position_embeddings}); lower --seq-len")
    texts = read_corpus(data)
    source = str(Path(data).resolve()) if data is not None else "builtin:stdlib-docstrings"
    tokens = build_token_cache(texts, tok, Path(cache_dir) if cache_dir else out_dir / "cache", source=source)
    cache = None
    if dcfg.cache_top_k:
        if logit_cache_dir is None:
            raise ValueError("cache_top_k > 0 needs a directory for the teacher-logit cache (--logit-cache DIR)")
        key = hashlib.sha256(json.dumps([[str(Path(d).resolve()) for d in teacher_dirs], str(tokens.path),
                                         cfg.batch_size, cfg.seq_len, cfg.seed, epoch_batches]).encode())
        cache = TeacherLogitCache(logit_cache_dir, dcfg.cache_top_k, len(teachers), key=key.hexdigest()[:16])
    train = tokens.train
    batch = distill_batches(lambda i: sample_batch(train, cfg.batch_size, cfg.seq_len, i, cfg.seed),
                            cfg.grad_accum, epoch_batches)
    trainer = Trainer(student, cfg, train_batch=batch, eval_batches=eval_batches_for(tokens.val, cfg),
                      out_dir=out_dir, objective=DistillationObjective(teachers, dcfg, cache), progress=progress,
                      strategy=SingleDevice(device), console=console)
    result = trainer.fit()
    info = {"recipe": "distill", "student_preset": student_preset, "teachers": [str(d) for d in teacher_dirs],
            "data": source, "train_config": asdict(cfg), "distill_config": repr(trainer.objective),
            "result": {"steps": result.steps, "final_eval": result.final_eval}}
    if cache is not None:
        info["logit_cache"] = {"dir": str(cache.dir), "hits": cache.hits, "misses": cache.misses}
    save_final_model(student, tok, out_dir, info)
    return student, result


def is_jsonl(path: str | Path) -> bool:
    return Path(path).suffix.lower() in (".jsonl", ".json")


def finetune(base_dir: str | Path, data: str | Path, out_dir: str | Path, cfg: TrainConfig, lora: bool = True,
             targets: list[str] | None = None, r: int = 8, alpha: int = 16, dropout: float = 0.05,
             val_fraction: float = 0.1, cache_dir: str | Path | None = None, progress: bool = True,
             device: str | None = None, console=None, resume: bool = False,
             eval_data: Any = None, callbacks: Sequence[Any] = ()) -> tuple[nn.Module, TrainResult, dict[str, Any]]:
    """Fine-tune the model in `base_dir` on `data` (.jsonl of prompt/completion records or
    text). Every input is checked before training. Returns (model, result, info); info
    holds trainable/total parameter counts and the held-out eval before and after.

    Both modes write resumable checkpoints to `out_dir/checkpoints/` (every
    `cfg.save_every` steps and at the end; with LoRA each holds only the adapter, plus the
    optimizer, scheduler, RNG and step) and `resume=True` continues from the latest one,
    reproducing the uninterrupted run. `eval_data`: a callable returning the held-out
    batches to use instead of the file's own validation tail (e.g. a validation split
    for choosing the learning rate). `callbacks`: passed to the `Trainer` (objects with
    `on_step(trainer, row)` / `on_eval(trainer, row)` methods)."""
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    if not (base_dir / "config.json").is_file():
        raise FileNotFoundError(f"{base_dir} is not a saved model directory (no config.json)")
    tok = load_tokenizer(base_dir)
    if is_jsonl(data):
        records = read_sft_jsonl(data)
        n_val = int(len(records) * val_fraction)
        enc = encode_sft(records, tok, cfg.seq_len)
        train_ds = SFTDataset(enc[:len(enc) - n_val], tok.pad_token_id)
        val_ds = SFTDataset(enc[len(enc) - n_val:], tok.pad_token_id) if n_val else None
        train_batch = train_ds.batch_fn(cfg.batch_size, cfg.seed)
        eval_batches = val_ds.eval_batches(cfg.batch_size) if val_ds else None
    else:
        tokens = build_token_cache(read_corpus(data), tok, Path(cache_dir) if cache_dir else out_dir / "cache",
                                   val_fraction=val_fraction, source=str(Path(data).resolve()))
        train = tokens.train
        train_batch = lambda i: sample_batch(train, cfg.batch_size, cfg.seq_len, i, cfg.seed)  # noqa: E731
        eval_batches = eval_batches_for(tokens.val, cfg)
    if eval_data is not None:
        eval_batches = eval_data
    model = OpenAutoGLMForCausalLM.from_pretrained(base_dir)
    if lora:
        torch.manual_seed(cfg.seed)  # LoRA A is initialised randomly: same seed, same adapter
        model = apply_lora(model, lora_config(targets or ["q_proj", "v_proj"], r, alpha, dropout))
    n_train, n_total = trainable_parameters(model)
    before = evaluate(model, eval_batches()) if eval_batches else None
    trainer = Trainer(model, cfg, train_batch=train_batch, eval_batches=eval_batches, out_dir=out_dir,
                      progress=progress, strategy=SingleDevice(device), console=console, callbacks=callbacks)
    result = trainer.fit(resume=resume)
    info = {"recipe": "finetune-lora" if lora else "finetune-full", "base_model": str(base_dir.resolve()),
            "data": str(Path(data).resolve()), "train_config": asdict(cfg), "trainable_params": n_train,
            "total_params": n_total, "eval_before": before, "eval_after": result.final_eval, "steps": result.steps}
    if lora:
        save_lora(model, tok, out_dir, base_dir, info)
    else:
        save_final_model(model, tok, out_dir, info)
    return model, result, info
