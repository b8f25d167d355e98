"""Augmentations: the crop against a direct bilinear resample, flips, word masking."""

import pytest
import torch
import torch.nn.functional as F

from autoglm.multimodal.augment import crop_boxes, mask_words, random_hflip, random_resized_crop


def test_full_crop_is_a_plain_resize():
    img = torch.rand(3, 1, 8, 8)
    out = random_resized_crop(img, 16, scale=(1.0, 1.0), ratio=(1.0, 1.0), generator=torch.Generator().manual_seed(0))
    ref = F.interpolate(img, size=(16, 16), mode="bilinear", align_corners=False)
    assert torch.allclose(out, ref, atol=1e-5)


def test_crop_takes_the_box_it_draws():
    # a 4x4 crop of a 16x16 image at an integer place equals slicing, when resized to 4x4 at pixel centres
    g = torch.Generator().manual_seed(3)
    img = torch.arange(256.0).view(1, 1, 16, 16)
    box = crop_boxes(1, (1 / 16, 1 / 16), (1.0, 1.0), torch.Generator().manual_seed(3))[0]
    out = random_resized_crop(img, 4, scale=(1 / 16, 1 / 16), ratio=(1.0, 1.0), generator=g)
    cx, cy, w, h = box.tolist()
    assert w == pytest.approx(0.25) and h == pytest.approx(0.25)
    x0, y0 = (cx - w / 2) * 16, (cy - h / 2) * 16  # left/top edge in pixels
    # the output pixel centres sit at x0 + 0.5 .. x0 + 3.5: bilinear between the input pixel centres
    xs = x0 + torch.arange(4) + 0.5 - 0.5
    ys = y0 + torch.arange(4) + 0.5 - 0.5
    ref = (ys[:, None].clamp(0, 15) * 16 + xs[None, :].clamp(0, 15))  # value = 16 * y + x is linear
    assert torch.allclose(out[0, 0], ref, atol=1e-3)


def test_crop_boxes_stay_inside_and_respect_area():
    b = crop_boxes(500, (0.3, 0.9), (0.75, 4 / 3), torch.Generator().manual_seed(0))
    cx, cy, w, h = b.unbind(1)
    assert bool(((cx - w / 2) >= -1e-6).all() and ((cx + w / 2) <= 1 + 1e-6).all())
    assert bool(((cy - h / 2) >= -1e-6).all() and ((cy + h / 2) <= 1 + 1e-6).all())
    assert float((w * h).min()) >= 0.3 * 0.75 - 1e-6 and float((w * h).max()) <= 0.9 + 1e-6
    with pytest.raises(ValueError, match="scale"):
        crop_boxes(1, (0.0, 1.0), (1.0, 1.0))


def test_flip_and_word_mask():
    img = torch.rand(4, 1, 5, 5)
    assert torch.equal(random_hflip(img, 1.0), img.flip(-1))
    assert torch.equal(random_hflip(img, 0.0), img)
    with pytest.raises(ValueError, match="probability"):
        random_hflip(img, 1.5)
    g = torch.Generator().manual_seed(0)
    assert mask_words("a photo of seven", 0.0, g) == "a photo of seven"
    one = mask_words("a photo of seven", 1.0, g)
    assert len(one.split()) == 1 and one in "a photo of seven".split()
    kept = [len(mask_words("w " * 100, 0.3, g).split()) for _ in range(20)]
    assert 60 < sum(kept) / len(kept) < 80


def test_a_part_of_the_batch_gets_the_rows_of_the_whole_batch_and_moves_the_generator_alike():
    """A data-parallel rank transforms only its rows (`part`) and gets what one process gets for
    those rows, and the generator ends where the whole batch leaves it."""
    imgs = torch.rand(6, 3, 8, 8)
    g_all, g_part = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    whole = random_hflip(random_resized_crop(imgs, 8, generator=g_all), 0.5, g_all)
    rows = slice(3, 6)
    part = random_hflip(random_resized_crop(imgs[rows], 8, generator=g_part, part=(6, rows)), 0.5, g_part,
                        part=(6, rows))
    assert torch.equal(part, whole[rows])
    assert torch.equal(torch.rand(3, generator=g_part), torch.rand(3, generator=g_all))
    with pytest.raises(ValueError, match=r"part=\(6, .*\) names 3 rows of a batch of 6, but 2 images"):
        random_resized_crop(imgs[:2], 8, part=(6, rows))
