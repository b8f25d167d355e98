"""Image-text pairs: the built-in digits, a folder of images with a CSV/JSONL of captions,
a folder of pairs (`cat.png` + `cat.txt`), or COCO captions JSON; decoded with Pillow into
one float tensor.

`PairData` holds every image (N, C, S, S) in [0, 1], every caption of each image, the
class label of each image where there is one (digits), and `skipped`: the items that were
left out and why (unreadable or corrupt file, a caption naming a missing image, an empty
caption, an image of the wrong channel count or too small). Loading never stops at a bad
item; it stops only when no valid pair is left.

Digits: scikit-learn's bundled 8x8 digits (1797 images, no download), captions made from
the labels through several templates ("a photo of the digit seven", "handwritten 7", ...).

Class labels (for zero-shot and the linear probe) come with the digits, or from a label
column of a caption table (`label_col`): the label is a class name (one of `class_names`
when given, else the sorted distinct names) or a class index into `class_names`.

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

__all__ = ["PairData", "DIGIT_NAMES", "CAPTION_TEMPLATES", "ZERO_SHOT_TEMPLATES", "IMAGE_SUFFIXES",
           "load_digits_pairs", "load_caption_table", "load_pair_folder", "load_coco", "decode_image",
           "split_indices", "load_pairs"]

log = logging.getLogger(__name__)

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# training captions of a digit: {name} is the word, {digit} the numeral
CAPTION_TEMPLATES = ("a photo of the digit {name}", "a handwritten {name}", "the number {digit}",
                     "an image of a {name}", "a {digit} written by hand", "a small picture of the digit {digit}")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
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


def _wide_grey(arr: np.ndarray, mode: str) -> np.ndarray:
    """A 16-bit ("I;16*"), 32-bit integer ("I") or float ("F") grey image -> float32 in [0, 1]:
    16-bit over 65535; "I" over 255, 65535 or its maximum, whichever range holds it; "F" as is
    when within [0, 1], else over its maximum."""
    top = float(arr.max()) if arr.size else 1.0
    if mode.startswith("I;16"):
        scale = 65535.0
    elif mode == "I":
        scale = 255.0 if top <= 255 else 65535.0 if top <= 65535 else top
    else:
        scale = 1.0 if top <= 1 else top
    return np.clip(arr / scale, 0.0, 1.0).astype(np.float32)


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
            if mode.startswith("I") or mode == "F":  # 16/32-bit grey: scaled by its range, not clipped at 255
                arr = _wide_grey(np.asarray(im, dtype=np.float32), mode)
                arr = np.array(Image.fromarray(arr).resize((size, size), Image.Resampling.BILINEAR),
                               dtype=np.float32)  # a writable copy
                if channels == 3:
                    arr = np.repeat(arr[..., None], 3, axis=-1)
            else:
                im = im.convert("L" if channels == 1 else "RGB").resize((size, size), Image.Resampling.BILINEAR)
                arr = np.asarray(im, dtype=np.float32) / 255.0
    except FileNotFoundError:
        raise ValueError("file does not exist") from None
    except Image.DecompressionBombError as e:
        raise ValueError(f"image too large to decode safely ({e})") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"not a readable image ({type(e).__name__}: {e})") from None
    t = torch.from_numpy(arr)
    return t[None] if t.ndim == 2 else t.permute(2, 0, 1).contiguous()


def _read_table(path: Path, image_col: str, caption_col: str, sep: str | None,
                label_col: str | None = None) -> list[tuple[int, str, str, str | None]]:
    """(line, image path, caption, label or None) rows of a CSV/TSV, JSONL, or JSON array (of
    records; its rows are numbered by record) caption file."""
    rows: list[tuple[int, str, str, str | None]] = []
    if path.suffix.lower() in (".jsonl", ".json"):
        text = path.read_text(encoding="utf-8-sig")
        records: list[tuple[int, object]] | None = None
        if path.suffix.lower() == ".json":  # a JSON array of records, else JSON lines
            try:
                doc = json.loads(text)
            except json.JSONDecodeError:
                doc = None
            if isinstance(doc, list):
                records = [(n, rec) for n, rec in enumerate(doc, 1)]
        if records is None:
            records = []
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    records.append((n, json.loads(line)))
                except json.JSONDecodeError as e:
                    rows.append((n, "", f"\0invalid JSON ({e.msg})", None))
        for n, rec in records:
            if not isinstance(rec, dict) or image_col not in rec:
                rows.append((n, "", f"\0no {image_col!r} field", None))
                continue
            if label_col is not None and rec.get(label_col) in (None, ""):
                rows.append((n, str(rec[image_col]), f"\0no {label_col!r} (label) field", None))
                continue
            label = None if label_col is None else str(rec[label_col])
            caps = rec.get(caption_col)
            for cap in (caps if isinstance(caps, list) and caps else [caps]):  # a list: several captions
                rows.append((n, str(rec[image_col]), str(cap or ""), label))
        return rows
    text = path.read_text(encoding="utf-8-sig")
    delim = sep or ("\t" if path.suffix.lower() == ".tsv" else ",")
    reader = csv.DictReader(text.splitlines(), delimiter=delim)
    if reader.fieldnames is None or image_col not in reader.fieldnames or caption_col not in reader.fieldnames:
        raise ValueError(f"{path}: the header must name the image column {image_col!r} and the caption column "
                         f"{caption_col!r}; it has {reader.fieldnames}; set image_col / caption_col (and sep)")
    if label_col is not None and label_col not in reader.fieldnames:
        raise ValueError(f"{path}: the header has no label column {label_col!r} (it has {reader.fieldnames}); set "
                         f"label_col (--label-col) to the column holding the class, or leave it unset")
    for n, rec in enumerate(reader, 2):
        label = None if label_col is None else str(rec.get(label_col) or "").strip()
        if label == "":
            rows.append((n, str(rec.get(image_col) or ""), f"\0empty label ({label_col!r})", None))
            continue
        rows.append((n, str(rec.get(image_col) or ""), str(rec.get(caption_col) or ""), label))
    return rows


def _class_index(labels: set[str], class_names: tuple[str, ...]) -> dict[str, int]:
    """label -> class index: a label is one of `class_names`, or an integer index into it."""
    index = {c: i for i, c in enumerate(class_names)}
    for lab in labels:
        if lab not in index and lab.lstrip("-").isdigit() and 0 <= int(lab) < len(class_names):
            index[lab] = int(lab)
    return index


def _group(items: list[tuple], channels: int, size: int, source: str,
           class_names: tuple[str, ...] = ()) -> PairData:
    """(where, image path, caption[, label]) -> PairData, every image decoded once; bad items
    skipped. With labels, an image's class is its first row's; a row naming a class that is
    not in `class_names`, or another class than the image's earlier rows, is skipped."""
    skipped: list[dict[str, str]] = []
    by_image: dict[Path, list[str]] = {}
    label_of: dict[Path, str] = {}
    with_labels = any(len(it) > 3 and it[3] is not None for it in items)
    # without class names every label is its own class (the sorted names of the pairs kept)
    index = _class_index({it[3] for it in items if len(it) > 3 and it[3] is not None}, class_names) \
        if class_names else None
    same = (lambda a, b: a == b) if index is None else (lambda a, b: index[a] == index[b])  # noqa: E731
    for it in items:
        where, img, cap = it[:3]
        label = it[3] if len(it) > 3 else None
        if cap.startswith("\0"):
            skipped.append({"item": where, "reason": cap[1:]})
        elif not cap.strip():
            skipped.append({"item": where, "reason": f"empty caption for {img}"})
        elif with_labels and index is not None and label not in index:
            skipped.append({"item": where, "reason": f"label {label!r} is not a class name or index of the class "
                                                     f"names file ({len(class_names)} classes)"})
        elif with_labels and img in label_of and not same(label_of[img], label):
            skipped.append({"item": where, "reason": f"label {label!r} differs from {label_of[img]!r} given "
                                                     f"earlier for {img}"})
        else:
            by_image.setdefault(img, []).append(cap.strip())
            if with_labels:
                label_of.setdefault(img, label)
    images, caps, kept = [], [], []
    for img, cs in by_image.items():
        try:
            images.append(decode_image(img, channels, size))
            caps.append(cs)
            kept.append(img)
        except ValueError as e:
            skipped.append({"item": str(img), "reason": str(e)})
    names: tuple[str, ...] = ()
    if with_labels:
        names = class_names or tuple(sorted({label_of[img] for img in kept}))
        index = index if index is not None else {c: i for i, c in enumerate(names)}
    for s in skipped:
        log.warning("skipped %s: %s", s["item"], s["reason"])
    if not images:
        raise ValueError(f"{source}: no valid image-caption pair ({len(skipped)} item(s) skipped, e.g. "
                         f"{skipped[0] if skipped else 'none'}); check the paths and the caption columns")
    labels = torch.tensor([index[label_of[img]] for img in kept], dtype=torch.long) if with_labels else None
    return PairData(torch.stack(images), caps, labels, tuple(names), source, skipped)


