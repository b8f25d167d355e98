"""Shared fixtures: a tiny model briefly trained on stdlib docstrings (so greedy decoding has
clear winners), saved with its tokenizer; its fp32 ONNX export made through the CLI; and
its dynamic-INT8 export made through the CLI from a config file."""

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from autoglm import OpenAutoGLMConfig, OpenAutoGLMForCausalLM
from export_helpers import train_briefly


@pytest.fixture(scope="session")
def export_corpus_tokens(tmp_path_factory):
    from autoglm.data import stdlib_docstring_corpus
    from autoglm.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer

    docs = list(stdlib_docstring_corpus())[:300]
    d = tmp_path_factory.mktemp("export_tok")
    save_tokenizer(train_tokenizer(docs, vocab_size=512), d)
    tok = load_tokenizer(d)
    ids = np.concatenate([np.asarray(tok(doc).input_ids + [tok.eos_token_id]) for doc in docs]).astype(np.int64)
    return tok, ids


@pytest.fixture(scope="session")
def export_model_dir(tmp_path_factory, export_corpus_tokens):
    """tiny preset, 60 AdamW steps on the first 90% of the tokens, saved with the tokenizer."""
    tok, ids = export_corpus_tokens
    torch.manual_seed(0)
    model = OpenAutoGLMForCausalLM(OpenAutoGLMConfig.from_name("tiny"))
    train_briefly(model, ids[: int(0.9 * len(ids))], steps=60, lr=3e-3, seed=0)
    d = tmp_path_factory.mktemp("export_model")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def eager_model(export_model_dir):
    from autoglm.export import load_model_dir

    return load_model_dir(export_model_dir)


@pytest.fixture(scope="session")
def fp32_export(tmp_path_factory, export_model_dir):
    """`autoglm export onnx MODEL_DIR --out DIR` through the CLI (the fp32 path)."""
    from autoglm.cli import app

    out = tmp_path_factory.mktemp("onnx") / "fp32"
    res = CliRunner().invoke(app, ["export", "onnx", str(export_model_dir), "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="session")
def int8_export(tmp_path_factory, export_model_dir):
    """`autoglm export onnx MODEL_DIR --out DIR --config int8.yaml`: the recipe's quantized path
    (fp32 export, parity check, dynamic INT8) driven by a config file."""
    from autoglm.cli import app

    d = tmp_path_factory.mktemp("onnx_int8")
    (d / "int8.yaml").write_text("quantize: int8\nparity:\n  atol: 1.0e-4\n")
    out = d / "int8"
    res = CliRunner().invoke(app, ["export", "onnx", str(export_model_dir), "--out", str(out),
                                   "--config", str(d / "int8.yaml")])
    assert res.exit_code == 0, res.output
    return out


_INT8_FILES = ("test_export_quantize.py", "test_export_recipe.py")


def pytest_collection_modifyitems(config, items):
    """Under `pytest -n N --dist loadgroup` (make test) the export tests run in two groups, each
    on one worker, so the session-scoped exports above are made once per group, not once per
    test file; the INT8 files form the second group."""
    for item in items:
        if "tests/export/" in str(item.fspath).replace("\\", "/"):
            group = "export-int8" if item.fspath.basename in _INT8_FILES else "export-fp32"
            item.add_marker(pytest.mark.xdist_group(group))
