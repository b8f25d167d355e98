"""Tests for autoglm.tokenizer: byte-level BPE training, saving and loading."""

import argparse
import collections
import inspect
import json
import logging
import os
import re
import string
import subprocess
import typing

import pytest
from transformers import AutoTokenizer

from autoglm.tokenizer import (
    EOS_TOKEN,
    EOS_TOKEN_ID,
    PAD_TOKEN,
    PAD_TOKEN_ID,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
)

SAMPLES = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "naïve café — 東京 🚀",
    "  leading spaces\n\n\ttabs and\r\nwindows newlines   \n",
    "def f(x):\n    return x ** 2  # comment\n",
    "",
    " ",
]


def _corpus() -> list[str]:
    """About 20 kB of real English: docstrings of a few standard-library modules."""
    modules = (argparse, collections, inspect, json, logging, os, re, string, subprocess, typing)
    return [m.__doc__ for m in modules] + SAMPLES


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(_corpus(), vocab_size=400)


@pytest.fixture(scope="module")
def saved_dir(tok, tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok")
    save_tokenizer(tok, directory)
    return directory


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable-character table, written out independently."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def test_special_token_ids_and_vocab_size(tok):
    assert tok.token_to_id(EOS_TOKEN) == EOS_TOKEN_ID == 0
    assert tok.token_to_id(PAD_TOKEN) == PAD_TOKEN_ID == 1
    assert tok.get_vocab_size() == 400
    # the corpus's most frequent word became a single token
    assert len(tok.encode(" the").ids) == 1


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text).ids) == text


@pytest.mark.parametrize("text", SAMPLES)
def test_tokens_are_the_utf8_bytes(tok, text):
    """Reference: map each token back to bytes with GPT-2's table; they must spell the text."""
    inverse = {c: b for b, c in _bytes_to_unicode().items()}
    pieces = [tok.id_to_token(i) for i in tok.encode(text).ids]
    assert bytes(inverse[c] for piece in pieces for c in piece) == text.encode("utf-8")


def test_autotokenizer_loads_saved_directory(tok, saved_dir):
    config = json.loads((saved_dir / "tokenizer_config.json").read_text())
    assert config["eos_token"] == EOS_TOKEN and config["pad_token"] == PAD_TOKEN
    for hf in (AutoTokenizer.from_pretrained(saved_dir, local_files_only=True),
               load_tokenizer(saved_dir)):
        assert hf.eos_token_id == EOS_TOKEN_ID
        assert hf.pad_token_id == PAD_TOKEN_ID
        assert hf.bos_token is None
        for text in SAMPLES:
            ids = hf.encode(text, add_special_tokens=False)
            assert ids == tok.encode(text).ids
            assert hf.decode(ids) == text


def test_load_bare_tokenizer_json_restores_special_tokens(tok, tmp_path):
    tok.save(str(tmp_path / "tokenizer.json"))
    hf = load_tokenizer(tmp_path)
    assert (hf.eos_token_id, hf.pad_token_id) == (EOS_TOKEN_ID, PAD_TOKEN_ID)


def test_load_missing_tokenizer_names_file_and_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no tokenizer\.json in .*save_tokenizer"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("vocab_size", [0, 256, 258])
def test_vocab_size_too_small(vocab_size):
    with pytest.raises(ValueError, match=rf"vocab_size \({vocab_size}\) must be > 258"):
        train_tokenizer(["abc"], vocab_size=vocab_size)


def test_training_is_deterministic():
    a = train_tokenizer(_corpus(), vocab_size=300)
    b = train_tokenizer(iter(_corpus()), vocab_size=300)  # a plain iterator works too
    assert a.to_str() == b.to_str()


def test_padded_batches_generate_what_each_prompt_generates_alone(saved_dir):
    """A saved tokenizer pads on the left (AutoTokenizer reads it from tokenizer_config.json),
    so `generate()` on a padded batch continues each prompt where it ends: the batch's greedy
    tokens equal each prompt's generated alone."""
    import torch

    from autoglm import OpenAutoGLMConfig
    from autoglm.hf import OpenAutoGLMForCausalLM

    hf = AutoTokenizer.from_pretrained(saved_dir, local_files_only=True)
    assert hf.padding_side == load_tokenizer(saved_dir).padding_side == "left"
    torch.manual_seed(0)
    cfg = OpenAutoGLMConfig.from_name("tiny", vocab_size=hf.vocab_size, initializer_range=0.2)  # varied outputs
    model = OpenAutoGLMForCausalLM(cfg).eval()
    texts = ["The quick brown fox", "Return the lazy dog and the quick brown fox jumps over"]
    batch = hf(texts, return_tensors="pt", padding=True)
    assert (batch["attention_mask"][0, 0], batch["attention_mask"][0, -1]) == (0, 1)  # padding first
    out = model.generate(**batch, max_new_tokens=8, do_sample=False)[:, -8:]
    for row, text in zip(out, texts):
        alone = model.generate(**hf([text], return_tensors="pt"), max_new_tokens=8, do_sample=False)[0, -8:]
        assert row.tolist() == alone.tolist()
