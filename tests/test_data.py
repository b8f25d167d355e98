"""Tests for autoglm.data: corpora, the token cache and batching."""

import json
import logging
import os

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from autoglm.data import (
    build_token_cache,
    iter_eval_batches,
    read_corpus,
    sample_batch,
    stdlib_docstring_corpus,
)
from autoglm.tokenizer import train_tokenizer

# ---------------------------------------------------------------- corpora


@pytest.fixture(scope="module")
def stdlib_corpus():
    return stdlib_docstring_corpus()


def test_stdlib_corpus_is_large_clean_and_deterministic(stdlib_corpus):
    assert sum(len(d.encode()) for d in stdlib_corpus) > 500_000
    assert all(len(d) >= 40 and d == d.strip() for d in stdlib_corpus)
    assert len(set(stdlib_corpus)) == len(stdlib_corpus)
    assert read_corpus(None) == stdlib_corpus


def test_stdlib_corpus_rules_on_a_synthetic_tree(tmp_path):
    long_doc = "A module docstring that is comfortably over forty characters."
    func_doc = (
        "Indented function docstring,\n"
        "        kept because it is long,\n"
        "            relative indent kept.\n    "
    )
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "b.py").write_text(
        f'"""{long_doc}"""\n'
        f'class C:\n    """short"""\n'
        f'    def g(self):\n        """{long_doc}"""\n'  # duplicate: dropped
        f'def f():\n    """{func_doc}"""\n'
    )
    (tmp_path / "a.py").write_text('"""Sorted first: a.py comes before pkg/b.py in path order."""')
    (tmp_path / "bad.py").write_text('"""Never read: this file fails to parse."""\ndef (:')
    for skipped in ("test", "site-packages", "idlelib", "pkg/tests"):
        (tmp_path / skipped).mkdir(parents=True)
        (tmp_path / skipped / "x.py").write_text('"""Skipped directory docstring, long enough."""')
    assert stdlib_docstring_corpus(tmp_path) == [
        "Sorted first: a.py comes before pkg/b.py in path order.",
        long_doc,
        "Indented function docstring,\nkept because it is long,\n    relative indent kept.",
    ]


def test_read_corpus_file_and_directory(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.md").write_text("# second\n")
    (tmp_path / "a.txt").write_text("first \u00e9\n")
    (tmp_path / "sub" / "c.TXT").write_text("third\n")
    (tmp_path / "blank.txt").write_text("  \n")  # skipped
    (tmp_path / "ignored.py").write_text("not text\n")
    assert read_corpus(tmp_path) == ["first \u00e9\n", "# second\n", "third\n"]
    assert read_corpus(str(tmp_path / "a.txt")) == ["first \u00e9\n"]


def test_read_corpus_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.txt does not exist; pass an existing"):
        read_corpus(tmp_path / "nope.txt")


def test_read_corpus_empty_file(tmp_path):
    (tmp_path / "empty.txt").write_text(" \n\t\n")
    with pytest.raises(ValueError, match=r"empty\.txt is empty \(only whitespace\)"):
        read_corpus(tmp_path / "empty.txt")


def test_read_corpus_non_utf8(tmp_path):
    (tmp_path / "latin.txt").write_bytes("caf\u00e9".encode("latin-1"))
    expected = r"latin\.txt is not valid UTF-8 \(byte offset 3.*iconv -f latin1"
    with pytest.raises(ValueError, match=expected):
        read_corpus(tmp_path)


def test_read_corpus_directory_without_text(tmp_path):
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"contains no \.txt or \.md files"):
        read_corpus(tmp_path)


# ---------------------------------------------------------------- token cache

DOCS = [f"Doc {i}: the quick brown fox {'jumps ' * (i % 5)}over dog {i * i}.\n" for i in range(60)]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(DOCS, vocab_size=300)


def test_cache_matches_direct_encoding_and_splits(tok, tmp_path):
    cache = build_token_cache(DOCS, tok, tmp_path, val_fraction=0.1, source="unit test")
    # Reference: the tokenizer's own encoding of the documents joined by the eos text.
    reference = np.array(tok.encode("<|endoftext|>".join(DOCS)).ids)
    assert reference.tolist().count(0) == len(DOCS) - 1
    n = len(reference)
    assert cache.n_tokens == n and len(cache.train) + len(cache.val) == n
    assert len(cache.val) == int(n * 0.1)
    np.testing.assert_array_equal(cache.train, reference[: len(cache.train)])
    np.testing.assert_array_equal(cache.val, reference[len(cache.train):])
    assert cache.train.dtype == np.uint16 and isinstance(cache.train, np.memmap)
    assert cache.vocab_size == 300 and cache.eos_id == 0
    meta = json.loads((cache.path / "meta.json").read_text())
    assert meta["source"] == "unit test" and meta["n_train"] == len(cache.train)
    with pytest.raises(ValueError, match="read-only"):
        cache.train[0] = 1
    assert [p.name for p in tmp_path.iterdir()] == [cache.path.name]  # no temp dirs left


