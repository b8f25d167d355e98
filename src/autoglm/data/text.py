"""Tokenize a corpus once into a flat on-disk token stream, and batch from it.

Layout of a cache entry, ``<cache_dir>/<key>/``:

- ``tokens.bin``: every document's token ids, with ``<|endoftext|>`` between documents,
  as one flat ``uint16`` array (``uint32`` when the vocabulary exceeds 65536 entries).
- ``meta.json``: dtype, n_tokens, n_train, vocab_size, eos_id, source description.

``key`` hashes the documents, the tokenizer and the split, so the same inputs reuse the
cache and anything else builds a new entry. Training batches are a pure function of
``(seed, step)``, which is what lets a resumed run reproduce an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import track
from tokenizers import Tokenizer

from ..atomic import atomic_dir
from ..tokenizer import EOS_TOKEN

__all__ = ["TokenCache", "build_token_cache", "sample_batch", "iter_eval_batches"]

logger = logging.getLogger(__name__)

_FORMAT_VERSION = 1
_KEY_CHARS = 16  # hex digits of the sha256 used as the directory name
_ENCODE_CHUNK = 2048  # documents per encode_batch call; bounds peak memory
# tokenizer.json fields that cannot change encode(..., add_special_tokens=False);
# transformers rewrites them when it wraps a tokenizer, so they stay out of the key.
_KEY_IGNORED_FIELDS = ("truncation", "padding", "post_processor")


def _backend(tokenizer: Any) -> Tokenizer:
    """The ``tokenizers.Tokenizer`` behind a raw or ``transformers`` tokenizer."""
    tok = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if not isinstance(tok, Tokenizer):
        raise TypeError(
            f"expected a tokenizers.Tokenizer or a transformers fast tokenizer, got "
            f"{type(tokenizer).__name__}; load one with autoglm.tokenizer.load_tokenizer"
        )
    return tok


def _cache_key(texts: Sequence[str], tok: Tokenizer, val_fraction: float) -> str:
    spec = json.loads(tok.to_str())
    for field in _KEY_IGNORED_FIELDS:
        spec.pop(field, None)
    h = hashlib.sha256()
    h.update(f"autoglm-token-cache-v{_FORMAT_VERSION};val={val_fraction!r};".encode())
    h.update(json.dumps(spec, sort_keys=True).encode())
    for text in texts:
        data = text.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "little"))  # length prefix: ["ab","c"] != ["a","bc"]
        h.update(data)
    return h.hexdigest()[:_KEY_CHARS]


@dataclass(frozen=True)
class TokenCache:
    """A tokenized corpus on disk, split into train and validation token streams.

    The split is deterministic and contiguous: the first ``n_train`` tokens are the
    training split and the last ``floor(n_tokens * val_fraction)`` tokens are the
    validation split. ``train`` and ``val`` are read-only ``np.memmap`` views.
    """

    path: Path
    meta: dict[str, Any]
    train: np.memmap
    val: np.memmap

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def eos_id(self) -> int:
        return int(self.meta["eos_id"])

    @property
    def n_tokens(self) -> int:
        return int(self.meta["n_tokens"])

    @classmethod
    def open(cls, path: str | Path) -> TokenCache:
        """Open a cache entry directory written by :func:`build_token_cache`."""
        path = Path(path)
        try:
            meta = json.loads((path / "meta.json").read_text())
            if meta.get("format_version") != _FORMAT_VERSION:
                raise ValueError(f"format_version {meta.get('format_version')}")
            n_tokens, n_train = int(meta["n_tokens"]), int(meta["n_train"])
            tokens = np.memmap(
                path / "tokens.bin", dtype=meta["dtype"], mode="r", shape=(n_tokens,)
            )
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f"token cache {path} is unreadable or from another version ({e}); delete "
                f"that directory and it will be rebuilt"
            ) from e
        return cls(path=path, meta=meta, train=tokens[:n_train], val=tokens[n_train:])


def _encode(
    texts: Sequence[str], tok: Tokenizer, eos_id: int, dtype: np.dtype
) -> list[np.ndarray]:
    """Encode documents in chunks, as arrays with ``eos_id`` between documents."""
    eos = np.array([eos_id], dtype=dtype)
    parts: list[np.ndarray] = []
    starts = range(0, len(texts), _ENCODE_CHUNK)
    console = Console(stderr=True)  # keep stdout clean for piped output
    show = len(starts) >= 4 and console.is_terminal
    for start in track(starts, description="tokenizing", transient=True, console=console,
                       disable=not show):
        chunk = list(texts[start:start + _ENCODE_CHUNK])
        for i, enc in enumerate(tok.encode_batch_fast(chunk, add_special_tokens=False)):
            if start + i > 0:
                parts.append(eos)
            parts.append(np.asarray(enc.ids, dtype=dtype))
    return parts


def build_token_cache(
    texts: Sequence[str],
    tokenizer: Any,
    cache_dir: str | Path,
    val_fraction: float = 0.1,
    source: str | None = None,
) -> TokenCache:
    """Tokenize ``texts`` once into ``cache_dir/<key>/`` and return the opened cache.

    Args:
        texts: the documents, e.g. from :func:`autoglm.data.read_corpus`.
        tokenizer: a ``tokenizers.Tokenizer`` or a ``transformers`` fast tokenizer with
            an ``<|endoftext|>`` token.
        cache_dir: parent directory for cache entries; created if missing.
        val_fraction: the last ``floor(n_tokens * val_fraction)`` tokens of the stream
            form the validation split, the rest the training split.
        source: a description of where ``texts`` came from, stored in ``meta.json``.

    If an entry with the same key (same texts, tokenizer and ``val_fraction``) exists it
    is reused without re-tokenizing. New entries are written to a temporary directory
    next to the final one and renamed into place, so readers never see a partial cache.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction ({val_fraction}) must be in [0, 1); e.g. 0.1")
    if len(texts) == 0:
        raise ValueError("texts is empty; pass at least one document (see read_corpus)")
    tok = _backend(tokenizer)
    eos_id = tok.token_to_id(EOS_TOKEN)
    if eos_id is None:
        raise ValueError(
            "tokenizer has no <|endoftext|> token to separate documents; train one with "
            "autoglm.tokenizer.train_tokenizer"
        )
    cache_dir = Path(cache_dir)
    final = cache_dir / _cache_key(texts, tok, val_fraction)
    if (final / "meta.json").is_file():
        logger.info("reusing token cache %s", final)
        return TokenCache.open(final)

    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    dtype = np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)
    parts = _encode(texts, tok, eos_id, dtype)
    n_tokens = int(sum(p.size for p in parts))
    if n_tokens == 0:
        raise ValueError("texts produced no tokens (all documents are empty); pass some text")
    n_train = n_tokens - int(n_tokens * val_fraction)
    meta = {
        "format_version": _FORMAT_VERSION,
        "dtype": dtype.name,
        "n_tokens": n_tokens,
        "n_train": n_train,
        "vocab_size": vocab_size,
        "eos_id": eos_id,
        "val_fraction": val_fraction,
        "n_documents": len(texts),
        "source": source if source is not None else f"{len(texts)} documents",
    }

    with atomic_dir(final) as tmp:  # a concurrent build of the same key writes the same bytes
        out = np.memmap(tmp / "tokens.bin", dtype=dtype, mode="w+", shape=(n_tokens,))
        np.concatenate(parts, out=out)
        out.flush()
        del out  # close the mapping before the rename
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    logger.info(
        "wrote token cache %s: %d tokens (%d train, %d val) from %s",
        final, n_tokens, n_train, n_tokens - n_train, meta["source"],
    )
    return TokenCache.open(final)


