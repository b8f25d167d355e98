"""The aligned model: bidirectional image encoder, pooling, momentum update, queue, loss wiring."""

import copy
import math

import pytest
import torch

from autoglm.multimodal.encoders import ImageEncoder, pool
from autoglm.multimodal.losses import clip_loss, itc_loss
from autoglm.multimodal.model import LossConfig

from .helpers import tiny_align_model, tiny_image_cfg


def test_image_encoder_attends_both_ways():
    # the [CLS] token comes first: under causal attention it could not see any patch
    enc = ImageEncoder(tiny_image_cfg()).eval()
    x = torch.rand(2, 1, 8, 8)
    y = x.clone()
    y[:, :, 4:, 4:] += 0.5  # only the last patch changes
    assert not torch.allclose(enc(x), enc(y), atol=1e-4)


def test_image_encoder_block_equals_dense_bidirectional_attention():
    enc = ImageEncoder(tiny_image_cfg()).eval()
    blk = enc.blocks[0]
    x = torch.randn(2, 5, 32)
    from autoglm.multimodal.encoders import bidirectional_metadata

    got, _ = blk(x, bidirectional_metadata(2, 5, x.device))
    a = blk.self_attn
    h = blk.input_layernorm(x)
    q = a.q_proj(h).view(2, 5, a.n_heads, a.head_dim).transpose(1, 2)
    k = a.k_proj(h).view(2, 5, a.n_kv, a.head_dim).transpose(1, 2).repeat_interleave(a.n_heads // a.n_kv, 1)
    v = a.v_proj(h).view(2, 5, a.n_kv, a.head_dim).transpose(1, 2).repeat_interleave(a.n_heads // a.n_kv, 1)
    att = (q @ k.transpose(-1, -2) / math.sqrt(a.head_dim)).softmax(-1) @ v  # no mask at all
    x1 = x + a.o_proj(att.transpose(1, 2).reshape(2, 5, -1))
    ref = x1 + blk.mlp(blk.post_attention_layernorm(x1))
    assert torch.allclose(got, ref, atol=1e-5)


def test_moe_image_encoder_reports_aux_loss():
    enc = ImageEncoder(tiny_image_cfg(num_experts=4))
    enc(torch.rand(3, 1, 8, 8))
    assert float(enc.aux_loss.detach()) > 0


def test_pool_last_and_mean():
    h = torch.arange(24.0).view(2, 4, 3)
    m = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    assert torch.equal(pool(h, m, "last"), torch.stack([h[0, 1], h[1, 3]]))
    assert torch.allclose(pool(h, m, "mean"), torch.stack([h[0, :2].mean(0), h[1].mean(0)]))


def test_plain_model_loss_is_clip_loss_of_its_embeddings():
    model = tiny_align_model(momentum=0.0).eval()
    imgs, ids, mask = torch.rand(4, 1, 8, 8), torch.randint(2, 300, (4, 6)), torch.ones(4, 6, dtype=torch.long)
    out = model(imgs, ids, mask)
    ref = clip_loss(model.embed_images(imgs), model.embed_texts(ids, mask), torch.tensor(1 / 0.07))
    assert out["contrastive"].item() == pytest.approx(ref.item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx(ref.item() + out["aux_loss"].item(), rel=1e-5)  # + MoE aux
    assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)


def test_logit_scale_is_clamped_at_100():
    model = tiny_align_model(momentum=0.0)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(500.0))
    assert model.scale().item() == pytest.approx(100.0)


def test_momentum_update_is_an_ema_and_queue_wraps():
    model = tiny_align_model(momentum=0.9, queue=6).train()
    before = copy.deepcopy(model.momentum_towers.state_dict())
    with torch.no_grad():
        for p in model.image_proj.parameters():
            p.add_(1.0)
    imgs, ids, mask = torch.rand(4, 1, 8, 8), torch.randint(2, 300, (4, 6)), torch.ones(4, 6, dtype=torch.long)
    # first step: empty queue -> the loss is itc over the batch only, with the updated momentum towers
    out = model(imgs, ids, mask)
    w_m = model.momentum_towers["image_proj"].weight
    assert torch.allclose(w_m, 0.9 * before["image_proj.weight"] + 0.1 * model.image_proj.weight.detach(), atol=1e-6)
    assert int(model.queue_filled) == 4 and int(model.queue_ptr) == 4
    model.eval()
    with torch.no_grad():
        img_m, txt_m = model._momentum_embed(imgs, ids, mask)
        img, txt = model.image_proj(model.image_encoder(imgs)), model.text_proj(model.text_encoder(ids, mask))
    assert torch.allclose(model.image_queue[:4], img_m, atol=1e-5)  # enqueued what the momentum towers gave
    model.train()
    e = torch.zeros(0, 16)
    assert out["contrastive"].item() == pytest.approx(itc_loss(img, txt, img_m, txt_m, e, e, model.scale()).item(),
                                                      rel=1e-4)
    model(imgs[:3], ids[:3], mask[:3])  # 4 + 3 > 6: the pointer wraps
    assert int(model.queue_filled) == 6 and int(model.queue_ptr) == 1


def test_loss_config_checks():
    with pytest.raises(ValueError, match="momentum"):
        LossConfig(momentum=0.0, distill_alpha=0.4)
    with pytest.raises(ValueError, match="temperature"):
        LossConfig(temperature=0.001)


@pytest.mark.parametrize("how", ["ignore", "same_caption", "same_label"])
def test_false_negatives_setting_picks_the_positives(how):
    from autoglm.multimodal.losses import clip_loss

    model = tiny_align_model(momentum=0.0).eval()
    model.loss_cfg = LossConfig(embed_dim=16, momentum=0.0, false_negatives=how)
    # captions 0 and 2 are one text (padding differs in length only where the mask is 0); 1 and 3 share a class
    ids = torch.tensor([[5, 6, 7, 0], [5, 6, 8, 9], [5, 6, 7, 3], [10, 11, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]])
    labels = torch.tensor([4, 1, 4, 1])
    imgs = torch.rand(4, 1, 8, 8)
    want = {"ignore": None,
            "same_caption": torch.tensor([[1, 0, 1, 0], [0, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 1]]).bool(),
            "same_label": (labels[:, None] == labels[None])}[how]
    got = model.positives(ids, mask, labels)
    assert (got is None) if want is None else torch.equal(got, want)
    ref = clip_loss(model.embed_images(imgs), model.embed_texts(ids, mask), torch.tensor(1 / 0.07), want)
    assert model(imgs, ids, mask, labels)["contrastive"].item() == pytest.approx(ref.item(), rel=1e-5)
    if how == "same_label":
        with pytest.raises(ValueError, match="needs each image's class"):
            model.positives(ids, mask, None)


def test_logit_scale_at_the_clamp_still_learns():
    imgs, ids, mask = torch.rand(4, 1, 8, 8), torch.randint(2, 300, (4, 6)), torch.ones(4, 6, dtype=torch.long)
    grads = []
    for start in (math.log(500.0), math.log(100.0)):  # above the bound (as after an optimiser step) and at it
        model = tiny_align_model(momentum=0.0).train()
        with torch.no_grad():
            model.logit_scale.fill_(start)
        out = model(imgs, ids, mask)
        out["loss"].backward()
        assert model.logit_scale.item() == pytest.approx(math.log(100.0)) and out["logit_scale"].item() == \
            pytest.approx(100.0, rel=1e-5)
        grads.append(model.logit_scale.grad.item())
    assert grads[0] != 0 and grads[0] == pytest.approx(grads[1], rel=1e-5)  # the gradient is not cut at 100
