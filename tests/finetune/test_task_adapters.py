"""Sequence-classification adapter trained on a frozen backbone; saved, listed, loaded by name."""

import json

import pytest
import torch

from autoglm import OpenAutoGLMForCausalLM
from autoglm.training import TrainConfig
from autoglm.training.task_adapters import (classify_accuracy, encode_texts, list_saved_adapters,
                                            load_named_adapter, read_labeled_jsonl, save_named_adapter,
                                            train_classifier)

from helpers import make_model_dir, make_tokenizer


def toy_task(n=48):
    g = torch.Generator().manual_seed(0)
    words = {"pos": ["to", "be", "nobler", "fortune"], "neg": ["arrows", "troubles", "sea", "slings"]}
    texts, labels = [], []
    for i in range(n):
        lab = "pos" if i % 2 else "neg"
        idx = torch.randint(0, 4, (6,), generator=g).tolist()
        texts.append(" ".join(words[lab][j] for j in idx))
        labels.append(lab)
    return texts, labels


def test_train_classifier_frozen_backbone_save_list_load(tmp_path):
    tok = make_tokenizer(tmp_path / "tok")
    mdir = make_model_dir(tmp_path / "m", tmp_path / "tok")
    model = OpenAutoGLMForCausalLM.from_pretrained(mdir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    texts, labels = toy_task()
    cfg = TrainConfig(batch_size=16, seq_len=16, max_steps=60, warmup_steps=5, lr=3e-2, weight_decay=0.0,
                      eval_every=0, save_every=0, log_every=20)
    head, classes, stats = train_classifier(model, tok, "sentiment", texts, labels, cfg)
    assert classes == ["neg", "pos"] and stats["train_accuracy"] >= 0.9
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # backbone untouched
    save_named_adapter(model, "sentiment", mdir, classes)
    listed = list_saved_adapters(mdir)
    assert [(a["name"], a["type"], a["labels"]) for a in listed] == [
        ("sentiment", "sequence-classification", ["neg", "pos"])]
    fresh = OpenAutoGLMForCausalLM.from_pretrained(mdir).eval()
    _, lab = load_named_adapter(fresh, mdir, "sentiment")
    assert lab == ["neg", "pos"] and fresh.active_task_adapter == "sentiment"
    x, m = encode_texts(tok, texts, 128, tok.pad_token_id)  # train_classifier default max_len
    y = torch.tensor([classes.index(v) for v in labels])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, attention_mask=m).adapter_output,
                                   model(x, attention_mask=m).adapter_output)
    assert classify_accuracy(fresh, x, m, y) == stats["train_accuracy"]
    with pytest.raises(KeyError, match="no saved adapter named 'nope'.*saved: \\['sentiment'\\]"):
        load_named_adapter(fresh, mdir, "nope")


def test_labeled_jsonl_errors(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"text": "a", "label": 1}) + "\n" + json.dumps({"text": "b"}) + "\n")
    with pytest.raises(ValueError, match=r"d.jsonl:2 needs a \"text\" and a \"label\""):
        read_labeled_jsonl(f)
    f.write_text(json.dumps({"text": "a", "label": 1}) + "\n")
    with pytest.raises(ValueError, match="at least 2"):
        read_labeled_jsonl(f)
