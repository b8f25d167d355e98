"""The pre-training recipe: corpus -> tokenizer -> token cache -> model -> Trainer -> run directory.

`autoglm train` is this recipe; `configs/pretrain-*.yaml` are its configs. The run
directory it writes is described in `autoglm.rundir`.

Example:
    >>> from autoglm.settings import load_config
    >>> cfg = load_config(PretrainConfig, overrides={"model.preset": "tiny", "train.max_steps": 20})
    >>> cfg.model.preset, cfg.train.max_steps, cfg.train.warmup_steps, cfg.data.path is None
    ('tiny', 20, 2, True)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..settings import section, setting
from ..training.config import TrainConfig
from .common import ModelSpec, TextData, run_info

__all__ = ["PretrainConfig", "PretrainOutput", "pretrain"]

log = logging.getLogger(__name__)


@dataclass
class PretrainConfig:
    out: Path = setting(Path("runs/default"), "run directory: model, tokenizer, metrics, checkpoints")
    model: ModelSpec = section(ModelSpec)
    data: TextData = section(TextData)
    train: TrainConfig = section(TrainConfig)
    resume: bool = setting(False, "continue from OUT/checkpoints/latest (same config; a longer --steps is fine)")
    device: str | None = setting(None, "cpu, cuda or cuda:N; none = cuda when available")
    sample_prompt: str = setting("The ", "prompt of the sample generated at the end; '' = no sample")


@dataclass
class PretrainOutput:
    model: Any  # OpenAutoGLMForCausalLM, trained
    tokenizer: Any
    result: Any  # training.TrainResult
    run: Any  # RunDir
    source: str  # the corpus it trained on


def pretrain(cfg: PretrainConfig, progress: bool = True, console: Any = None, callbacks: Sequence[Any] = (),
             tokenizer: Any = None, prepared: Any = None) -> PretrainOutput:
    """Train `cfg.model` on `cfg.data` and save the run directory `cfg.out`. `tokenizer`: use
    this one instead of training a new one; `prepared`: the corpus already tokenized
    (`data.prepare_corpus`), so several runs on one corpus read and tokenize it once."""
    import torch

    from ..data import iter_eval_batches, prepare_corpus, sample_batch
    from ..rundir import RunDir
    from ..settings import to_yaml
    from ..training import SingleDevice, Trainer
    from .common import build_model

    out = Path(cfg.out)
    if cfg.resume and not (out / "checkpoints").is_dir():
        raise FileNotFoundError(f"resume requested but {out / 'checkpoints'} does not exist; drop --resume to "
                                f"start a new run, or point --out at an earlier run")
    model_cfg = cfg.model.config()
    if cfg.train.seq_len > model_cfg.max_position_embeddings:
        raise ValueError(f"train.seq_len ({cfg.train.seq_len}) is longer than the {cfg.model.preset} model's "
                         f"max_position_embeddings ({model_cfg.max_position_embeddings}); lower --seq-len")
    if cfg.resume and (out / "tokenizer.json").is_file():
        tokenizer = RunDir(out).load_tokenizer()
    data = prepared or prepare_corpus(cfg.data.path, cfg.data.cache_dir, cfg.model.vocab_size or model_cfg.vocab_size,
                                      tokenizer, cfg.data.val_fraction, cfg.data.extra_train)
    t = cfg.train
    torch.manual_seed(t.seed)
    model = build_model(cfg.model, len(data.tokenizer))
    train, val = data.tokens.train, data.tokens.val
    trainer = Trainer(model, t, train_batch=lambda i: sample_batch(train, t.batch_size, t.seq_len, i, t.seed),
                      eval_batches=lambda: iter_eval_batches(val, t.batch_size, t.seq_len, max_batches=t.eval_batches),
                      out_dir=out, progress=progress, strategy=SingleDevice(cfg.device), console=console,
                      callbacks=callbacks)
    result = trainer.fit(resume=cfg.resume)
    info = run_info("pretrain", cfg, result, data=data.source, token_cache=str(data.tokens.path))
    run = RunDir.save(out, model, data.tokenizer, info, config_yaml=to_yaml(cfg))
    return PretrainOutput(model, data.tokenizer, result, run, data.source)
