"""The contrastive losses against hand-written loops over the similarity matrix."""

import math

import pytest
import torch
import torch.nn.functional as F

from autoglm.multimodal.losses import clip_loss, itc_loss


def _naive_clip(img, txt, scale):
    img = [v / v.norm() for v in img]
    txt = [v / v.norm() for v in txt]
    B = len(img)
    total = 0.0
    for i in range(B):  # image i against every caption, then caption i against every image
        row = [float(scale * img[i] @ txt[j]) for j in range(B)]
        total += -(row[i] - math.log(sum(math.exp(r) for r in row)))
        col = [float(scale * txt[i] @ img[j]) for j in range(B)]
        total += -(col[i] - math.log(sum(math.exp(c) for c in col)))
    return total / (2 * B)


def _naive_itc(img, txt, img_m, txt_m, qi, qt, scale, alpha):
    n = lambda v: v / v.norm()  # noqa: E731
    B = len(img)
    keys_t = [n(v) for v in txt_m] + [n(v) for v in qt]
    keys_i = [n(v) for v in img_m] + [n(v) for v in qi]
    total = 0.0
    for q, qm, keys in ((img, img_m, keys_t), (txt, txt_m, keys_i)):
        for i in range(B):
            logits = [float(scale * n(q[i]) @ k) for k in keys]
            lse = math.log(sum(math.exp(x) for x in logits))
            mom = [float(scale * n(qm[i]) @ k) for k in keys]
            mlse = math.log(sum(math.exp(x) for x in mom))
            for j in range(len(keys)):
                target = alpha * math.exp(mom[j] - mlse) + (1 - alpha) * (1.0 if j == i else 0.0)
                total += -target * (logits[j] - lse)
    return total / (2 * B)


def test_clip_loss_matches_naive_loop():
    img, txt = torch.randn(6, 5), torch.randn(6, 5)
    assert clip_loss(img, txt, torch.tensor(14.3)).item() == pytest.approx(_naive_clip(img, txt, 14.3), rel=1e-5)


def test_clip_loss_hand_computed_and_symmetric():
    # orthonormal pairs, scale 1: every row is [1, 0] -> -log(e / (e + 1))
    e = torch.eye(2)
    assert clip_loss(e, e, torch.tensor(1.0)).item() == pytest.approx(math.log(math.e + 1) - 1, rel=1e-6)
    img, txt = torch.randn(4, 3), torch.randn(4, 3)
    assert clip_loss(img, txt, torch.tensor(3.0)).item() == pytest.approx(clip_loss(txt, img, torch.tensor(3.0)).item())


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_itc_loss_with_queue_matches_naive_loop(alpha):
    B, K, D = 4, 7, 5
    args = [torch.randn(B, D) for _ in range(4)] + [torch.randn(K, D), torch.randn(K, D)]
    got = itc_loss(*args, torch.tensor(10.0), alpha).item()
    assert got == pytest.approx(_naive_itc(*args, 10.0, alpha), rel=1e-5)


def test_itc_loss_reduces_to_clip_without_queue_and_momentum():
    img, txt = torch.randn(5, 4), torch.randn(5, 4)
    empty = torch.zeros(0, 4)
    got = itc_loss(img, txt, img, txt, empty, empty, torch.tensor(7.0), 0.0)
    assert got.item() == pytest.approx(clip_loss(img, txt, torch.tensor(7.0)).item(), rel=1e-6)


def test_itc_gradient_reaches_only_online_embeddings():
    img, txt = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    img_m, txt_m = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    itc_loss(img, txt, img_m.detach(), txt_m.detach(), torch.randn(2, 4), torch.randn(2, 4),
             torch.tensor(5.0), 0.4).backward()
    assert img.grad.abs().sum() > 0 and txt.grad.abs().sum() > 0
    assert img_m.grad is None and txt_m.grad is None
    assert torch.allclose(F.normalize(img, dim=-1).norm(dim=-1), torch.ones(3))


def _naive_with_positives(img, txt, scale, pos):
    """Both directions: row i's target spread evenly over the j with pos[i][j] (diagonal included)."""
    n = lambda v: v / v.norm()  # noqa: E731
    B = len(img)
    total = 0.0
    for a, b, p in ((img, txt, pos), (txt, img, [[pos[j][i] for j in range(B)] for i in range(B)])):
        for i in range(B):
            logits = [float(scale * n(a[i]) @ n(b[j])) for j in range(B)]
            lse = math.log(sum(math.exp(x) for x in logits))
            hits = [j for j in range(B) if p[i][j] or j == i]
            total += -sum(logits[j] - lse for j in hits) / len(hits)
    return total / (2 * B)


def test_false_negative_targets_match_a_loop():
    from autoglm.multimodal.losses import positive_targets

    img, txt = torch.randn(5, 4), torch.randn(5, 4)
    labels = torch.tensor([0, 1, 0, 2, 0])  # images 0, 2, 4 share a class: positives of each other
    pos = labels[:, None] == labels[None]
    ref = _naive_with_positives(img, txt, 8.0, pos.tolist())
    assert clip_loss(img, txt, torch.tensor(8.0), pos).item() == pytest.approx(ref, rel=1e-5)
    assert positive_targets(pos)[0].tolist() == pytest.approx([1 / 3, 0, 1 / 3, 0, 1 / 3])
    # no duplicates: the one-hot loss; with an empty queue, no momentum and alpha 0, itc = clip
    eye = torch.eye(5, dtype=torch.bool)
    assert clip_loss(img, txt, torch.tensor(8.0), eye).item() == pytest.approx(
        clip_loss(img, txt, torch.tensor(8.0)).item(), rel=1e-6)
    empty = torch.zeros(0, 4)
    got = itc_loss(img, txt, img, txt, empty, empty, torch.tensor(8.0), 0.0, pos)
    assert got.item() == pytest.approx(ref, rel=1e-5)
    # with a queue, its entries stay negatives (zero target) and the batch part is spread as above
    qi, qt = torch.randn(3, 4), torch.randn(3, 4)
    with_queue = itc_loss(img, txt, img, txt, qi, qt, torch.tensor(8.0), 0.0, pos)
    assert with_queue.item() > got.item()
