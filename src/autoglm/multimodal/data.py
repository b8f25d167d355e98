"""Image-text pairs: the built-in digits, a folder of images with a CSV/JSONL of captions,
or COCO captions JSON; decoded with Pillow into one float tensor.

`PairData` holds every image (N, C, S, S) in [0, 1], every caption of each image, the
class label of each image where there is one (digits), and `skipped`: the items that were
left out and why (unreadable or corrupt file, a caption naming a missing image, an empty
caption, an image of the wrong channel count or too small). Loading never stops at a bad
item; it stops only when no valid pair is left.

Digits: scikit-learn's bundled 8x8 digits (1797 images, no download), captions made from
the labels through several templates ("a photo of the digit seven", "handwritten 7", ...).

Example:
    >>> d = load_digits_pairs()
    >>> d.images.shape, len(d.captions), d.class_names[7], d.captions[0][0]
    (torch.Size([1797, 1, 8, 8]), 1797, 'seven', 'a photo of the digit zero')
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

__all__ = ["PairData", "DIGIT_NAMES", "CAPTION_TEMPLATES", "ZERO_SHOT_TEMPLATES", "load_digits_pairs",
           "load_caption_table", "load_coco", "decode_image", "split_indices", "load_pairs"]

log = logging.getLogger(__name__)

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# training captions of a digit: {name} is the word, {digit} the numeral
CAPTION_TEMPLATES = ("a photo of the digit {name}", "a handwritten {name}", "the number {digit}",
                     "an image of a {name}", "a {digit} written by hand", "a small picture of the digit {digit}")
# zero-shot prompts: partly unseen phrasings, ensembled (mean of normalised text embeddings)
ZERO_SHOT_TEMPLATES = ("a photo of the digit {name}", "a handwritten {name}", "the number {digit}",
                       "a picture of a {name}")


@dataclass
class PairData:
    images: torch.Tensor  # (N, C, S, S) float in [0, 1]
    captions: list[list[str]]  # every caption of image i (at least one)
    labels: torch.Tensor | None = None  # (N,) class index, where the source has classes
    class_names: tuple[str, ...] = ()
    source: str = ""
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"item", "reason"}

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, idx) -> "PairData":
        idx = torch.as_tensor(idx, dtype=torch.long)
        return PairData(self.images[idx], [self.captions[i] for i in idx.tolist()],
                        self.labels[idx] if self.labels is not None else None, self.class_names, self.source)


def load_digits_pairs(templates: tuple[str, ...] = CAPTION_TEMPLATES) -> PairData:
    """scikit-learn's digits as (1, 8, 8) images in [0, 1] with one caption per template."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    labels = torch.tensor(d.target, dtype=torch.long)
    caps = [[t.format(name=DIGIT_NAMES[y], digit=y) for t in templates] for y in d.target.tolist()]
    return PairData(images, caps, labels, DIGIT_NAMES, "digits")


