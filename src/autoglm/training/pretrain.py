"""The pre-training recipe: corpus -> tokenizer -> token cache -> model -> Trainer -> saved model.

Used by `autoglm train` and the benchmarks. A run directory holds everything needed to
load, evaluate, resume or serve the model:

    out/
      config.json, model.safetensors          final weights (HF layout; AutoModelForCausalLM)
      tokenizer.json, tokenizer_config.json   the byte-level BPE tokenizer
      run.json                                data source, preset, train config
      metrics.jsonl                           one JSON row per log/eval step
      checkpoints/step-*/, checkpoints/latest resumable checkpoints (atomic)
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import OpenAutoGLMConfig
from ..data import TokenCache, build_token_cache, iter_eval_batches, read_corpus, sample_batch
from ..hf import OpenAutoGLMForCausalLM
from ..tokenizer import load_tokenizer, save_tokenizer, train_tokenizer
from .config import TrainConfig
from .evaluate import evaluate
from .loop import Trainer, TrainResult
from .strategy import SingleDevice

__all__ = ["PreparedData", "prepare_data", "build_model", "pretrain", "save_final_model", "eval_batches_for"]

log = logging.getLogger(__name__)


@dataclass
class PreparedData:
    tokenizer: Any  # PreTrainedTokenizerFast
    tokens: TokenCache
    source: str


def prepare_data(data: str | Path | None, cache_dir: str | Path, vocab_size: int,
                 tokenizer_dir: str | Path | None = None, val_fraction: float = 0.1) -> PreparedData:
    """Read the corpus (None = built-in stdlib docstrings), train or load the tokenizer,
    tokenize once into the memory-mapped cache."""
    texts = read_corpus(data)
    source = str(Path(data).resolve()) if data is not None else "builtin:stdlib-docstrings"
    if tokenizer_dir is not None and (Path(tokenizer_dir) / "tokenizer.json").is_file():
        tok = load_tokenizer(tokenizer_dir)
        log.info("loaded tokenizer from %s (vocab %d)", tokenizer_dir, len(tok))
    else:
        log.info("training a byte-level BPE tokenizer (vocab %d) on %s", vocab_size, source)
        raw = train_tokenizer(texts, vocab_size=vocab_size)
        tmp = Path(tempfile.mkdtemp(prefix="autoglm-tok-"))
        save_tokenizer(raw, tmp)
        tok = load_tokenizer(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
    tokens = build_token_cache(texts, tok, cache_dir, val_fraction=val_fraction, source=source)
    return PreparedData(tok, tokens, source)


def build_model(preset: str, vocab_size: int, **overrides: Any) -> OpenAutoGLMForCausalLM:
    cfg = OpenAutoGLMConfig.from_name(preset, vocab_size=vocab_size, **overrides)
    return OpenAutoGLMForCausalLM(cfg)


def eval_batches_for(tokens, cfg: TrainConfig):
    """A callable giving the fixed validation batches (the same ones at every evaluation)."""
    return lambda: iter_eval_batches(tokens, cfg.batch_size, cfg.seq_len, max_batches=cfg.eval_batches)


def save_final_model(model: OpenAutoGLMForCausalLM, tokenizer, out_dir: Path, run_info: dict) -> None:
    """Write weights, tokenizer and run.json into out_dir; each file lands by atomic rename,
    so an interrupted save leaves the previous files intact."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".final-", dir=out_dir))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "run.json").write_text(json.dumps(run_info, indent=2, default=str))
        for f in tmp.iterdir():
            if f.is_file():
                os.replace(f, out_dir / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def pretrain(preset: str, out_dir: str | Path, cfg: TrainConfig, data: str | Path | None = None,
             cache_dir: str | Path | None = None, vocab_size: int | None = None, resume: bool = False,
             model_overrides: dict | None = None, progress: bool = True,
             device: str | None = None, console=None) -> tuple[OpenAutoGLMForCausalLM, PreparedData, TrainResult]:
    """Train `preset` on `data` (None = built-in corpus) and save the final model in out_dir."""
    out_dir = Path(out_dir)
    if resume and not (out_dir / "checkpoints").is_dir():
        raise FileNotFoundError(f"--resume given but {out_dir / 'checkpoints'} does not exist; "
                                f"drop --resume to start a new run, or point --out at an earlier run")
    base_cfg = OpenAutoGLMConfig.from_name(preset, **(model_overrides or {}))
    vocab = vocab_size or base_cfg.vocab_size
    cache_dir = Path(cache_dir) if cache_dir is not None else out_dir / "cache"
    prepared = prepare_data(data, cache_dir, vocab, tokenizer_dir=out_dir if resume else None)
    if cfg.seq_len > base_cfg.max_position_embeddings:
        raise ValueError(f"seq_len ({cfg.seq_len}) is longer than the preset's max_position_embeddings "
                         f"({base_cfg.max_position_embeddings}); lower --seq-len")
    torch.manual_seed(cfg.seed)
    model = build_model(preset, len(prepared.tokenizer), **(model_overrides or {}))
    train = prepared.tokens.train
    trainer = Trainer(
        model, cfg,
        train_batch=lambda i: sample_batch(train, cfg.batch_size, cfg.seq_len, i, cfg.seed),
        eval_batches=eval_batches_for(prepared.tokens.val, cfg),
        out_dir=out_dir, progress=progress, strategy=SingleDevice(device), console=console,
    )
    result = trainer.fit(resume=resume)
    run_info = {"preset": preset, "data": prepared.source, "token_cache": str(prepared.tokens.path),
                "train_config": asdict(cfg), "result": {"steps": result.steps, "final_eval": result.final_eval}}
    save_final_model(model, prepared.tokenizer, out_dir, run_info)
    return model, prepared, result


def evaluate_run(model_dir: str | Path, data: str | Path | None, cache_dir: str | Path,
                 batch_size: int, seq_len: int, max_batches: int | None = None) -> dict:
    """Load a saved model + tokenizer and evaluate it on the validation split of `data`."""
    model = OpenAutoGLMForCausalLM.from_pretrained(model_dir)
    tok = load_tokenizer(model_dir)
    texts = read_corpus(data)
    tokens = build_token_cache(texts, tok, cache_dir)
    return evaluate(model, iter_eval_batches(tokens.val, batch_size, seq_len, max_batches=max_batches))
