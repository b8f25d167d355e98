"""Data: text corpora, tokenized caches and batching."""

from autoglm.data.corpus import TEXT_SUFFIXES, read_corpus, stdlib_docstring_corpus
from autoglm.data.prepare import BUILTIN_CORPUS, PreparedData, corpus_source, prepare_corpus
from autoglm.data.text import TokenCache, build_token_cache, iter_eval_batches, sample_batch

__all__ = [
    "TEXT_SUFFIXES",
    "read_corpus",
    "stdlib_docstring_corpus",
    "TokenCache",
    "build_token_cache",
    "iter_eval_batches",
    "sample_batch",
    "BUILTIN_CORPUS",
    "PreparedData",
    "corpus_source",
    "prepare_corpus",
]