def decode_image(path: Path | BinaryIO, channels: int, size: int, min_size: int = 4) -> torch.Tensor:
    """One image file (a path or a binary stream) -> (channels, size, size) in [0, 1]; grey and
    colour are converted to `channels`. ValueError (the reason) for an unreadable or corrupt
    file or one smaller than `min_size` pixels on a side."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if min(im.size) < min_size:
                raise ValueError(f"image is {im.size[0]}x{im.size[1]} pixels, smaller than {min_size}x{min_size}")
            if mode not in ("L", "RGB", "RGBA", "P", "I;16", "I", "F", "LA", "CMYK", "YCbCr", "1"):
                raise ValueError(f"unsupported pixel mode {mode}")
            im = im.convert("L" if channels == 1 else "RGB").resize((size, size), Image.Resampling.BILINEAR)
            arr = np.asarray(im, dtype=np.float32) / 255.0
    except FileNotFoundError:
        raise ValueError("file does not exist") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"not a readable image ({type(e).__name__}: {e})") from None
    t = torch.from_numpy(arr)
    return t[None] if t.ndim == 2 else t.permute(2, 0, 1).contiguous()


def _read_table(path: Path, image_col: str, caption_col: str, sep: str | None) -> list[tuple[int, str, str]]:
    """(line, image path, caption) rows of a CSV/TSV or JSONL caption file."""
    rows = []
    if path.suffix.lower() in (".jsonl", ".json"):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                rows.append((n, "", f"\0invalid JSON ({e.msg})"))
                continue
            if not isinstance(rec, dict) or image_col not in rec:
                rows.append((n, "", f"\0no {image_col!r} field"))
                continue
            rows.append((n, str(rec[image_col]), str(rec.get(caption_col) or "")))
        return rows
    text = path.read_text(encoding="utf-8-sig")
    delim = sep or ("\t" if path.suffix.lower() == ".tsv" else ",")
    reader = csv.DictReader(text.splitlines(), delimiter=delim)
    if reader.fieldnames is None or image_col not in reader.fieldnames or caption_col not in reader.fieldnames:
        raise ValueError(f"{path}: the header must name the image column {image_col!r} and the caption column "
                         f"{caption_col!r}; it has {reader.fieldnames}; set image_col / caption_col (and sep)")
    for n, rec in enumerate(reader, 2):
        rows.append((n, str(rec.get(image_col) or ""), str(rec.get(caption_col) or "")))
    return rows


def _group(items: list[tuple[str, Path, str]], channels: int, size: int, source: str) -> PairData:
    """(where, image path, caption) -> PairData, every image decoded once; bad items skipped."""
    skipped: list[dict[str, str]] = []
    by_image: dict[Path, list[str]] = {}
    for where, img, cap in items:
        if cap.startswith("\0"):
            skipped.append({"item": where, "reason": cap[1:]})
        elif not cap.strip():
            skipped.append({"item": where, "reason": f"empty caption for {img}"})
        else:
            by_image.setdefault(img, []).append(cap.strip())
    images, caps = [], []
    for img, cs in by_image.items():
        try:
            images.append(decode_image(img, channels, size))
            caps.append(cs)
        except ValueError as e:
            skipped.append({"item": str(img), "reason": str(e)})
    for s in skipped:
        log.warning("skipped %s: %s", s["item"], s["reason"])
    if not images:
        raise ValueError(f"{source}: no valid image-caption pair ({len(skipped)} item(s) skipped, e.g. "
                         f"{skipped[0] if skipped else 'none'}); check the paths and the caption columns")
    return PairData(torch.stack(images), caps, None, (), source, skipped)


def load_caption_table(path: str | Path, image_root: str | Path | None = None, image_col: str = "image",
                       caption_col: str = "caption", sep: str | None = None, channels: int = 1,
                       size: int = 16) -> PairData:
    """A CSV/TSV/JSONL of (image path, caption) rows; paths relative to `image_root` (default:
    the file's folder). Several rows may name one image (several captions)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"caption file {path} does not exist; pass a CSV/TSV/JSONL with columns "
                                f"{image_col!r} and {caption_col!r}")
    root = Path(image_root) if image_root is not None else path.parent
    rows = _read_table(path, image_col, caption_col, sep)
    items = [(f"{path.name}:{n}", root / img if img else root / "<no image named>", cap) for n, img, cap in rows]
    return _group(items, channels, size, str(path))


def load_coco(path: str | Path, image_root: str | Path | None = None, channels: int = 3, size: int = 16) -> PairData:
    """COCO captions JSON ({"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]})."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"COCO captions file {path} does not exist")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(doc, dict) or "images" not in doc or "annotations" not in doc:
        raise ValueError(f"{path} is not COCO captions JSON: it needs top-level 'images' and 'annotations' lists")
    root = Path(image_root) if image_root is not None else path.parent
    files = {im.get("id"): im.get("file_name") for im in doc["images"] if isinstance(im, dict)}
    items = []
    for k, ann in enumerate(doc["annotations"]):
        where = f"annotation {ann.get('id', k) if isinstance(ann, dict) else k}"
        if not isinstance(ann, dict) or ann.get("image_id") not in files:
            items.append((where, root, "\0names an image id that is not in 'images'"))
            continue
        items.append((where, root / str(files[ann["image_id"]]), str(ann.get("caption") or "")))
    return _group(items, channels, size, str(path))


def load_pairs(source: str, image_root: str | Path | None = None, image_col: str = "image",
               caption_col: str = "caption", sep: str | None = None, channels: int = 1, size: int = 16) -> PairData:
    """'digits', a COCO captions JSON (a .json holding 'annotations'), or a CSV/TSV/JSONL caption table."""
    if source == "digits":
        return load_digits_pairs()
    p = Path(source)
    if p.suffix.lower() == ".json" and p.is_file():
        head = p.read_text(encoding="utf-8")[:1_000_000]
        if '"annotations"' in head:
            return load_coco(p, image_root, channels, size)
    return load_caption_table(p, image_root, image_col, caption_col, sep, channels, size)


def split_indices(n: int, val_fraction: float, test_fraction: float, seed: int,
                  labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train, val, test) index tensors: a seeded shuffle, stratified by label when given."""
    rng = np.random.default_rng(seed)
    groups = [np.arange(n)] if labels is None else [np.flatnonzero(labels.numpy() == c)
                                                    for c in np.unique(labels.numpy())]
    parts: list[list[np.ndarray]] = [[], [], []]
    for g in groups:
        g = rng.permutation(g)
        nv, nt = int(round(len(g) * val_fraction)), int(round(len(g) * test_fraction))
        parts[1].append(g[:nv])
        parts[2].append(g[nv:nv + nt])
        parts[0].append(g[nv + nt:])
    out = tuple(torch.from_numpy(np.sort(np.concatenate(p))).long() for p in parts)
    if len(out[0]) == 0:
        raise ValueError(f"the split leaves no training pair ({n} pairs, val_fraction {val_fraction}, "
                         f"test_fraction {test_fraction}); lower the fractions")
    return out  # type: ignore[return-value]
