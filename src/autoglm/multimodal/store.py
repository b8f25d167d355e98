"""Saving and loading an aligned model directory (what `autoglm align` writes and
`autoglm align eval`, the projector and Python load).

    out/
      align_config.json        image encoder, loss and text backbone configs, pooling, caption
                               length, class names and prompt templates, what is left out
      model.safetensors        online towers, projection heads, logit scale (no momentum
                               encoders, no queues: those live only in training checkpoints)
      tokenizer.json, ...      the caption tokenizer
      run.json, config.yaml, metrics.jsonl, checkpoints/   as for every run

Example:
    >>> import tempfile
    >>> load_aligned(tempfile.mkdtemp())  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    FileNotFoundError: ... is not an aligned model directory (it lacks align_config.json, model.safetensors); ...
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_files
from ..settings import ConfigError, from_dict
from .encoders import ImageEncoderConfig
from .model import AlignModel, LossConfig

__all__ = ["ALIGN_FILES", "save_aligned", "load_aligned", "open_aligned", "inference_state"]

ALIGN_FILES = ("align_config.json", "model.safetensors")
_TRAINING_ONLY = ("momentum_towers.", "image_queue", "text_queue", "queue_ptr", "queue_filled")


def inference_state(model: AlignModel) -> dict[str, torch.Tensor]:
    """The state dict without momentum encoders and queues."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
            if not k.startswith(_TRAINING_ONLY)}


def save_aligned(model: AlignModel, tokenizer: Any, out: str | Path, meta: dict[str, Any],
                 info: dict[str, Any] | None = None, config_yaml: str | None = None) -> Path:
    """Write the aligned model into `out` (each file by atomic rename; checkpoints stay).
    `meta`: extra align_config.json entries (pooling, max_len, class_names, templates)."""
    from safetensors.torch import save_file

    out = Path(out)
    cfg = {"format": "autoglm-align", "image": model.image_cfg.to_dict(),
           "loss": {k: getattr(model.loss_cfg, k) for k in LossConfig.__dataclass_fields__},
           "text": model.text_encoder.backbone.config.to_dict(), "pooling": model.text_encoder.pooling,
           "momentum_encoders_included": False, "queues_included": False, **meta}
    with atomic_files(out) as tmp:
        save_file(inference_state(model), str(tmp / "model.safetensors"))
        (tmp / "align_config.json").write_text(json.dumps(cfg, indent=1, default=str))
        tokenizer.save_pretrained(tmp)
        if info is not None:
            (tmp / "run.json").write_text(json.dumps(info, indent=2, default=str))
        if config_yaml is not None:
            (tmp / "config.yaml").write_text(config_yaml)
    return out


def open_aligned(path: str | Path) -> Path:
    """`path` if it holds an aligned model, else FileNotFoundError naming what is missing."""
    path = Path(path)
    missing = [f for f in ALIGN_FILES if not (path / f).is_file()]
    if missing:
        state = "does not exist" if not path.exists() else f"lacks {', '.join(missing)}"
        raise FileNotFoundError(f"{path} is not an aligned model directory (it {state}); train one with "
                                f"`autoglm align --out {path}`")
    return path


def load_aligned(path: str | Path, device: str | torch.device | None = None) -> tuple[AlignModel, Any, dict[str, Any]]:
    """(model in eval mode, tokenizer, align_config.json) of a directory `save_aligned` wrote."""
    from safetensors.torch import load_file

    from ..config import OpenAutoGLMConfig
    from ..model import AutoGLMBackbone
    from ..tokenizer import load_tokenizer

    path = open_aligned(path)
    meta = json.loads((path / "align_config.json").read_text())
    try:
        image_cfg = from_dict(ImageEncoderConfig, meta["image"])
        loss_cfg = from_dict(LossConfig, meta["loss"])
        text_cfg = OpenAutoGLMConfig.from_dict(meta["text"])
    except (KeyError, ConfigError, TypeError) as e:
        raise ValueError(f"{path / 'align_config.json'} is damaged or from another version ({e})") from None
    model = AlignModel(image_cfg, AutoGLMBackbone(text_cfg), loss_cfg, meta.get("pooling", "last"),
                       with_momentum=False)
    sd = load_file(str(path / "model.safetensors"))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path / 'model.safetensors'} does not match align_config.json: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}")
    model.eval()
    if device is not None:
        model.to(device)
    return model, load_tokenizer(path), meta
