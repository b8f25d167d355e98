"""Image-conditioned generation (LLaVA-style): the aligned image encoder's embedding goes
through a small MLP into `prefix_tokens` vectors of the language model's width, which take
the place of the first prompt tokens' embeddings. Only the MLP trains; the language model
and the image encoder stay frozen.

The projector is an adapter type of the registry (`autoglm.adapters`, "image-prefix"):
saved under `<lm run>/adapters/<name>/` (adapter_config.json + adapter.safetensors, the frozen
image encoder included so the folder is self-contained), loaded by `load_image_projector`.

Prompts of an image request are `prefix_tokens` placeholder ids (the pad token) followed by
the text; the embeddings of the placeholders are replaced:

* training and `caption_logits`: a forward hook on the embedding table (`image_prefix`);
* the inference engine: `Request.prefix_embeds`, which the runner writes over the embedded
  rows of those positions during the prefill.

Example:
    >>> from autoglm.multimodal.encoders import ImageEncoderConfig
    >>> p = ImagePrefixProjector(ImageEncoderConfig(image_size=8, patch_size=4, dim=16, layers=1, heads=2).to_dict(),
    ...                          embed_dim=8, lm_hidden=32, prefix_tokens=3, hidden=16)
    >>> p(torch.rand(2, 1, 8, 8)).shape
    torch.Size([2, 3, 32])
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import adapter_type, load_adapter
from ..settings import from_dict
from .data import DIGIT_NAMES
from .encoders import ImageEncoder, ImageEncoderConfig

__all__ = ["ImagePrefixProjector", "image_prefix", "load_image_projector", "names_digit", "names_class",
           "train_image_projector",
           "caption_images", "generate_with_image", "image_tensor", "PROJECTOR_HELP"]

log = logging.getLogger(__name__)
PROJECTOR_HELP = "train one with `autoglm align projector --align-dir ALIGNED --lm {lm}`"


@adapter_type("image-prefix")
class ImagePrefixProjector(nn.Module):
    """(B, C, H, W) images -> (B, prefix_tokens, lm_hidden) prefix embeddings."""

    def __init__(self, image: dict[str, Any], embed_dim: int, lm_hidden: int, prefix_tokens: int = 4,
                 hidden: int = 256) -> None:
        super().__init__()
        if prefix_tokens < 1:
            raise ValueError(f"prefix_tokens must be >= 1, got {prefix_tokens}")
        self.init_kwargs = {"image": image, "embed_dim": embed_dim, "lm_hidden": lm_hidden,
                            "prefix_tokens": prefix_tokens, "hidden": hidden}
        self.image_cfg = from_dict(ImageEncoderConfig, image)
        self.prefix_tokens, self.lm_hidden = prefix_tokens, lm_hidden
        self.image_encoder = ImageEncoder(self.image_cfg)
        self.image_proj = nn.Linear(self.image_cfg.dim, embed_dim, bias=False)
        self.mlp = nn.Sequential(nn.Linear(embed_dim, hidden), nn.GELU(), nn.Linear(hidden, prefix_tokens * lm_hidden))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # the aligned encoder is frozen
            e = F.normalize(self.image_proj(self.image_encoder(images)), dim=-1)
        return self.mlp(e).view(len(images), self.prefix_tokens, self.lm_hidden)

    @torch.no_grad()
    def prefix_for(self, source: str | Path | bytes) -> torch.Tensor:
        """The (prefix_tokens, lm_hidden) prefix of one image file (or its bytes), on the
        projector's device; ValueError naming the problem for an unreadable or corrupt image.
        The server calls this, so it needs nothing from this package but the object."""
        x = image_tensor(source, self).to(next(self.parameters()).device)
        return self(x)[0]


@contextlib.contextmanager
def image_prefix(lm: nn.Module, prefix: torch.Tensor) -> Iterator[None]:
    """Within the block, the LM's embedding of positions 0..P-1 is `prefix` (B, P, d) (rows of the
    embedded input_ids; a forward of a batch of B sequences starting at position 0)."""
    def hook(_mod, _inp, out):
        return torch.cat([prefix.to(out.dtype), out[:, prefix.shape[1]:]], 1)

    handle = lm.model.embed_tokens.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def load_image_projector(lm_dir: str | Path, name: str = "image") -> ImagePrefixProjector:
    """The projector saved under `lm_dir/adapters/name`; ValueError saying how to make one."""
    path = Path(lm_dir) / "adapters" / name
    if not (path / "adapter_config.json").is_file():
        raise ValueError(f"{lm_dir} has no image projector (no {path}); {PROJECTOR_HELP.format(lm=lm_dir)}")
    module = load_adapter(path)
    if not isinstance(module, ImagePrefixProjector):
        raise ValueError(f"adapter {path} is a {type(module).__name__}, not an image projector")
    return module.eval()


_WORDS = {w: i for i, w in enumerate(DIGIT_NAMES)}


def names_digit(text: str, digit: int) -> bool:
    """True when `text` names `digit` (its word or numeral) and no other digit."""
    found = {_WORDS[w] for w in re.findall(r"[a-z]+", text.lower()) if w in _WORDS}
    found |= {int(c) for c in re.findall(r"(?<!\d)\d(?!\d)", text)}
    return found == {digit}


def _words(text: str) -> str:
    return " " + " ".join(re.findall(r"\w+", text.lower())) + " "


def names_class(text: str, label: int, class_names: tuple[str, ...] | list[str]) -> bool:
    """True when `text` names class `label` and no other class: `names_digit` for the digits,
    else each class name as whole words, case-insensitive (a name inside a longer one that is
    named, "red" in "dark red", does not count)."""
    if tuple(class_names) == DIGIT_NAMES:
        return names_digit(text, label)
    low = _words(text)
    found = {i for i, c in enumerate(class_names) if _words(c).strip() and _words(c) in low}
    found = {i for i in found if not any(j != i and _words(class_names[i]) in _words(class_names[j])
                                         for j in found)}
    return found == {label}


def _caption_batch(tok: Any, captions: list[str], prefix: int, pad: int, end: list[int]):
    """(input_ids, labels) (B, P + L): placeholders, caption, the `end` tokens; labels predict the
    caption and the end (HF convention: the model shifts them), -100 on the placeholders and padding."""
    enc = [ids + end for ids in tok(captions, add_special_tokens=False).input_ids]
    L = max(map(len, enc))
    x = torch.full((len(enc), prefix + L), pad, dtype=torch.long)
    y = torch.full_like(x, -100)
    for i, e in enumerate(enc):
        x[i, prefix:prefix + len(e)] = torch.tensor(e)
        y[i, prefix:prefix + len(e)] = torch.tensor(e)
    return x, y


class PrefixCaptionObjective:
    """Next-token loss of the caption after the image prefix; only the projector's MLP trains."""

    def __init__(self, lm: nn.Module) -> None:
        self.lm = lm

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        prefix = model(batch["images"])
        with image_prefix(self.lm, prefix):
            out = self.lm(batch["input_ids"], labels=batch["labels"])
        return {"loss": out.loss}

    def __repr__(self) -> str:
        return "PrefixCaptionObjective(frozen LM)"


