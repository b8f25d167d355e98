"""Loading pairs: digits, caption tables and COCO JSON with bad items skipped and named."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from autoglm.multimodal.data import load_caption_table, load_digits_pairs, load_pairs, split_indices


def _png(path, size=(10, 10), mode="L", value=128):
    Image.new(mode, size, value if mode == "L" else (value, 0, 0)).save(path)


@pytest.fixture
def folder(tmp_path):
    _png(tmp_path / "a.png", value=255)
    _png(tmp_path / "b.png", mode="RGB")  # converted to grey
    _png(tmp_path / "tiny.png", size=(2, 2))
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return tmp_path


def test_digits_pairs_have_template_captions_naming_the_label():
    d = load_digits_pairs()
    assert d.images.shape == (1797, 1, 8, 8) and float(d.images.max()) == 1.0
    assert all(d.class_names[int(y)] in cs[0] for y, cs in zip(d.labels[:50], d.captions[:50]))
    assert len(set(d.captions[0])) == len(d.captions[0]) >= 4


def test_csv_skips_bad_items_and_keeps_the_rest(folder):
    (folder / "caps.csv").write_text("image,caption\na.png,a white square\na.png,bright\nb.png,a red square\n"
                                     "missing.png,gone\ncorrupt.png,broken\ntiny.png,too small\nb.png,\n")
    d = load_caption_table(folder / "caps.csv", channels=1, size=8)
    assert d.images.shape == (2, 1, 8, 8)
    assert d.captions == [["a white square", "bright"], ["a red square"]]
    assert torch.allclose(d.images[0], torch.ones(1, 8, 8))
    reasons = {s["item"].split("/")[-1]: s["reason"] for s in d.skipped}
    assert "does not exist" in reasons["missing.png"]
    assert "not a readable image" in reasons["corrupt.png"]
    assert "smaller than" in reasons["tiny.png"]
    assert any("empty caption" in s["reason"] for s in d.skipped)


def test_jsonl_with_named_columns_and_rgb(folder):
    rows = [{"path": "a.png", "text": "white"}, {"path": "b.png", "text": "red"}, {"text": "no image"}]
    (folder / "caps.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
    d = load_caption_table(folder / "caps.jsonl", image_col="path", caption_col="text", channels=3, size=6)
    assert d.images.shape == (2, 3, 6, 6)
    assert torch.allclose(d.images[1, 0], torch.full((6, 6), 128 / 255), atol=1e-3)  # red channel of b.png
    assert len(d.skipped) == 2


def test_coco_format_and_all_bad_is_an_error(folder):
    coco = {"images": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png"}],
            "annotations": [{"id": 10, "image_id": 1, "caption": "white"}, {"id": 11, "image_id": 1, "caption": "sq"},
                            {"id": 12, "image_id": 2, "caption": "red"}, {"id": 13, "image_id": 9, "caption": "x"}]}
    (folder / "coco.json").write_text(json.dumps(coco))
    d = load_pairs(str(folder / "coco.json"), channels=1, size=8)
    assert d.captions == [["white", "sq"], ["red"]]
    assert d.skipped == [{"item": "annotation 13", "reason": "names an image id that is not in 'images'"}]
    (folder / "bad.csv").write_text("image,caption\nmissing.png,x\ncorrupt.png,y\n")
    with pytest.raises(ValueError, match="no valid image-caption pair"):
        load_caption_table(folder / "bad.csv")
    (folder / "cols.csv").write_text("file,text\na.png,x\n")
    with pytest.raises(ValueError, match="image column"):
        load_caption_table(folder / "cols.csv")


def test_split_is_stratified_disjoint_and_seeded():
    labels = torch.tensor(np.repeat(np.arange(4), 25))
    tr, va, te = split_indices(100, 0.2, 0.2, 0, labels)
    assert len(set(tr.tolist()) | set(va.tolist()) | set(te.tolist())) == 100 and len(va) == len(te) == 20
    assert torch.bincount(labels[va]).tolist() == [5, 5, 5, 5]
    assert torch.equal(split_indices(100, 0.2, 0.2, 0, labels)[1], va)