def _check_length(tokens: np.ndarray, seq_len: int, batch_size: int) -> None:
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len ({seq_len}) and batch_size ({batch_size}) must be >= 1")
    if len(tokens) < seq_len + 1:
        raise ValueError(
            f"token split has {len(tokens)} tokens but one sequence needs seq_len + 1 = "
            f"{seq_len + 1}; use a smaller --seq-len or more data (or a larger "
            f"--val-fraction if this is the validation split)"
        )


def _windows(
    tokens: np.ndarray, starts: np.ndarray, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    idx = starts[:, None] + np.arange(seq_len + 1)  # (B, T+1)
    window = torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64))
    return window[:, :-1].contiguous(), window[:, 1:].contiguous()


def sample_batch(
    tokens: np.ndarray, batch_size: int, seq_len: int, step: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random training windows: ``(input_ids, labels)``, both int64 of shape (B, T).

    ``labels[b, t] == input_ids[b, t + 1]``: labels are the inputs shifted by one.
    Offsets come from ``np.random.default_rng([seed, step])``, so the batch at a step
    is a pure function of ``(seed, step)`` and a resumed run sees the same batches as
    an uninterrupted one.
    """
    _check_length(tokens, seq_len, batch_size)
    if seed < 0 or step < 0:
        raise ValueError(f"seed ({seed}) and step ({step}) must be >= 0")
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(tokens) - seq_len, size=batch_size)  # last start: n-T-1
    return _windows(tokens, starts, seq_len)


def iter_eval_batches(
    tokens: np.ndarray, batch_size: int, seq_len: int, max_batches: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic evaluation batches over ``tokens``.

    Window ``i`` covers ``tokens[i*T : i*T + T + 1]`` (inputs and their shifted
    labels), so every token is predicted exactly once; the windows are grouped into
    batches of ``batch_size`` in order, the last batch may be smaller. Stops after
    ``max_batches`` batches if given.
    """
    _check_length(tokens, seq_len, batch_size)
    n_windows = (len(tokens) - 1) // seq_len
    starts = np.arange(n_windows) * seq_len
    for i, b in enumerate(range(0, n_windows, batch_size)):
        if max_batches is not None and i >= max_batches:
            return
        yield _windows(tokens, starts[b:b + batch_size], seq_len)
