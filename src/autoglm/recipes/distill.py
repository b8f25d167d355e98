"""The distillation recipe: a student preset learns from one or two teacher run directories.

Teachers are loaded with `AutoModelForCausalLM` (any causal LM sharing the student's
tokenizer) and checked (same tokenizer file, same vocabulary) before anything trains; the
student trains with `DistillationObjective` and is saved as a full model with the
teachers' tokenizer. `autoglm distill` is this recipe.

Example:
    >>> from autoglm.settings import load_config
    >>> cfg = load_config(DistillRecipeConfig, overrides={"teachers": "runs/a,runs/b", "out": "runs/s",
    ...                                                   "distill.rounds": 2, "distill.alpha_end": 0.5})
    >>> [str(t) for t in cfg.teachers], cfg.student.preset, cfg.distill.schedule(100)(99)
    (['runs/a', 'runs/b'], 'tiny', 0.5)
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..settings import section, setting
from ..training.config import TrainConfig
from ..training.distill import DistillConfig
from .common import ModelSpec, TextData, run_info

__all__ = ["DistillRecipeConfig", "DistillOutput", "distill", "load_teachers"]

log = logging.getLogger(__name__)


@dataclass
class DistillRecipeConfig:
    teachers: tuple[Path, ...] = setting((), "teacher run directories (one or two, sharing one tokenizer)",
                                         flag="teacher", required=True)
    out: Path | None = setting(None, "run directory for the distilled student", required=True)
    student: ModelSpec = section(ModelSpec, preset="tiny")
    data: TextData = section(TextData)
    train: TrainConfig = section(TrainConfig, max_steps=500, seq_len=128, eval_every=125)
    distill: DistillConfig = section(DistillConfig)
    logit_cache: Path | None = setting(None, "teacher-logit cache directory (with cache_top_k > 0); "
                                             "none = OUT/logit-cache")
    epoch_batches: int | None = setting(None, "repeat the data every N micro-batches (an epoch), so cached "
                                              "teacher logits are reused; none = fresh batches throughout")
    device: str | None = setting(None, "cpu, cuda or cuda:N; none = cuda when available")

    def __post_init__(self) -> None:
        if self.epoch_batches is not None and self.epoch_batches < 1:
            raise ValueError(f"epoch_batches must be >= 1 or none, got {self.epoch_batches}")


@dataclass
class DistillOutput:
    model: Any
    result: Any  # training.TrainResult
    run: Any  # RunDir


def _tokenizer_spec(model_dir: Path) -> dict | None:
    f = model_dir / "tokenizer.json"
    if not f.is_file():
        return None
    spec = json.loads(f.read_text())
    return {"model": spec.get("model"), "added_tokens": [t.get("content") for t in spec.get("added_tokens", [])]}


def load_teachers(teacher_dirs) -> tuple[list, Any]:
    """Load each teacher (AutoModelForCausalLM, eval mode) and the shared tokenizer.

    Raises FileNotFoundError when a directory is not a model, ValueError when the teachers'
    tokenizers (vocabulary and merges) or vocabulary sizes differ."""
    from transformers import AutoModelForCausalLM

    from ..rundir import RunDir

    runs = [RunDir.open(d, role="teacher") for d in teacher_dirs]
    specs = [_tokenizer_spec(r.path) for r in runs]
    if specs[0] is None:
        raise FileNotFoundError(f"teacher {runs[0].path} has no tokenizer.json; the student needs the teachers' "
                                f"tokenizer")
    for r, s in zip(runs[1:], specs[1:]):
        if s is not None and s != specs[0]:
            raise ValueError(f"teacher {r.path} uses a different tokenizer from {runs[0].path}; all teachers must "
                             f"share one tokenizer (train them with the same tokenizer, e.g. pretrain the second "
                             f"with the first's tokenizer)")
    teachers = [AutoModelForCausalLM.from_pretrained(r.path).eval() for r in runs]
    vocabs = {str(r.path): int(t.config.vocab_size) for r, t in zip(runs, teachers)}
    if len(set(vocabs.values())) > 1:
        raise ValueError(f"teachers have different vocabulary sizes {vocabs}; they must share one tokenizer")
    return teachers, runs[0].load_tokenizer()


def distill(cfg: DistillRecipeConfig, progress: bool = True, console: Any = None) -> DistillOutput:
    """Train `cfg.student` from `cfg.teachers` on `cfg.data` and save it in `cfg.out`."""
    import torch

    from ..data import BUILTIN_CORPUS, iter_eval_batches, prepare_corpus, sample_batch
    from ..rundir import RunDir
    from ..settings import to_yaml
    from ..training import SingleDevice, Trainer
    from ..training.distill import DistillationObjective, check_teachers, distill_batches
    from ..training.teacher_cache import TeacherLogitCache
    from .common import build_model

    out, t = Path(cfg.out), cfg.train
    teachers, tok = load_teachers(cfg.teachers)
    torch.manual_seed(t.seed)
    student = build_model(cfg.student, len(tok))
    check_teachers(student, teachers, [str(d) for d in cfg.teachers])
    if t.seq_len > student.config.max_position_embeddings:
        raise ValueError(f"train.seq_len ({t.seq_len}) exceeds the student's max_position_embeddings "
                         f"({student.config.max_position_embeddings}); lower --seq-len")
    if cfg.data.path is None:  # the built-in corpus: say so when the teachers learned other text
        theirs = sorted({str(d) for t in cfg.teachers if (d := RunDir.open(t).info.get("data"))} - {BUILTIN_CORPUS})
        if theirs:
            log.warning("no --data: the student distils on the built-in corpus, but the teachers were trained on "
                        "%s; pass --data to distil on their text", ", ".join(theirs))
    data = prepare_corpus(cfg.data.path, cfg.data.cache_dir, tokenizer=tok, val_fraction=cfg.data.val_fraction,
                          extra_train=cfg.data.extra_train)
    cache = None
    if cfg.distill.cache_top_k:
        key = hashlib.sha256(json.dumps([[str(Path(d).resolve()) for d in cfg.teachers], str(data.tokens.path),
                                         t.batch_size, t.seq_len, t.seed, cfg.epoch_batches]).encode())
        cache = TeacherLogitCache(cfg.logit_cache or out / "logit-cache", cfg.distill.cache_top_k, len(teachers),
                                  key=key.hexdigest()[:16])
    train, val = data.tokens.train, data.tokens.val
    batch = distill_batches(lambda i: sample_batch(train, t.batch_size, t.seq_len, i, t.seed), t.grad_accum,
                            cfg.epoch_batches)
    objective = DistillationObjective(teachers, cfg.distill, cache, total_steps=t.max_steps)
    trainer = Trainer(student, t, train_batch=batch,
                      eval_batches=lambda: iter_eval_batches(val, t.batch_size, t.seq_len, max_batches=t.eval_batches),
                      out_dir=out, objective=objective, progress=progress, strategy=SingleDevice(cfg.device),
                      console=console)
    result = trainer.fit()
    extra: dict[str, Any] = {"data": data.source}
    if cache is not None:
        extra["logit_cache"] = {"dir": str(cache.dir), "hits": cache.hits, "misses": cache.misses}
    run = RunDir.save(out, student, tok, run_info("distill", cfg, result, **extra), config_yaml=to_yaml(cfg))
    return DistillOutput(student, result, run)
