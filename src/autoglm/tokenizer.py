"""Byte-level BPE tokenizer built with HF ``tokenizers``.

The tokenizer works on UTF-8 bytes (GPT-2 style), so every string round-trips exactly:
``decode(encode(text)) == text``. Two special tokens are reserved at fixed ids:

- ``<|endoftext|>`` (id 0): end of text; separates documents in the token stream.
- ``<|pad|>`` (id 1): padding for batched inference; never trained on.

There is no BOS token. A trained tokenizer is saved as ``tokenizer.json`` plus the
``transformers`` side files, so ``AutoTokenizer.from_pretrained(directory)`` loads it
offline.

Example:
    >>> tok = train_tokenizer(["hello world"] * 10, vocab_size=300)
    >>> tok.decode(tok.encode("hello world").ids)
    'hello world'
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

__all__ = [
    "EOS_TOKEN",
    "PAD_TOKEN",
    "EOS_TOKEN_ID",
    "PAD_TOKEN_ID",
    "SPECIAL_TOKENS",
    "train_tokenizer",
    "save_tokenizer",
    "load_tokenizer",
]

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
# The trainer assigns special tokens the first ids, in this order.
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN)
EOS_TOKEN_ID = 0
PAD_TOKEN_ID = 1
# 256 byte symbols plus the special tokens; a vocabulary this small learns no merges.
_BASE_VOCAB = 256 + len(SPECIAL_TOKENS)


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2
) -> Tokenizer:
    """Train a byte-level BPE tokenizer on ``texts``.

    Args:
        texts: documents to learn merges from (any iterable of strings).
        vocab_size: target vocabulary size including the 256 byte symbols and the two
            special tokens; the result is smaller when the corpus supports fewer merges.
        min_frequency: a pair must occur at least this often to be merged.

    Returns:
        A ``tokenizers.Tokenizer`` with ``<|endoftext|>`` at id 0 and ``<|pad|>`` at id 1.
    """
    if vocab_size <= _BASE_VOCAB:
        raise ValueError(
            f"vocab_size ({vocab_size}) must be > {_BASE_VOCAB} (256 byte symbols + "
            f"{len(SPECIAL_TOKENS)} special tokens) to learn any merges; use e.g. 8192"
        )
    if min_frequency < 1:
        raise ValueError(f"min_frequency ({min_frequency}) must be >= 1")

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,  # library code does not write to the terminal directly
    )
    length = len(texts) if hasattr(texts, "__len__") else None
    tok.train_from_iterator(texts, trainer=trainer, length=length)

    # Guard the documented ids: the rest of the package relies on them.
    for token, expected in zip(SPECIAL_TOKENS, (EOS_TOKEN_ID, PAD_TOKEN_ID)):
        got = tok.token_to_id(token)
        if got != expected:  # pragma: no cover - would be a tokenizers behaviour change
            raise RuntimeError(f"{token} got id {got}, expected {expected}")
    got_size = tok.get_vocab_size()
    if got_size < vocab_size:
        logger.warning(
            "tokenizer vocabulary has %d entries, fewer than the requested %d: the "
            "corpus supports no more merges at min_frequency=%d",
            got_size, vocab_size, min_frequency,
        )
    else:
        logger.info("trained byte-level BPE tokenizer with %d entries", got_size)
    return tok


def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        bos_token=None,
        # Byte-level decoding is already exact; "cleanup" would rewrite " ." to ".".
        clean_up_tokenization_spaces=False,
        # A causal LM continues after the last token: a padded batch for `generate()` needs the
        # padding on the left (saved in tokenizer_config.json, so AutoTokenizer gets it too).
        padding_side="left",
    )


def save_tokenizer(tok: Tokenizer | PreTrainedTokenizerFast, directory: str | Path) -> Path:
    """Save ``tok`` so that ``AutoTokenizer.from_pretrained(directory)`` loads it.

    Writes ``tokenizer.json`` and ``tokenizer_config.json`` (eos ``<|endoftext|>``,
    pad ``<|pad|>``, no bos) into ``directory``, creating it if needed.

    Returns:
        The path of the written ``tokenizer.json``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    wrapped = tok if isinstance(tok, PreTrainedTokenizerFast) else _wrap(tok)
    wrapped.save_pretrained(str(directory))
    logger.info("saved tokenizer to %s", directory)
    return directory / "tokenizer.json"


def load_tokenizer(directory: str | Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer saved by :func:`save_tokenizer` (offline, no network)."""
    directory = Path(directory)
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"no tokenizer.json in {directory}; train and save one first with "
            f"autoglm.tokenizer.train_tokenizer(texts) and "
            f"save_tokenizer(tok, '{directory}'), or point at the directory that has it"
        )
    tok = PreTrainedTokenizerFast.from_pretrained(str(directory), local_files_only=True)
    if tok.eos_token_id is None:
        # A bare tokenizer.json without tokenizer_config.json: restore our special tokens.
        tok = _wrap(tok.backend_tokenizer)
    return tok