def test_cache_is_reused_for_same_inputs_only(tok, tmp_path, caplog):
    first = build_token_cache(DOCS, tok, tmp_path)
    mtime = os.stat(first.path / "tokens.bin").st_mtime_ns
    with caplog.at_level(logging.INFO, logger="autoglm.data.text"):
        second = build_token_cache(list(DOCS), tok, tmp_path)
    assert second.path == first.path
    assert os.stat(second.path / "tokens.bin").st_mtime_ns == mtime
    assert any("reusing token cache" in r.getMessage() for r in caplog.records)
    others = {
        build_token_cache(DOCS[:-1], tok, tmp_path).path,
        build_token_cache(DOCS[:-2] + [DOCS[-2] + DOCS[-1]], tok, tmp_path).path,
        build_token_cache(DOCS, train_tokenizer(DOCS, vocab_size=290), tmp_path).path,
        build_token_cache(DOCS, tok, tmp_path, val_fraction=0.2).path,
    }
    assert first.path not in others and len(others) == 4


def test_cache_uses_uint32_for_large_vocabularies(tmp_path):
    vocab = {"<|endoftext|>": 0, **{f"w{i}": i for i in range(1, 70_000)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    cache = build_token_cache(["w1 w69999", "w65536"], tok, tmp_path, val_fraction=0.0)
    assert cache.train.dtype == np.uint32
    assert cache.train.tolist() == [1, 69_999, 0, 65_536] and len(cache.val) == 0


# ---------------------------------------------------------------- batching


def test_sample_batch_is_a_function_of_seed_and_step():
    tokens = np.random.default_rng(0).integers(0, 300, 5_000).astype(np.uint16)
    x, y = sample_batch(tokens, 8, 32, step=7, seed=3)
    x2, y2 = sample_batch(tokens, 8, 32, step=7, seed=3)
    assert x.shape == y.shape == (8, 32) and x.dtype == y.dtype == torch.int64
    assert x.equal(x2) and y.equal(y2)
    assert not x.equal(sample_batch(tokens, 8, 32, step=8, seed=3)[0])
    assert not x.equal(sample_batch(tokens, 8, 32, step=7, seed=4)[0])


def test_sample_batch_windows_are_shifted_slices():
    tokens = np.arange(1_000, dtype=np.uint16)  # value == position, so a window names its offset
    for step in range(20):
        x, y = sample_batch(tokens, 4, 16, step=step, seed=0)
        for row_x, row_y in zip(x.numpy(), y.numpy()):
            start = row_x[0]
            np.testing.assert_array_equal(row_x, tokens[start:start + 16])
            np.testing.assert_array_equal(row_y, tokens[start + 1:start + 17])


def test_sample_batch_reaches_both_ends():
    tokens = np.arange(18)  # seq_len 16 leaves exactly two valid starts: 0 and 1
    starts = {int(x0) for s in range(10) for x0 in sample_batch(tokens, 4, 16, s, seed=0)[0][:, 0]}
    assert starts == {0, 1}


def test_short_split_error_names_sizes_and_fix():
    expected = r"has 10 tokens but .* needs seq_len \+ 1 = 17.*--seq-len"
    with pytest.raises(ValueError, match=expected):
        sample_batch(np.arange(10), 2, 16, step=0, seed=0)
    with pytest.raises(ValueError, match=r"has 10 tokens"):
        next(iter_eval_batches(np.arange(10), 2, 16))


def test_eval_batches_cover_the_split_in_order():
    tokens = np.arange(1_000, dtype=np.uint16)
    batches = list(iter_eval_batches(tokens, batch_size=4, seq_len=64))
    n_windows = (1_000 - 1) // 64  # 15 windows -> batches of 4, 4, 4, 3
    assert [len(x) for x, _ in batches] == [4, 4, 4, 3]
    xs = np.concatenate([x.numpy().ravel() for x, _ in batches])
    ys = np.concatenate([y.numpy().ravel() for _, y in batches])
    np.testing.assert_array_equal(xs, tokens[: n_windows * 64])
    np.testing.assert_array_equal(ys, tokens[1: n_windows * 64 + 1])
    assert len(list(iter_eval_batches(tokens, 4, 64, max_batches=2))) == 2
