"""Corpus -> tokenizer -> token cache, the data half of every language-model recipe.

`prepare_corpus(path, cache_dir, vocab_size)` reads the corpus (None: the built-in stdlib
docstrings), trains a byte-level BPE tokenizer on it or uses a given one, and tokenizes it
once into the memory-mapped cache (`build_token_cache`), split into train and validation.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..tokenizer import load_tokenizer, save_tokenizer, train_tokenizer
from .corpus import read_corpus
from .text import TokenCache, build_token_cache

__all__ = ["PreparedData", "prepare_corpus", "corpus_source", "BUILTIN_CORPUS"]

log = logging.getLogger(__name__)

BUILTIN_CORPUS = "builtin:stdlib-docstrings"  # what run.json records as the data of the built-in corpus


@dataclass
class PreparedData:
    tokenizer: Any  # PreTrainedTokenizerFast
    tokens: TokenCache
    source: str  # the corpus path, resolved, or BUILTIN_CORPUS


def corpus_source(path: str | Path | None) -> str:
    return str(Path(path).resolve()) if path is not None else BUILTIN_CORPUS


def prepare_corpus(path: str | Path | None, cache_dir: str | Path, vocab_size: int | None = None,
                   tokenizer: Any = None, val_fraction: float = 0.1,
                   extra_train: Sequence[str | Path] = ()) -> PreparedData:
    """Read the corpus at `path` (None = built-in), tokenize it with `tokenizer` (or a new
    byte-level BPE of `vocab_size` trained on it) into the token cache under `cache_dir`.
    `extra_train`: more text files or folders appended to the training split only (the
    validation split stays the tail of `path`'s corpus; a new tokenizer also learns them)."""
    texts = read_corpus(path)
    extra = [doc for p in extra_train for doc in read_corpus(p)]
    source = corpus_source(path) + "".join(f" + {corpus_source(p)} (train only)" for p in extra_train)
    if tokenizer is None:
        if vocab_size is None:
            raise ValueError("prepare_corpus needs a tokenizer or a vocab_size to train one")
        log.info("training a byte-level BPE tokenizer (vocab %d) on %s", vocab_size, source)
        raw = train_tokenizer(texts + extra, vocab_size=vocab_size)
        with tempfile.TemporaryDirectory(prefix="autoglm-tok-") as tmp:
            save_tokenizer(raw, tmp)
            tokenizer = load_tokenizer(tmp)
    tokens = build_token_cache(texts, tokenizer, cache_dir, val_fraction=val_fraction, source=corpus_source(path))
    if extra:
        more = build_token_cache(extra, tokenizer, cache_dir, val_fraction=0.0, source="extra training text")
        eos = np.array([tokens.eos_id], dtype=tokens.train.dtype)
        tokens = dataclasses.replace(tokens, train=np.concatenate([np.asarray(tokens.train), eos,
                                                                   np.asarray(more.train)]))
        log.info("training split: %d corpus + %d extra tokens", tokens.meta["n_train"], len(more.train))
    return PreparedData(tokenizer, tokens, source)
