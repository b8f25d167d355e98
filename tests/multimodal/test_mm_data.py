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


def test_folder_of_pairs_reads_each_image_with_its_text_file(tmp_path):
    from autoglm.multimodal.data import load_pair_folder

    (tmp_path / "sub").mkdir()
    _png(tmp_path / "cat.png", value=200)
    (tmp_path / "cat.txt").write_text("a bright cat\n\nthe cat again\n")
    _png(tmp_path / "sub" / "dog.v2.jpg", value=50)  # nested, a dot in the stem
    (tmp_path / "sub" / "dog.v2.txt").write_text("a dark dog")
    _png(tmp_path / "alone.png")  # no caption file
    (tmp_path / "orphan.txt").write_text("no image")
    (tmp_path / "empty.png").write_bytes((tmp_path / "cat.png").read_bytes())
    (tmp_path / "empty.txt").write_text("\n")
    d = load_pairs(str(tmp_path), channels=1, size=8)  # a folder is recognised as a folder of pairs
    assert d.captions == [["a bright cat", "the cat again"], ["a dark dog"]] and d.labels is None
    assert torch.allclose(d.images[0], torch.full((1, 8, 8), 200 / 255), atol=1e-3)
    reasons = {s["item"]: s["reason"] for s in d.skipped}
    assert reasons["alone.png"] == "no caption file alone.txt beside the image"
    assert reasons["orphan.txt"] == "caption file without an image of the same name"
    assert reasons["empty.png"].startswith("empty caption")
    with pytest.raises(ValueError, match="holds no image"):
        load_pair_folder(_empty(tmp_path))
    with pytest.raises(ValueError, match="no label column"):
        load_pairs(str(tmp_path), label_col="label")
    with pytest.raises(ValueError, match="image_root .* is for caption tables"):
        load_pairs(str(tmp_path), image_root=str(tmp_path))


def _empty(root):
    (root / "none").mkdir()
    (root / "none" / "x.txt").write_text("caption")
    return root / "none"


def test_label_column_names_or_indexes_the_classes(folder):
    (folder / "caps.csv").write_text("image,caption,cls\na.png,a white square,white\nb.png,a red square,red\n"
                                     "a.png,bright,white\na.png,conflict,red\nb.png,odd,blue\nb.png,no class,\n")
    d = load_caption_table(folder / "caps.csv", label_col="cls", size=8)
    assert d.class_names == ("red", "white") and d.labels.tolist() == [1, 0]  # sorted distinct names
    assert d.captions == [["a white square", "bright"], ["a red square"]]
    reasons = " | ".join(s["reason"] for s in d.skipped)
    assert "'red' differs from 'white'" in reasons and "'blue' differs from 'red'" in reasons
    assert "empty label" in reasons
    # with the class names file's order, and labels given as indices (JSONL)
    d = load_caption_table(folder / "caps.csv", label_col="cls", size=8, class_names=("white", "red", "green"))
    assert d.class_names == ("white", "red", "green") and d.labels.tolist() == [0, 1]
    assert any("'blue' is not a class name" in s["reason"] for s in d.skipped)
    rows = [{"image": "a.png", "caption": "white", "y": 2}, {"image": "b.png", "caption": "red", "y": "0"}]
    (folder / "caps.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    d = load_caption_table(folder / "caps.jsonl", label_col="y", size=8, class_names=("red", "x", "white"))
    assert d.labels.tolist() == [2, 0]
    with pytest.raises(ValueError, match="no label column 'label'"):
        load_caption_table(folder / "caps.csv", label_col="label")


def test_json_array_of_records_and_caption_lists(folder):
    recs = [{"image": "a.png", "caption": ["white", "bright square"]}, {"image": "b.png", "caption": "red"},
            {"caption": "no image"}]
    (folder / "caps.json").write_text(json.dumps(recs, indent=1))  # one JSON document, not JSON lines
    d = load_pairs(str(folder / "caps.json"), size=8)
    assert d.captions == [["white", "bright square"], ["red"]]
    assert d.skipped == [{"item": "caps.json:3", "reason": "no 'image' field"}]


def test_sixteen_bit_images_keep_their_range_and_huge_images_are_skipped(tmp_path, monkeypatch):
    from PIL import Image as PILImage

    from autoglm.multimodal.data import decode_image

    a = (np.arange(64).reshape(8, 8) * 1000).astype(np.uint16)  # 0 .. 63000 of 65535
    PILImage.fromarray(a).save(tmp_path / "i16.png")
    got = decode_image(tmp_path / "i16.png", channels=1, size=8)
    assert torch.allclose(got[0], torch.from_numpy(a / 65535.0).float(), atol=1e-4)  # not clipped to white
    rgb = decode_image(tmp_path / "i16.png", channels=3, size=8)
    assert rgb.shape == (3, 8, 8) and torch.equal(rgb[0], rgb[2])
    _png(tmp_path / "big.png", size=(40, 40))
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 100)  # 1600 pixels > 2x the limit: Pillow refuses
    with pytest.raises(ValueError, match="too large to decode safely"):
        decode_image(tmp_path / "big.png", channels=1, size=8)