def load_caption_table(path: str | Path, image_root: str | Path | None = None, image_col: str = "image",
                       caption_col: str = "caption", sep: str | None = None, channels: int = 1,
                       size: int = 16, label_col: str | None = None,
                       class_names: tuple[str, ...] = ()) -> PairData:
    """A CSV/TSV/JSONL of (image path, caption[, label]) rows; paths relative to `image_root`
    (default: the file's folder). Several rows may name one image (several captions).
    `label_col`: the column with each image's class (a name, or an index into `class_names`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"caption file {path} does not exist; pass a CSV/TSV/JSONL with columns "
                                f"{image_col!r} and {caption_col!r}")
    root = Path(image_root) if image_root is not None else path.parent
    rows = _read_table(path, image_col, caption_col, sep, label_col)
    items = [(f"{path.name}:{n}", root / img if img else root / "<no image named>", cap, lab)
             for n, img, cap, lab in rows]
    return _group(items, channels, size, str(path), tuple(class_names))


def load_pair_folder(folder: str | Path, channels: int = 1, size: int = 16) -> PairData:
    """A folder (searched recursively) of pairs: each image (`IMAGE_SUFFIXES`) with a text file
    of the same name and `.txt` suffix beside it (`cat.png` + `cat.txt`), one caption per
    non-empty line. An image without its text file, or a text file without its image, is
    skipped and named."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"folder {folder} does not exist")
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    texts = [p for p in files if p.suffix.lower() == ".txt"]
    if not images:
        raise ValueError(f"{folder} holds no image ({', '.join(IMAGE_SUFFIXES)}); a folder of pairs needs each image "
                         f"with a caption file of the same name (cat.png + cat.txt)")
    items: list[tuple] = []
    for img in images:
        txt = img.with_suffix(".txt")
        where = str(img.relative_to(folder))
        if not txt.is_file():
            items.append((where, img, f"\0no caption file {txt.name} beside the image"))
            continue
        try:
            lines = [x.strip() for x in txt.read_text(encoding="utf-8").splitlines() if x.strip()]
        except UnicodeDecodeError:
            items.append((where, img, f"\0caption file {txt.name} is not UTF-8 text"))
            continue
        items += [(where, img, line) for line in lines] or [(where, img, "")]
    stems = {img.with_suffix("") for img in images}
    items += [(str(t.relative_to(folder)), t, "\0caption file without an image of the same name")
              for t in texts if t.with_suffix("") not in stems]
    return _group(items, channels, size, str(folder))


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
               caption_col: str = "caption", sep: str | None = None, channels: int = 1, size: int = 16,
               label_col: str | None = None, class_names: tuple[str, ...] = ()) -> PairData:
    """'digits', a folder of pairs, a COCO captions JSON (a .json holding 'annotations'), or a
    CSV/TSV/JSONL caption table (`label_col`: its class column)."""
    if source == "digits":
        return load_digits_pairs()
    p = Path(source)
    if p.is_dir():
        if label_col is not None:
            raise ValueError(f"{p} is a folder of pairs, which has no label column; drop label_col (--label-col) "
                             f"or give a CSV/JSONL with a label column")
        if image_root is not None:
            raise ValueError(f"{p} is a folder of pairs (images beside their .txt captions); image_root "
                             f"(--image-root) is for caption tables, drop it")
        return load_pair_folder(p, channels, size)
    if p.suffix.lower() == ".json" and p.is_file():
        head = p.read_text(encoding="utf-8")[:1_000_000]
        if '"annotations"' in head:
            if label_col is not None:
                raise ValueError(f"{p} is COCO captions JSON, which has no label column; drop label_col "
                                 f"(--label-col)")
            return load_coco(p, image_root, channels, size)
    return load_caption_table(p, image_root, image_col, caption_col, sep, channels, size, label_col, class_names)


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
