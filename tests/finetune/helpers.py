"""Shared helpers for the finetune tests: a tiny tokenizer and tiny saved model directories
made here (no download, no corpus beyond the text below)."""

from pathlib import Path

import torch

from autoglm import OpenAutoGLMConfig, OpenAutoGLMForCausalLM
from autoglm.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer

TEXT = ("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer "
        "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles. ") * 40


def make_tokenizer(directory: Path, vocab_size: int = 300, text: str = TEXT):
    save_tokenizer(train_tokenizer([text], vocab_size=vocab_size), directory)
    return load_tokenizer(directory)


def make_model_dir(directory: Path, tok_dir: Path, preset: str = "tiny", seed: int = 0, **overrides) -> Path:
    """Save a randomly initialised `preset` model with the tokenizer of tok_dir in `directory`."""
    tok = load_tokenizer(tok_dir)
    torch.manual_seed(seed)
    model = OpenAutoGLMForCausalLM(OpenAutoGLMConfig.from_name(preset, vocab_size=len(tok), **overrides))
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def write_text(path: Path, text: str = TEXT) -> Path:
    path.write_text(text)
    return path
