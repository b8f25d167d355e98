"""The aligned image-text model: two encoders, projection heads into one L2-normalised
space, a learnable temperature, and (for training) momentum encoders with queues.

`AlignModel.embed_images` / `embed_texts` give unit vectors in the shared space; `forward`
(training) returns the contrastive loss:

* plain: symmetric InfoNCE over the batch (`clip_loss`);
* `momentum > 0` (MoCo / ALBEF): EMA copies of both towers (momentum m, updated before each
  forward, as ALBEF does) embed the batch; the loss scores online embeddings against the
  momentum embeddings of the batch plus queues of the last `queue_size` momentum
  embeddings (`itc_loss`), which are then enqueued. Entries of a queue that was never
  filled are not used, so the first step sees only the batch; a short batch is enqueued
  as far as it goes (the pointer wraps).
* `distill_alpha > 0`: momentum distillation, soft targets from the momentum encoders.
* `false_negatives`: two captions of one batch with the same text (`same_caption`: equal
  token ids after word masking) or, where the data has classes, two images of one class
  (`same_label`, which includes `same_caption`) are positives of each other rather than
  negatives (`positive_targets`); `ignore` (the default) is CLIP's one-hot diagonal.

Under a process group (DDP, one batch of the same size per rank), the embeddings of every
rank's batch are gathered (`gather_features`, gradients to their own rank) and each rank
scores its rows against the whole global batch; the momentum embeddings, token ids and labels
are gathered too, so the queues stay the same on every rank and `false_negatives` sees every
rank's captions. The loss averaged over ranks is that of one process with the global batch.

The temperature: `logit_scale` is log(1 / 0.07) at start and `exp(logit_scale)` is clamped
at 100 (CLIP); `scale()` is the clamped value (what the logs show). As in CLIP the parameter
itself is clamped (at the start of each training forward), so at the bound its gradient still
flows and the scale can come down again; a clamp of exp() alone would freeze it at 100.

Training checkpoints (the Trainer's) hold everything, momentum towers and queues included;
`save_aligned` writes only what inference needs (online towers, heads, temperature) and
says so in align_config.json.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..modules.moe import MoEFeedForward
from ..settings import setting
from .encoders import ImageEncoder, ImageEncoderConfig, TextEncoder
from .losses import MAX_LOGIT_SCALE, clip_loss, gather_features, itc_loss, world_info

__all__ = ["LossConfig", "AlignModel", "AlignObjective"]


@dataclass
class LossConfig:
    embed_dim: int = setting(64, "width of the shared embedding space (the projection heads' output)")
    temperature: float = setting(0.07, "initial temperature (logit scale 1/t, learnable, clamped at 100)")
    learn_temperature: bool = setting(True, "train the logit scale; off = fixed at 1/temperature")
    momentum: float = setting(0.995, "EMA momentum of the momentum encoders; 0 = plain in-batch InfoNCE "
                                     "(no momentum encoders, no queue)")
    queue_size: int = setting(1024, "negatives kept from earlier batches (momentum embeddings), per modality; "
                                    "used only with momentum > 0")
    distill_alpha: float = setting(0.0, "momentum distillation: weight of the momentum encoders' soft targets "
                                        "(ALBEF uses 0.4); 0 = one-hot targets")
    false_negatives: Literal["ignore", "same_caption", "same_label"] = setting(
        "ignore", "in-batch pairs treated as matches instead of negatives: identical caption texts, or also images "
                  "of one class (needs labels); ignore = CLIP's one-hot diagonal")

    def __post_init__(self) -> None:
        if self.embed_dim < 1:
            raise ValueError(f"embed_dim must be >= 1, got {self.embed_dim}")
        if not 0 < self.temperature <= 1:
            raise ValueError(f"temperature must be in (0, 1], got {self.temperature}; CLIP starts at 0.07")
        if 1 / self.temperature > MAX_LOGIT_SCALE:
            raise ValueError(f"temperature {self.temperature} is below 1/{MAX_LOGIT_SCALE:g}, where the logit scale "
                             f"is clamped; use >= {1 / MAX_LOGIT_SCALE}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1) (0 = no momentum encoders), got {self.momentum}")
        if self.queue_size < 0:
            raise ValueError(f"queue_size must be >= 0, got {self.queue_size}")
        if not 0 <= self.distill_alpha <= 1:
            raise ValueError(f"distill_alpha must be in [0, 1], got {self.distill_alpha}")
        if self.false_negatives not in ("ignore", "same_caption", "same_label"):
            raise ValueError(f"false_negatives must be ignore, same_caption or same_label, got "
                             f"{self.false_negatives!r}")
        if self.distill_alpha > 0 and self.momentum == 0:
            raise ValueError("distill_alpha > 0 needs the momentum encoders' soft targets; set momentum > 0 "
                             "(e.g. 0.995) or distill_alpha 0")


class AlignModel(nn.Module):
    def __init__(self, image_cfg: ImageEncoderConfig, text_backbone: nn.Module, loss: LossConfig,
                 pooling: str = "last", with_momentum: bool = True) -> None:
        super().__init__()
        self.image_cfg, self.loss_cfg = image_cfg, loss
        self.image_encoder = ImageEncoder(image_cfg)
        self.text_encoder = TextEncoder(text_backbone, pooling)  # type: ignore[arg-type]
        d = loss.embed_dim
        self.image_proj = nn.Linear(image_cfg.dim, d, bias=False)
        self.text_proj = nn.Linear(self.text_encoder.dim, d, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / loss.temperature)),
                                        requires_grad=loss.learn_temperature)
        # MoE layers run the "sorted" dispatch (each expert on its tokens, from the live weights):
        # the other dispatches cache stacked expert weights keyed on parameter version counters,
        # which the fused AdamW step does not bump, so evaluation between steps would read stale weights
        for m in self.modules():
            if isinstance(m, MoEFeedForward):
                m.dispatch = "sorted"
        self.momentum_towers: nn.ModuleDict | None = None
        if with_momentum and loss.momentum > 0:
            towers = {k: getattr(self, k) for k in ("image_encoder", "text_encoder", "image_proj", "text_proj")}
            self.momentum_towers = nn.ModuleDict({k: copy.deepcopy(m) for k, m in towers.items()})
            self.momentum_towers.requires_grad_(False)
            K = loss.queue_size
            self.register_buffer("image_queue", F.normalize(torch.randn(K, d), dim=-1))
            self.register_buffer("text_queue", F.normalize(torch.randn(K, d), dim=-1))
            self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
            self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))

    # ------------------------------------------------------------ inference
    def scale(self) -> torch.Tensor:
        """exp(logit_scale) clamped at 100: the multiplier of the cosine similarities. The clamp
        is on the parameter (gradient kept at the bound), so a scale at 100 can still come down."""
        return self.logit_scale.clamp(max=math.log(MAX_LOGIT_SCALE)).exp()

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [0, 1] -> (B, embed_dim), unit length."""
        return F.normalize(self.image_proj(self.image_encoder(images)), dim=-1)

    def embed_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) right-padded ids + mask -> (B, embed_dim), unit length."""
        return F.normalize(self.text_proj(self.text_encoder(input_ids, attention_mask)), dim=-1)

    # ------------------------------------------------------------- training
    @torch.no_grad()
    def momentum_update(self) -> None:
        """EMA step: momentum params <- m * momentum + (1 - m) * online."""
        assert self.momentum_towers is not None
        m = self.loss_cfg.momentum
        for name, tower in self.momentum_towers.items():
            for pm, p in zip(tower.parameters(), getattr(self, name).parameters()):
                pm.mul_(m).add_(p.detach(), alpha=1 - m)

    @torch.no_grad()
    def _momentum_embed(self, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor):
        t = self.momentum_towers
        img = F.normalize(t["image_proj"](t["image_encoder"](images)), dim=-1)
        txt = F.normalize(t["text_proj"](t["text_encoder"](ids, mask)), dim=-1)
        return img, txt

    @torch.no_grad()
    def enqueue(self, img: torch.Tensor, txt: torch.Tensor) -> None:
        """Write the batch's momentum embeddings at the queue pointer (wrapping around)."""
        K = self.image_queue.shape[0]
        if K == 0:
            return
        n = min(len(img), K)
        idx = (self.queue_ptr + torch.arange(n, device=img.device)) % K
        self.image_queue[idx] = img[-n:].to(self.image_queue.dtype)
        self.text_queue[idx] = txt[-n:].to(self.text_queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + n) % K)
        self.queue_filled.copy_(torch.clamp(self.queue_filled + n, max=K))

    def aux_loss(self) -> torch.Tensor:
        """MoE auxiliary losses of the last forward of both online towers."""
        return self.image_encoder.aux_loss + self.text_encoder.aux_loss

    def positives(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None,
                  ids_cols: torch.Tensor | None = None, labels_cols: torch.Tensor | None = None
                  ) -> torch.Tensor | None:
        """(B, N) bool: pairs of this batch (rows) and the columns (default: this batch; with
        several ranks, `ids_cols` (N, L') = every rank's ids with padding as -1, `labels_cols`
        (N,)) that match under `loss.false_negatives` (None = ignore)."""
        how = self.loss_cfg.false_negatives
        if how == "ignore":
            return None
        if how == "same_label" and labels is None:
            raise ValueError("false_negatives 'same_label' needs each image's class: use data with labels "
                             "(--label-col) or false_negatives 'same_caption'")
        ids = input_ids.masked_fill(attention_mask == 0, -1)  # padding never decides
        cols = ids if ids_cols is None else ids_cols
        L = max(ids.shape[1], cols.shape[1])
        ids, cols = F.pad(ids, (0, L - ids.shape[1]), value=-1), F.pad(cols, (0, L - cols.shape[1]), value=-1)
        pos = (ids[:, None] == cols[None]).all(-1)  # (B, N): the same caption tokens
        if how == "same_label":
            lab_cols = labels if labels_cols is None else labels_cols
            pos = pos | (labels[:, None] == lab_cols[None])
        return pos

    def _gather_batch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      labels: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Every rank's token ids (padding -1, padded to the longest) and labels, for
        `positives`; ValueError when the ranks' batch sizes differ (all ranks raise)."""
        shape = torch.tensor([[input_ids.shape[0], input_ids.shape[1]]], device=input_ids.device)
        shapes = gather_features(shape, with_grad=False)
        if bool((shapes[:, 0] != shapes[0, 0]).any()):
            raise ValueError(f"every rank must pass a batch of the same size to gather features, got "
                             f"{shapes[:, 0].tolist()}; drop the short last batch (drop_last=True)")
        if self.loss_cfg.false_negatives == "ignore":
            return None, None
        ids = input_ids.masked_fill(attention_mask == 0, -1)
        ids = F.pad(ids, (0, int(shapes[:, 1].max()) - ids.shape[1]), value=-1)
        return gather_features(ids, with_grad=False), \
            (gather_features(labels, with_grad=False) if labels is not None else None)

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor | None = None) -> dict[str, Any]:
        """Training step's loss: {"loss", "contrastive", "aux_loss", "logit_scale" (exp, clamped)}.
        labels (B,), optional: classes, read by `false_negatives='same_label'` only."""
        if self.training and self.logit_scale.requires_grad:  # CLIP's in-place clamp of the parameter
            with torch.no_grad():
                self.logit_scale.clamp_(max=math.log(MAX_LOGIT_SCALE))
        img = self.image_proj(self.image_encoder(images))
        txt = self.text_proj(self.text_encoder(input_ids, attention_mask))
        s = self.scale()
        world, rank = world_info()
        offset, img_c, txt_c, ids_c, lab_c = 0, None, None, None, None
        if world > 1:
            ids_c, lab_c = self._gather_batch(input_ids, attention_mask, labels)
            offset, img_c, txt_c = rank * len(img), gather_features(img), gather_features(txt)
        pos = self.positives(input_ids, attention_mask, labels, ids_c, lab_c)
        if self.momentum_towers is None:
            con = clip_loss(img, txt, s, pos, img_c, txt_c, offset)
        else:
            if self.training:
                self.momentum_update()
            img_m, txt_m = self._momentum_embed(images, input_ids, attention_mask)
            img_m, txt_m = gather_features(img_m, with_grad=False), gather_features(txt_m, with_grad=False)
            k = int(self.queue_filled)
            con = itc_loss(img, txt, img_m, txt_m, self.image_queue[:k].clone(), self.text_queue[:k].clone(), s,
                           self.loss_cfg.distill_alpha, pos, offset)
            if self.training:
                self.enqueue(img_m, txt_m)
        aux = self.aux_loss()
        return {"loss": con + aux, "contrastive": con.detach(), "aux_loss": aux.detach(), "logit_scale": s.detach()}


class AlignObjective:
    """Trainer objective: batch = {"images", "input_ids", "attention_mask"} -> the model's loss dict.
    The repr says whether checkpoints carry momentum encoders and queues."""

    unit = "pairs"  # the trainer's throughput: image-caption pairs per second

    def __init__(self, loss: LossConfig) -> None:
        self.loss = loss

    @staticmethod
    def count(batch: dict[str, torch.Tensor]) -> int:
        return int(batch["images"].shape[0])

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return model(batch["images"], batch["input_ids"], batch["attention_mask"], batch.get("labels"))

    def __repr__(self) -> str:
        c = self.loss
        if c.momentum == 0:
            return "AlignObjective(in-batch InfoNCE; no momentum encoders or queues in the checkpoint)"
        return (f"AlignObjective(momentum={c.momentum}, queue_size={c.queue_size}, distill_alpha={c.distill_alpha}; "
                f"checkpoints carry the momentum encoders and queues)")
