"""Small aligned models for the multimodal tests."""

import torch

from autoglm.config import OpenAutoGLMConfig
from autoglm.model import AutoGLMBackbone
from autoglm.multimodal.encoders import ImageEncoderConfig
from autoglm.multimodal.model import AlignModel, LossConfig


def tiny_text_backbone(vocab: int = 300) -> AutoGLMBackbone:
    return AutoGLMBackbone(OpenAutoGLMConfig.from_name("tiny", vocab_size=vocab))


def tiny_image_cfg(**kw) -> ImageEncoderConfig:
    return ImageEncoderConfig(**{"image_size": 8, "patch_size": 4, "dim": 32, "layers": 1, "heads": 4,
                                 "ffn_hidden": 64, **kw})


def tiny_align_model(momentum: float = 0.9, queue: int = 6, alpha: float = 0.0) -> AlignModel:
    torch.manual_seed(0)
    return AlignModel(tiny_image_cfg(), tiny_text_backbone(), LossConfig(embed_dim=16, momentum=momentum,
                                                                         queue_size=queue, distill_alpha=alpha))
