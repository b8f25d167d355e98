"""Shared fixtures: a tiny random model (large init so greedy outputs vary) and a small BPE tokenizer."""

import pytest
from inference_helpers import make_model


@pytest.fixture(scope="session")
def tiny_model():
    return make_model()


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    from autoglm.data import stdlib_docstring_corpus
    from autoglm.tokenizer import save_tokenizer, train_tokenizer

    import sysconfig
    from pathlib import Path

    # a few hundred docstrings (one stdlib package keeps the parse fast)
    docs = stdlib_docstring_corpus(Path(sysconfig.get_paths()["stdlib"]) / "asyncio")
    d = tmp_path_factory.mktemp("tok")
    save_tokenizer(train_tokenizer(docs, vocab_size=512), d)
    return d


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    from autoglm.tokenizer import load_tokenizer

    return load_tokenizer(tiny_tokenizer_dir)
