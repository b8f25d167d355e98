"""A saved run (tiny random model + small BPE tokenizer) for the lm-eval tests. Nothing may be
downloaded: the built-in tasks read local JSONL files; datasets is told it is offline."""

import importlib.util
import sys
from pathlib import Path

import pytest

# the inference tests' helpers (make_model, BackgroundServer), loaded by file: putting their folder on
# sys.path would make its conftest.py clash with this one
if "inference_helpers" not in sys.modules:
    _spec = importlib.util.spec_from_file_location("inference_helpers",
                                                   Path(__file__).parents[1] / "inference" / "inference_helpers.py")
    sys.modules["inference_helpers"] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules["inference_helpers"])


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory):
    import sysconfig

    from inference_helpers import make_model

    from autoglm.data import stdlib_docstring_corpus
    from autoglm.rundir import RunDir
    from autoglm.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer

    root = tmp_path_factory.mktemp("eval-run")
    docs = stdlib_docstring_corpus(Path(sysconfig.get_paths()["stdlib"]) / "asyncio")
    save_tokenizer(train_tokenizer(docs, vocab_size=512), root / "tok")
    tok = load_tokenizer(root / "tok")
    model = make_model(vocab_size=len(tok))
    RunDir.save(root / "run", model, tok, info={"data": "builtin:stdlib-docstrings"})
    return root / "run"
