"""The alignment recipe end to end on digits (a few steps of small towers): saved directory,
load round trip, exact resume, evaluation, CLI."""

import json

import pytest
import torch
from typer.testing import CliRunner

from autoglm.multimodal.evaluate import embed_images, embed_texts
from autoglm.multimodal.store import load_aligned
from autoglm.recipes.align import AlignConfig, AlignEvalConfig, align, evaluate, load_split
from autoglm.settings import load_config

SMALL = {"image.image_size": 8, "image.patch_size": 4, "image.dim": 32, "image.layers": 1, "image.ffn_hidden": 64,
         "text.vocab_size": 300, "loss.embed_dim": 16, "loss.queue_size": 32, "train.batch_size": 16,
         "train.eval_every": 4, "train.log_every": 2, "data.val_fraction": 0.1, "data.test_fraction": 0.1}


@pytest.fixture(scope="module")
def split():
    return load_split(load_config(AlignConfig).data, 1, 8)


def test_train_save_load_and_resume_exactly(tmp_path, split):
    cfg = load_config(AlignConfig, overrides={**SMALL, "out": str(tmp_path / "a"), "train.max_steps": 8,
                                              "train.save_every": 4})
    full = align(cfg, progress=False, split=split, evaluate_at_end=False)
    assert [p["step"] for p in full.curve] == [4, 8]
    model, tok, meta = load_aligned(tmp_path / "a")
    assert meta["momentum_encoders_included"] is False and meta["class_names"][3] == "three"
    assert not any(k.startswith("momentum_towers") or "queue" in k for k in model.state_dict())
    imgs = split["test"].images[:5]
    assert torch.allclose(embed_images(model, imgs), embed_images(full.model, imgs), atol=1e-5)
    texts = ["a handwritten seven", "the number 3"]
    assert torch.allclose(embed_texts(model, tok, texts), embed_texts(full.model, full.tokenizer, texts), atol=1e-5)
    # interrupted after 4 steps, then resumed to 8: the same losses and weights as the uninterrupted run
    class StopAt4:
        def on_step(self, trainer, row):
            trainer.should_stop = trainer.step >= 4

    half = load_config(AlignConfig, overrides={**SMALL, "out": str(tmp_path / "b"), "train.max_steps": 8,
                                               "train.save_every": 4})
    assert align(half, progress=False, split=split, evaluate_at_end=False, callbacks=[StopAt4()]).result.steps == 4
    more = load_config(AlignConfig, overrides={**SMALL, "out": str(tmp_path / "b"), "train.max_steps": 8,
                                               "train.save_every": 4, "resume": True})
    resumed = align(more, progress=False, split=split, evaluate_at_end=False)
    rows = lambda p: {r["step"]: r["loss"] for r in map(json.loads, (p / "metrics.jsonl").read_text().splitlines())}  # noqa: E731
    a, b = rows(tmp_path / "a"), rows(tmp_path / "b")
    assert set(a) <= set(b) and [b[s] for s in sorted(a)] == pytest.approx([a[s] for s in sorted(a)], rel=1e-5)
    for (k, v), w in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.allclose(v.float(), w.float(), atol=1e-5), k


def test_eval_and_cli(tmp_path, split):
    from autoglm.cli import app

    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["align", "--out", str(out), "--steps", "2", "--image-size", "8", "--image-dim",
                                 "32", "--image-layers", "1", "--vocab-size", "300", "--queue-size", "16",
                                 "--batch-size", "16", "--eval-every", "0"])
    assert r.exit_code == 0, r.output
    assert "alignment (percent)" in r.output and (out / "align_config.json").is_file()
    res = evaluate(load_config(AlignEvalConfig, overrides={"model_dir": str(out), "probe": False, "split": "val"}))
    assert 0 <= res["zero_shot_acc"] <= 100 and set(res) >= {"i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5"}
    r = CliRunner().invoke(app, ["align", "eval", str(tmp_path / "nothing")])
    assert r.exit_code == 2 and "not an aligned model directory" in r.output


def test_caption_table_with_bad_items_trains_on_the_valid_pairs(tmp_path):
    from PIL import Image

    rows = ["image,caption"]
    for i in range(12):
        Image.new("L", (8, 8), 20 * i).save(tmp_path / f"img{i}.png")
        rows.append(f"img{i}.png,a square of shade {i}")
    (tmp_path / "broken.png").write_bytes(b"garbage")
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "rgb.png")  # another channel count: converted
    rows += ["missing.png,nothing here", "broken.png,corrupt", "img0.png,", "rgb.png,a red square"]
    (tmp_path / "caps.csv").write_text("\n".join(rows) + "\n")
    cfg = load_config(AlignConfig, overrides={**SMALL, "out": str(tmp_path / "run"), "train.max_steps": 2,
                                              "train.batch_size": 4, "data.source": str(tmp_path / "caps.csv"),
                                              "data.val_fraction": 0.2, "data.test_fraction": 0.2})
    out = align(cfg, progress=False)
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    reasons = " | ".join(s["reason"] for s in info["skipped"])
    assert len(info["skipped"]) == 3 and "does not exist" in reasons and "not a readable image" in reasons
    assert "empty caption" in reasons
    assert sum(info["split"].values()) == 13 and "zero_shot_acc" not in out.eval["test"]  # no labels, no zero-shot
    assert set(out.eval["test"]) >= {"i2t_r1", "t2i_r5"}