def image_tensor(source: str | Path | bytes, projector: ImagePrefixProjector) -> torch.Tensor:
    """An image file (or its bytes) as the (1, C, S, S) input of `projector`'s encoder; ValueError
    naming the problem for an unreadable or corrupt image."""
    import io

    from .data import decode_image

    cfg = projector.image_cfg
    return decode_image(io.BytesIO(source) if isinstance(source, bytes) else Path(source), cfg.channels,
                        cfg.image_size)[None]


@torch.no_grad()
def generate_with_image(lm: nn.Module, tok: Any, run_dir: str | Path, image: str | Path, prompt: str = "",
                        max_new_tokens: int = 20, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                        seed: int = 0, name: str = "image") -> str:
    """`autoglm generate RUN --image FILE`: the continuation of (image prefix, prompt), decoded."""
    from ..inference import EngineConfig, LLMEngine, SamplingParams

    projector = load_image_projector(run_dir, name)
    if not Path(image).is_file():
        raise FileNotFoundError(f"image {image} does not exist")
    try:
        prefix = projector.prefix_for(image)
    except ValueError as e:
        raise ValueError(f"image {image}: {e}") from None
    pad = tok.pad_token_id if tok.pad_token_id is not None else 1
    ids = [pad] * projector.prefix_tokens + (tok(prompt, add_special_tokens=False).input_ids if prompt else [])
    limit = lm.config.max_position_embeddings
    if len(ids) + max_new_tokens > limit:
        raise ValueError(f"image prefix + prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"the model's context of {limit} tokens; shorten the prompt or lower --max-new-tokens")
    engine = LLMEngine(lm, tok, EngineConfig(block_size=16, num_blocks=-(-limit // 16) + 1))
    rid = engine.add_request(ids, SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                                 top_p=top_p, seed=seed, prefix_embeds=prefix))
    req = engine.core.requests[rid]
    while engine.has_unfinished():
        engine.step()
    return (prompt + tok.decode(req.output_ids, skip_special_tokens=True)).strip()


@torch.no_grad()
def caption_images(lm: nn.Module, tok: Any, projector: ImagePrefixProjector | None, images: torch.Tensor,
                   max_new_tokens: int = 12, prompt: str = "", stop: str = "") -> list[str]:
    """Greedy captions through the inference engine (`Request.prefix_embeds`), each ended at `stop`
    (when given) or the end-of-text token; projector None: the same prompt with the placeholders'
    own embeddings (no image)."""
    from ..inference import EngineConfig, LLMEngine, SamplingParams

    P = projector.prefix_tokens if projector is not None else 4
    pad = tok.pad_token_id if tok.pad_token_id is not None else 1
    ids = [pad] * P + (tok(prompt, add_special_tokens=False).input_ids if prompt else [])
    engine = LLMEngine(lm, tok, EngineConfig(block_size=16, num_blocks=max(64, len(images) * 2 + 8)))
    params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0, stop=[stop] if stop else [])
    dev = next(lm.parameters()).device
    prefixes = projector.to(dev)(images.to(dev)) if projector is not None else None
    rids = []
    for i in range(len(images)):
        rid = engine.add_request(list(ids), params)
        if prefixes is not None:  # the image's embeddings replace the placeholders' during the prefill
            engine.core.requests[rid].prefix_embeds = prefixes[i]
        rids.append(rid)
    reqs = {rid: engine.core.requests[rid] for rid in rids}
    while engine.has_unfinished():
        engine.step()
    return [tok.decode(reqs[r].output_ids, skip_special_tokens=True).strip() for r in rids]


def train_image_projector(cfg: Any, progress: bool = True, console: Any = None) -> dict[str, Any]:
    """`autoglm align projector`: build the projector from the aligned model's image tower, train
    its MLP on (image, caption) pairs with the language model frozen, save it under
    LM/adapters/NAME, and score greedy captions of held-out test images (share naming the right
    digit, with and without the image)."""
    from ..adapters import check_name, save_adapter
    from ..recipes.align import load_split, run_data, run_stratified
    from ..rundir import RunDir
    from ..training import SingleDevice, Trainer
    from .augment import random_resized_crop
    from .store import load_aligned

    check_name(cfg.name)
    aligned, _, meta = load_aligned(cfg.align_dir)
    lm, tok = RunDir.open(cfg.lm, role="language model").load()
    lm.requires_grad_(False)
    proj = ImagePrefixProjector(aligned.image_cfg.to_dict(), aligned.loss_cfg.embed_dim, lm.config.hidden_size,
                                cfg.prefix_tokens, cfg.hidden)
    proj.image_encoder.load_state_dict(aligned.image_encoder.state_dict())
    proj.image_proj.load_state_dict(aligned.image_proj.state_dict())
    proj.image_encoder.requires_grad_(False)
    proj.image_proj.requires_grad_(False)
    d = run_data(cfg.data, meta, word_mask=0.0)  # no data option given: the aligned run's data and split
    split = load_split(d, aligned.image_cfg.channels, aligned.image_cfg.image_size, run_stratified(d, meta))
    train, t = split["train"], cfg.train
    pad, eos = (tok.pad_token_id if tok.pad_token_id is not None else 1), tok.eos_token_id or 0
    # a caption ends the way the language model's text ends a line (a newline for a model trained on
    # one caption per line), or with the end-of-text token when caption_end is ''
    end = tok(cfg.caption_end, add_special_tokens=False).input_ids if cfg.caption_end else [eos]
    n, B = len(train), min(cfg.train.batch_size, len(train))

    def batch(i: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([t.seed, i])
        g = torch.Generator().manual_seed(int(rng.integers(2**62)))
        idx = rng.choice(n, B, replace=False)
        caps = [train.captions[j][int(rng.integers(len(train.captions[j])))] for j in idx]
        x, y = _caption_batch(tok, caps, cfg.prefix_tokens, pad, end)
        imgs = random_resized_crop(train.images[torch.from_numpy(idx)], aligned.image_cfg.image_size, d.crop_scale,
                                   generator=g)
        return {"images": imgs, "input_ids": x, "labels": y}

    torch.manual_seed(t.seed)
    lm.to(SingleDevice(cfg.device).device)
    trainer = Trainer(proj, t, train_batch=batch, objective=PrefixCaptionObjective(lm),
                      strategy=SingleDevice(cfg.device), progress=progress, console=console)
    res = trainer.fit()
    proj.eval()
    out_dir = save_adapter(proj, Path(cfg.lm) / "adapters" / cfg.name)
    test = split[cfg.eval_split]
    k = min(cfg.eval_samples, len(test))
    result: dict[str, Any] = {"adapter_dir": str(out_dir), "steps": res.steps, "seconds": round(res.elapsed, 1),
                              "final_loss": next((r["loss"] for r in reversed(res.history) if "loss" in r), None),
                              "eval_images": k, "eval_split": cfg.eval_split}
    if test.labels is not None and k:
        with_img = caption_images(lm, tok, proj, test.images[:k], stop=cfg.caption_end)
        without = caption_images(lm, tok, None, test.images[:k], stop=cfg.caption_end)
        ys = test.labels[:k].tolist()
        names = split["class_names"]  # a caption scores when it names its image's class (digits: word or numeral)
        result["caption_acc"] = 100.0 * float(np.mean([names_class(c, y, names) for c, y in zip(with_img, ys)]))
        result["caption_acc_no_image"] = 100.0 * float(np.mean([names_class(c, y, names)
                                                                for c, y in zip(without, ys)]))
        result["samples"] = [{"label": y, "caption": c} for c, y in list(zip(with_img, ys))[:10]]
    return result
