"""Image and caption augmentations written with torch ops (torchvision does not install
beside the pinned torch). Pure functions of their inputs and a `torch.Generator`, so a
batch is reproducible from its index (exact resume).

* `random_resized_crop`: per image, a crop covering `scale` of the area with aspect ratio
  in `ratio` (log-uniform), at a random place, resized to `size` (bilinear, one batched
  `grid_sample`). The torchvision transform of the same name, batched.
* `random_hflip`: mirror each image with probability p (off for digits: a mirrored 2 is
  no 2).
* `mask_words`: drop each word of a caption with probability p (at least one word stays).

Example:
    >>> g = torch.Generator().manual_seed(0)
    >>> random_resized_crop(torch.rand(4, 1, 8, 8), 16, generator=g).shape
    torch.Size([4, 1, 16, 16])
    >>> mask_words("a photo of the digit seven", 0.0, g)
    'a photo of the digit seven'
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["random_resized_crop", "random_hflip", "mask_words", "crop_boxes"]


def _check_p(p: float, name: str = "p") -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p}")


def crop_boxes(n: int, scale: tuple[float, float], ratio: tuple[float, float],
               generator: torch.Generator | None = None) -> torch.Tensor:
    """(n, 4) crops as (cx, cy, w, h) in units of the image side (1 = whole image): area share
    uniform in `scale`, aspect ratio w/h log-uniform in `ratio`, clipped to fit, placed uniformly."""
    lo, hi = scale
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"scale must satisfy 0 < min <= max <= 1 (area shares), got {scale}")
    if not 0 < ratio[0] <= ratio[1]:
        raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio}")
    u = torch.rand(n, 4, generator=generator)
    area = lo + (hi - lo) * u[:, 0]
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
    r = log_r.exp()
    w = (area * r).sqrt().clamp(max=1.0)
    h = (area / r).sqrt().clamp(max=1.0)
    cx = w / 2 + (1 - w) * u[:, 2]
    cy = h / 2 + (1 - h) * u[:, 3]
    return torch.stack([cx, cy, w, h], 1)


def _part(images: torch.Tensor, part: tuple[int, slice] | None) -> tuple[int, slice]:
    """(batch size the draws are for, the rows of it that `images` hold)."""
    if part is None:
        return len(images), slice(None)
    n, rows = part
    if len(range(n)[rows]) != len(images):
        raise ValueError(f"part={part} names {len(range(n)[rows])} rows of a batch of {n}, but {len(images)} images "
                         f"were given")
    return n, rows


def random_resized_crop(images: torch.Tensor, size: int, scale: tuple[float, float] = (0.6, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3), generator: torch.Generator | None = None,
                        part: tuple[int, slice] | None = None) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, size, size), each image cropped (`crop_boxes`) and resized.
    `part=(n, rows)`: `images` are those rows of a batch of n; the crops are drawn for all n
    (the generator moves as for the whole batch) and each row gets its own, so a data-parallel
    rank transforms only its rows and still matches one process."""
    n, rows = _part(images, part)
    B = len(images)
    box = crop_boxes(n, scale, ratio, generator)[rows].to(images.device, images.dtype)
    cx, cy, w, h = box.unbind(1)
    theta = torch.zeros(B, 2, 3, dtype=images.dtype, device=images.device)
    # affine_grid works in [-1, 1] coordinates: output x maps to input cx' + w * x
    theta[:, 0, 0], theta[:, 0, 2] = w, 2 * cx - 1
    theta[:, 1, 1], theta[:, 1, 2] = h, 2 * cy - 1
    grid = F.affine_grid(theta, [B, images.shape[1], size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def random_hflip(images: torch.Tensor, p: float = 0.5, generator: torch.Generator | None = None,
                 part: tuple[int, slice] | None = None) -> torch.Tensor:
    """(B, C, H, W): each image mirrored left-right with probability p. `part`: as for
    `random_resized_crop`."""
    _check_p(p)
    n, rows = _part(images, part)
    if p == 0:
        return images
    flip = (torch.rand(n, generator=generator) < p)[rows]
    return torch.where(flip.to(images.device)[:, None, None, None], images.flip(-1), images)


def mask_words(text: str, p: float, generator: torch.Generator | None = None) -> str:
    """`text` with each whitespace-separated word dropped with probability p; at least one
    word is kept (a random one when all would go)."""
    _check_p(p)
    words = text.split()
    if p == 0 or len(words) <= 1:
        return text
    keep = torch.rand(len(words), generator=generator) >= p
    if not bool(keep.any()):
        keep[int(torch.randint(len(words), (1,), generator=generator))] = True
    return " ".join(w for w, k in zip(words, keep.tolist()) if k)
