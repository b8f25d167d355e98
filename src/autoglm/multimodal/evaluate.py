"""Evaluating an aligned model: zero-shot classification with ensembled prompt templates,
image-to-text and text-to-image recall@K, and a supervised linear probe on the image
embeddings.

* zero-shot: each class's text embedding is the normalised mean of its prompts' unit
  embeddings (CLIP's prompt ensembling); an image is assigned the class of highest cosine.
* recall@K image->text: an image scores a hit when *any* of its captions is among the K
  captions most similar to it (every caption of every image is a candidate); text->image:
  a caption scores a hit when its image is among the K most similar images. A caption text
  that several images share (digits: one template, two sevens) is correct for each of them.
* linear probe: multinomial logistic regression (scikit-learn) on the frozen unit image
  embeddings; the inverse regularisation C is chosen on the validation split.

Example:
    >>> img = torch.eye(3); txt = torch.eye(3)
    >>> recall_at_k(img, txt, torch.eye(3, dtype=torch.bool), ks=(1,))
    {'i2t_r1': 100.0, 't2i_r1': 100.0}
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["encode_captions", "embed_images", "embed_texts", "class_embeddings", "zero_shot_accuracy",
           "recall_at_k", "caption_match", "retrieval", "linear_probe"]


def encode_captions(tokenizer: Any, texts: Sequence[str], max_len: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Texts -> (input_ids, attention_mask) (N, L), right-padded; each caption cut to
    `max_len - 1` tokens and closed with the end-of-text token (the pooled position)."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    enc = [ids[:max_len - 1] + [eos] for ids in tokenizer(list(texts), add_special_tokens=False).input_ids]
    L = max(len(e) for e in enc)
    x = torch.full((len(enc), L), pad, dtype=torch.long)
    m = torch.zeros((len(enc), L), dtype=torch.long)
    for i, e in enumerate(enc):
        x[i, :len(e)] = torch.tensor(e)
        m[i, :len(e)] = 1
    return x, m


@torch.no_grad()
def embed_images(model: Any, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """(N, C, H, W) -> (N, D) unit embeddings on the CPU (eval mode; the mode is restored)."""
    was, dev = model.training, next(model.parameters()).device
    model.eval()
    out = torch.cat([model.embed_images(images[i:i + batch_size].to(dev)).float().cpu()
                     for i in range(0, len(images), batch_size)])
    model.train(was)
    return out


@torch.no_grad()
def embed_texts(model: Any, tokenizer: Any, texts: Sequence[str], max_len: int = 32,
                batch_size: int = 256) -> torch.Tensor:
    """Texts -> (N, D) unit embeddings on the CPU."""
    was, dev = model.training, next(model.parameters()).device
    model.eval()
    outs = []
    for i in range(0, len(texts), batch_size):
        ids, mask = encode_captions(tokenizer, texts[i:i + batch_size], max_len)
        outs.append(model.embed_texts(ids.to(dev), mask.to(dev)).float().cpu())
    model.train(was)
    return torch.cat(outs)


def class_embeddings(model: Any, tokenizer: Any, class_names: Sequence[str], templates: Sequence[str],
                     max_len: int = 32) -> torch.Tensor:
    """(num_classes, D): per class the normalised mean of its prompts' unit embeddings.
    A template may use {name} (the class name) and {digit} (the class index)."""
    prompts = [t.format(name=c, digit=i) for i, c in enumerate(class_names) for t in templates]
    e = embed_texts(model, tokenizer, prompts, max_len).view(len(class_names), len(templates), -1)
    return F.normalize(e.mean(1), dim=-1)


def zero_shot_accuracy(img: torch.Tensor, classes: torch.Tensor, labels: torch.Tensor) -> float:
    """Percent of images whose most similar class embedding is their label. img (N, D), classes (C, D)."""
    pred = (img @ classes.T).argmax(-1)
    return 100.0 * float((pred == labels).float().mean())


def recall_at_k(img: torch.Tensor, txt: torch.Tensor, match: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """img (N, D) unit, txt (M, D) unit, match (N, M) bool: caption j is a correct caption of
    image i. -> {"i2t_r{k}", "t2i_r{k}"} in percent: an image scores when a correct caption is
    among its k nearest captions; a caption scores when a correct image is among its k nearest."""
    sim = img @ txt.T  # (N, M)
    out = {}
    for k in ks:
        top_t = sim.topk(min(k, sim.shape[1]), dim=1).indices  # (N, k) caption ids
        out[f"i2t_r{k}"] = 100.0 * float(match.gather(1, top_t).any(1).float().mean())
    for k in ks:
        top_i = sim.T.topk(min(k, sim.shape[0]), dim=1).indices  # (M, k) image ids
        out[f"t2i_r{k}"] = 100.0 * float(match.T.gather(1, top_i).any(1).float().mean())
    return out


def caption_match(captions: Sequence[Sequence[str]]) -> tuple[list[str], torch.Tensor]:
    """Every caption of every image, and the (N, M) matrix of correct pairs: image i and
    caption j match when caption j's text is one of image i's captions. Identical caption
    texts of different images (digits: the same template for two sevens) are equally correct,
    so a duplicate is never counted as a miss."""
    texts = [c for cs in captions for c in cs]
    vocab = {t: j for j, t in enumerate(dict.fromkeys(texts))}
    text_id = torch.tensor([vocab[t] for t in texts])
    has = torch.zeros(len(captions), len(vocab), dtype=torch.bool)
    for i, cs in enumerate(captions):
        has[i, [vocab[c] for c in cs]] = True
    return texts, has[:, text_id]


def retrieval(model: Any, tokenizer: Any, images: torch.Tensor, captions: Sequence[Sequence[str]],
              ks: Sequence[int] = (1, 5), max_len: int = 32) -> dict[str, float]:
    """`recall_at_k` with every caption of every image as a candidate (`caption_match`)."""
    texts, match = caption_match(captions)
    return recall_at_k(embed_images(model, images), embed_texts(model, tokenizer, texts, max_len), match, ks)


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                 test_x: torch.Tensor, test_y: torch.Tensor,
                 cs: Sequence[float] = (0.1, 1.0, 10.0, 100.0)) -> dict[str, float]:
    """Logistic regression on frozen features; C chosen on validation accuracy.
    -> {"val_acc", "test_acc" (percent), "C"}."""
    from sklearn.linear_model import LogisticRegression

    best: dict[str, float] | None = None
    for c in cs:
        clf = LogisticRegression(C=c, max_iter=2000)
        clf.fit(train_x.numpy(), train_y.numpy())
        val = 100.0 * float(np.mean(clf.predict(val_x.numpy()) == val_y.numpy()))
        if best is None or val > best["val_acc"]:
            test = 100.0 * float(np.mean(clf.predict(test_x.numpy()) == test_y.numpy()))
            best = {"val_acc": val, "test_acc": test, "C": c}
    assert best is not None
    return best
