"""Multimodal alignment: images and text in one embedding space.

* `encoders`: a ViT-style image encoder from the project's transformer blocks; the text
  backbone with pooling.
* `losses`: symmetric InfoNCE (CLIP) and the momentum-queue form with distillation (ALBEF).
* `model`: the aligned model (projection heads, learnable temperature, momentum encoders,
  queues) and its training objective.
* `augment`: random resized crop, flips, word masking (torch ops).
* `data`: digits, caption tables, COCO captions; bad items skipped with reasons.
* `evaluate`: zero-shot with prompt ensembles, recall@K, linear probe.
* `store`: the aligned model directory.
* `projector`: image embeddings as prefix tokens of the language model (LLaVA-style).
"""

__all__: list[str] = []
