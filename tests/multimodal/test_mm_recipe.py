"""The alignment recipe end to end on digits (a few steps of small towers): saved directory,
load round trip, exact resume, evaluation, CLI."""

import json
from pathlib import Path

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


def _shades(root, n=24):
    """A caption table of grey squares in three classes (dark, mid, light) with a label column."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    names = ("dark", "mid", "light")
    rows = ["image,caption,shade"]
    for i in range(n):
        c = i % 3
        Image.new("L", (8, 8), 40 + 80 * c + i).save(root / f"s{i}.png")
        rows.append(f"s{i}.png,a {names[c]} square,{names[c]}")
    (root / "caps.csv").write_text("\n".join(rows) + "\n")
    (root / "names.txt").write_text("light\ndark\nmid\n")  # another order than the sorted names
    (root / "templates.txt").write_text("a {name} square\na patch that is {name}\n")
    return root


def test_existing_run_is_refused_untouched_or_overwritten(tmp_path, split):
    out = tmp_path / "run"
    base = {**SMALL, "out": str(out), "train.max_steps": 1, "train.eval_every": 0}
    align(load_config(AlignConfig, overrides=base), progress=False, split=split, evaluate_at_end=False)
    before = {f: (out / f).read_bytes() for f in ("tokenizer.json", "model.safetensors", "align_config.json")}
    other = {**base, "text.vocab_size": 280}  # another tokenizer, were it written
    with pytest.raises(FileExistsError, match="already holds a run .*--overwrite to replace it"):
        align(load_config(AlignConfig, overrides=other), progress=False, split=split, evaluate_at_end=False)
    assert {f: (out / f).read_bytes() for f in before} == before
    with pytest.raises(ValueError, match="resume and overwrite exclude each other"):
        align(load_config(AlignConfig, overrides={**other, "resume": True, "overwrite": True}), progress=False,
              split=split, evaluate_at_end=False)
    align(load_config(AlignConfig, overrides={**other, "overwrite": True}), progress=False, split=split,
          evaluate_at_end=False)
    assert (out / "tokenizer.json").read_bytes() != before["tokenizer.json"]
    assert "overwrite: false" in (out / "config.yaml").read_text()  # re-running the saved config refuses
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file, not a directory"):
        align(load_config(AlignConfig, overrides={**base, "out": str(tmp_path / "file")}), progress=False,
              split=split, evaluate_at_end=False)
    assert (tmp_path / "file").read_text() == "x"


def test_user_labels_class_names_and_templates_drive_zero_shot_and_eval_reads_the_runs_data(tmp_path, monkeypatch):
    from autoglm.multimodal.evaluate import embed_texts as texts_of

    d = _shades(tmp_path / "data")
    over = {**SMALL, "out": str(tmp_path / "run"), "train.max_steps": 2, "train.batch_size": 8,
            "train.eval_every": 0, "data.source": str(d / "caps.csv"), "data.label_col": "shade",
            "data.class_names": str(d / "names.txt"), "data.templates": str(d / "templates.txt"),
            "data.val_fraction": 0.25, "data.test_fraction": 0.25}
    align(load_config(AlignConfig, overrides=over), progress=False, evaluate_at_end=False)
    monkeypatch.chdir(tmp_path / "data")  # eval from elsewhere, with no data option: the run's own data
    res = evaluate(load_config(AlignEvalConfig, overrides={"model_dir": str(tmp_path / "run"), "probe": False}))
    assert res["data"] == str((d / "caps.csv").resolve()) and res["images"] == 6
    # reference: the test images' classes under names.txt's order, prompts from templates.txt
    model, tok, _ = load_aligned(tmp_path / "run")
    sp = load_split(load_config(AlignConfig, overrides=over).data, 1, 8)
    names, temps = ["light", "dark", "mid"], ["a {name} square", "a patch that is {name}"]
    assert [names[y] for y in sp["test"].labels] == [c[0].split()[1] for c in sp["test"].captions]
    cls = torch.stack([torch.nn.functional.normalize(texts_of(model, tok, [t.format(name=n) for t in temps]).mean(0),
                                                     dim=0) for n in names])
    pred = (embed_images(model, sp["test"].images) @ cls.T).argmax(-1)
    assert res["zero_shot_acc"] == pytest.approx(100.0 * float((pred == sp["test"].labels).float().mean()))
    # class names without labels are refused rather than ignored
    no_labels = {**over, "data.label_col": None, "out": str(tmp_path / "run2")}
    with pytest.raises(ValueError, match="needs each image's class.*--label-col"):
        align(load_config(AlignConfig, overrides=no_labels), progress=False)
    assert not (tmp_path / "run2").exists()


def test_empty_val_split_still_saves_and_reports_test(tmp_path):
    d = _shades(tmp_path / "data")
    over = {**SMALL, "out": str(tmp_path / "run"), "train.max_steps": 1, "train.batch_size": 8,
            "train.eval_every": 1, "data.source": str(d / "caps.csv"), "data.label_col": "shade",
            "data.val_fraction": 0.0, "data.test_fraction": 0.25}
    out = align(load_config(AlignConfig, overrides=over), progress=False)
    assert out.eval["val"] == {"split": "val", "images": 0, "captions": 0}
    assert "zero_shot_acc" in out.eval["test"] and "probe_acc" not in out.eval["test"]  # no val to choose C
    assert (tmp_path / "run" / "model.safetensors").is_file()


@pytest.mark.parametrize("field,value,match", [("data.crop_scale", "0,1", "crop_scale"),
                                               ("data.hflip", 2, "hflip must be a probability"),
                                               ("data.word_mask", -0.5, "word_mask must be a probability"),
                                               ("loss.false_negatives", "all", "false_negatives")])
def test_bad_settings_fail_before_anything_runs(field, value, match):
    from autoglm.settings import ConfigError

    with pytest.raises((ConfigError, ValueError), match=match):
        load_config(AlignConfig, overrides={field: value})


def test_same_label_needs_labels(tmp_path):
    from PIL import Image

    for i in range(6):
        Image.new("L", (8, 8), 30 * i).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(f"shade {i}\n")
    over = {**SMALL, "out": str(tmp_path / "run"), "data.source": str(tmp_path), "loss.false_negatives": "same_label"}
    with pytest.raises(ValueError, match="'same_label' needs each image's class"):
        align(load_config(AlignConfig, overrides=over), progress=False)


def test_run_data_is_used_only_when_no_data_option_is_given(tmp_path):
    from autoglm.recipes.align import AlignData, ProjectorConfig, run_data

    (tmp_path / "caps.csv").write_text("image,caption,shade\n")
    saved = {"source": str(tmp_path / "caps.csv"), "label_col": "shade", "val_fraction": 0.25, "word_mask": 0.1,
             "crop_scale": [0.8, 1.0]}
    meta = {"data": saved}
    d = run_data(load_config(AlignEvalConfig, overrides={"model_dir": "x"}).data, meta)
    assert (d.source, d.label_col, d.val_fraction, d.crop_scale) == (saved["source"], "shade", 0.25, (0.8, 1.0))
    # another option on top of the run's section; another source: the user's section alone
    seeded = run_data(load_config(AlignEvalConfig, overrides={"model_dir": "x", "data.split_seed": 3,
                                                              "data.class_names": "n.txt"}).data, meta)
    assert (seeded.source, seeded.label_col, seeded.split_seed, seeded.class_names) == \
        (saved["source"], "shade", 3, Path("n.txt"))
    mine = load_config(AlignEvalConfig, overrides={"model_dir": "x", "data.source": "other.csv"}).data
    assert run_data(mine, meta) is mine
    assert run_data(AlignData(), {}) == AlignData()  # a run saved without its data section: the defaults
    p = run_data(load_config(ProjectorConfig, overrides={"align_dir": "x", "lm": "y"}).data, meta, word_mask=0.0)
    assert p.source == saved["source"] and p.word_mask == 0.0  # the projector keeps its own caption masking
    gone = {"data": {**saved, "source": str(tmp_path / "moved.csv")}}
    with pytest.raises(FileNotFoundError, match="moved.csv, which no longer exists; give the data with --data"):
        run_data(AlignData(), gone)


def test_class_names_file_errors(tmp_path):
    d = _shades(tmp_path / "data")
    (d / "dup.txt").write_text("dark\nmid\ndark\n")
    (d / "short.txt").write_text("dark\n")
    base = {"data.source": str(d / "caps.csv"), "data.label_col": "shade"}
    with pytest.raises(ValueError, match=r"names \['dark'\] more than once"):
        load_split(load_config(AlignConfig, overrides={**base, "data.class_names": str(d / "dup.txt")}).data, 1, 8)
    # labels that are not in the file are skipped and named; none left is an error naming one
    with pytest.raises(ValueError, match="no valid image-caption pair.*'mid' is not a class name"):
        load_split(load_config(AlignConfig, overrides={**base, "data.source": str(_mid_only(d)),
                                                       "data.class_names": str(d / "short.txt")}).data, 1, 8)
    with pytest.raises(ValueError, match="has 1 names but digits has class index 9; give one name per class"):
        load_split(load_config(AlignConfig, overrides={"data.class_names": str(d / "short.txt")}).data, 1, 8)


def _mid_only(d):
    (d / "mid.csv").write_text("image,caption,shade\ns1.png,a mid square,mid\n")
    return d / "mid.csv"


def test_labels_added_at_eval_keep_the_runs_unstratified_split(tmp_path, monkeypatch):
    import autoglm.recipes.align as recipe

    d = _shades(tmp_path / "data", n=30)
    over = {**SMALL, "out": str(tmp_path / "run"), "train.max_steps": 1, "train.batch_size": 8,
            "train.eval_every": 0, "data.source": str(d / "caps.csv"), "data.test_fraction": 0.3}
    align(load_config(AlignConfig, overrides=over), progress=False, evaluate_at_end=False)  # trained without labels
    plain = load_split(load_config(AlignConfig, overrides=over).data, 1, 8)
    labelled = load_config(AlignConfig, overrides={**over, "data.label_col": "shade"}).data
    strat = load_split(labelled, 1, 8)
    kept = load_split(labelled, 1, 8, stratify=False)
    assert kept["test"].captions == plain["test"].captions != strat["test"].captions
    seen = []
    real = recipe.load_split
    monkeypatch.setattr(recipe, "load_split", lambda *a, **k: seen.append(a[3:]) or real(*a, **k))
    res = evaluate(load_config(AlignEvalConfig, overrides={"model_dir": str(tmp_path / "run"), "probe": False,
                                                           "data.label_col": "shade"}))
    assert seen == [(False,)] and "zero_shot_acc" in res and res["images"] == len(plain["test"])
