"""Progressive knowledge distillation from two (or more) teachers.

Pieces, from the bottom up:

- `kd_loss`: the reference loss. With student logits `s` and the combined teacher
  distribution `t` (both at temperature `T`),

      soft = alpha * t + (1 - alpha) * softmax(s / T).detach()
      loss = (1 + 0.01 * min(step, 5000) / 5000) * T^2 * KL(soft || softmax(s / T))

  averaged over the labelled tokens. Because the student part of `soft` is detached,
  the gradient w.r.t. `s / T` is `alpha * (softmax(s / T) - t)`: alpha scales how hard
  the student is pulled towards the teachers. When `t == softmax(s / T)` both the loss
  and its gradient are zero for every alpha (and for alpha = 0 they are zero whatever
  the teachers say).
- `combine_teachers`: per-token mixture of the teachers' distributions, with fixed
  weights or weights proportional to each teacher's confidence (its max probability).
- `AlphaSchedule`: alpha per optimizer step; "progressive" moves alpha from `start` to
  `end` in `rounds` equal rounds (the soft-label mix is updated once per round).
- `DistillationObjective`: an `Objective` for the existing `Trainer`. Batches are dicts
  `{"input_ids", "labels", "step", "index"}` (see `distill_batches`), so the loss scale
  and alpha are pure functions of the step and a resumed run reproduces the original.
  Teachers run under `torch.no_grad()`; with a `TeacherLogitCache` their top-k logits
  are stored per micro-batch index and reused instead of re-running them.

Example:
    >>> import torch
    >>> s = torch.randn(2, 3, 7)
    >>> t = s.float().div(2.0).softmax(-1)
    >>> float(kd_loss(s, t, alpha=0.7, step=0, temperature=2.0).abs()) < 1e-6
    True
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..losses import IGNORE_INDEX, lm_loss
from ..settings import setting
from .teacher_cache import TeacherLogitCache, topk_to_probs

__all__ = ["kd_loss", "kd_scale", "combine_teachers", "AlphaSchedule", "DistillConfig",
           "DistillationObjective", "distill_batches", "check_teachers", "COMBINE_MODES"]

log = logging.getLogger(__name__)

COMBINE_MODES = ("fixed", "confidence")


def kd_scale(step: int, horizon: int = 5000) -> float:
    """The reference step scale `1 + 0.01 * min(step, horizon) / horizon` (1.0 -> 1.01)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return 1.0 + 0.01 * min(step, horizon) / horizon


def kd_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, alpha: float, step: int,
            temperature: float = 1.0, mask: torch.Tensor | None = None, horizon: int = 5000) -> torch.Tensor:
    """Reference progressive KD loss (see the module docstring).

    student_logits (B, T, V); teacher_probs (B, T, V), rows summing to 1 (already at the
    same temperature); mask (B, T) bool, True where the token counts (None: all).
    Returns a scalar: the mean over counted tokens of KL(soft || student), times T^2
    (Hinton et al.: keeps gradient magnitudes comparable across temperatures) and the
    step scale. Computed in float32 (float64 stays float64).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_logits.shape != teacher_probs.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher probs "
                         f"{tuple(teacher_probs.shape)} differ in shape; teachers must share the student's "
                         f"vocabulary and see the same input_ids")
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    s_logp = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)  # (B, T, V)
    soft = alpha * teacher_probs.to(dtype) + (1.0 - alpha) * s_logp.exp().detach()
    # KL(soft || student) per token; xlogy gives 0 * log 0 = 0 for teacher-impossible tokens
    kl = (torch.xlogy(soft, soft) - soft * s_logp).sum(-1)  # (B, T)
    if mask is None:
        per = kl.mean()
    else:
        n = mask.sum()
        if int(n) == 0:
            raise ValueError("kd_loss got a mask with no counted token; every label was -100")
        per = (kl * mask.to(dtype)).sum() / n
    return per * (temperature ** 2) * kd_scale(step, horizon)


def combine_teachers(teacher_probs: Sequence[torch.Tensor], mode: str = "fixed",
                     weights: Sequence[float] | None = None) -> torch.Tensor:
    """Per-token mixture of teacher distributions, each (B, T, V) -> (B, T, V).

    mode="fixed": sum_i w_i p_i with `weights` (default equal), normalised to sum 1.
    mode="confidence": per token, w_i proportional to max_v p_i (times `weights` if given),
    so a teacher that is sure of the next token counts more where it is sure.
    """
    if not teacher_probs:
        raise ValueError("combine_teachers needs at least one teacher distribution")
    if mode not in COMBINE_MODES:
        raise ValueError(f"teacher combination must be one of {COMBINE_MODES}, got {mode!r}")
    n = len(teacher_probs)
    w = torch.tensor([1.0] * n if weights is None else list(weights), dtype=torch.float64)
    if w.numel() != n or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ValueError(f"teacher weights {list(w.tolist())} must be {n} non-negative numbers with a positive "
                         f"sum (one per teacher)")
    p = torch.stack([t for t in teacher_probs])  # (n, B, T, V)
    w = w.to(p.dtype).to(p.device).view(n, 1, 1, 1)
    if mode == "fixed":
        return (w / w.sum() * p).sum(0)
    conf = w * p.amax(-1, keepdim=True)  # (n, B, T, 1)
    return (conf / conf.sum(0, keepdim=True).clamp_min(1e-12) * p).sum(0)


@dataclass(frozen=True)
class AlphaSchedule:
    """alpha(step). kind="constant": `start` always. kind="progressive": `rounds` rounds of
    equal length over `total_steps`; in round r alpha = start + (end - start) * r / (rounds - 1),
    i.e. the soft-label mix is updated once per round (start in the first, end in the last)."""

    start: float = 0.7
    end: float = 0.7
    kind: str = "constant"
    rounds: int = 1
    total_steps: int = 1

    def __post_init__(self) -> None:
        for name in ("start", "end"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"alpha {name} must be in [0, 1], got {v}")
        if self.kind not in ("constant", "progressive"):
            raise ValueError(f"alpha schedule must be 'constant' or 'progressive', got {self.kind!r}")
        if self.rounds < 1 or self.total_steps < 1:
            raise ValueError(f"rounds ({self.rounds}) and total_steps ({self.total_steps}) must be >= 1")

    def round_of(self, step: int) -> int:
        return min(step * self.rounds // self.total_steps, self.rounds - 1)

    def __call__(self, step: int) -> float:
        if self.kind == "constant" or self.rounds == 1:
            return self.start
        return self.start + (self.end - self.start) * self.round_of(step) / (self.rounds - 1)


@dataclass
class DistillConfig:
    """How the student learns from the teachers (the `distill` section of the distill recipe)."""

    alpha: float = setting(0.7, "weight of the teachers in the soft target (in the first round)")
    alpha_end: float | None = setting(None, "alpha in the last round of the progressive schedule; none = alpha")
    rounds: int = setting(1, "rounds of the alpha schedule; the soft-label mix changes once per round")
    temperature: float = setting(1.0, "softens teacher and student distributions (the loss is scaled by T^2)")
    combine: Literal["fixed", "confidence"] = setting("fixed", "how teachers mix: fixed weights or per-token "
                                                               "confidence (see combine_teachers)")
    teacher_weights: tuple[float, ...] | None = setting(None, "fixed teacher weights, e.g. 0.6,0.4; none = equal")
    hard_weight: float = setting(0.0, "weight of the hard-label cross-entropy added to the KD loss")
    kd_weight: float = setting(1.0, "weight of the KD loss")
    cache_top_k: int = setting(0, "> 0: the teachers' top-k logits are cached on disk and reused")

    def __post_init__(self) -> None:
        if self.teacher_weights is not None:
            self.teacher_weights = tuple(self.teacher_weights)
        self.schedule(1)  # checks alpha, alpha_end and rounds
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.combine not in COMBINE_MODES:
            raise ValueError(f"combine must be one of {COMBINE_MODES}, got {self.combine!r}")
        if self.hard_weight < 0 or self.kd_weight < 0 or self.hard_weight + self.kd_weight == 0:
            raise ValueError(f"hard_weight ({self.hard_weight}) and kd_weight ({self.kd_weight}) must be >= 0 "
                             f"and not both 0")
        if self.cache_top_k < 0:
            raise ValueError(f"cache_top_k must be >= 0 (0 disables the cache), got {self.cache_top_k}")

    def schedule(self, total_steps: int) -> AlphaSchedule:
        """alpha per optimizer step over a run of `total_steps`."""
        end = self.alpha if self.alpha_end is None else self.alpha_end
        return AlphaSchedule(self.alpha, end, "progressive" if self.rounds > 1 else "constant", self.rounds,
                             max(total_steps, 1))


def _vocab_of(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    v = getattr(cfg, "vocab_size", None)
    if v is None:
        raise ValueError(f"{type(model).__name__} has no config.vocab_size; teachers must be causal LMs with a "
                         f"config (e.g. loaded with AutoModelForCausalLM.from_pretrained)")
    return int(v)


def check_teachers(student: nn.Module, teachers: Sequence[nn.Module], names: Sequence[str] | None = None) -> None:
    """Raise ValueError before training when a teacher's vocabulary differs from the student's."""
    if not teachers:
        raise ValueError("distillation needs at least one teacher; pass one or two teacher model directories")
    sv = _vocab_of(student)
    names = list(names) if names is not None else [f"teacher {i}" for i in range(len(teachers))]
    for name, t in zip(names, teachers):
        tv = _vocab_of(t)
        if tv != sv:
            raise ValueError(f"{name} has a vocabulary of {tv} tokens but the student has {sv}; teachers and "
                             f"student must share one tokenizer (train the student with the teachers' tokenizer)")


def distill_batches(base: Callable[[int], tuple[torch.Tensor, torch.Tensor]], grad_accum: int = 1,
                    epoch_batches: int | None = None) -> Callable[[int], dict[str, Any]]:
    """Wrap a `(input_ids, labels)` batch function for `DistillationObjective`.

    Micro-batch i becomes {"input_ids", "labels", "step": i // grad_accum, "index": j} where
    j = i mod epoch_batches (None: j = i) picks the underlying batch, so with
    `epoch_batches` the data repeats every epoch and cached teacher logits are reused.
    """
    if grad_accum < 1 or (epoch_batches is not None and epoch_batches < 1):
        raise ValueError(f"grad_accum ({grad_accum}) and epoch_batches ({epoch_batches}) must be >= 1")

    def batch(i: int) -> dict[str, Any]:
        j = i % epoch_batches if epoch_batches else i
        x, y = base(j)
        return {"input_ids": x, "labels": y, "step": i // grad_accum, "index": j}

    return batch


class DistillationObjective:
    """(student, batch) -> {"loss", "kd_loss", "hard_loss", "aux_loss", "alpha"}.

    loss = kd_weight * kd_loss + hard_weight * CE(student, labels) + student MoE aux loss.
    batch: a dict from `distill_batches` (a plain (input_ids, labels) tuple also works,
    with step 0 and no cache). Labels are aligned with the inputs (label t follows input
    t); tokens labelled -100 are left out of both terms.
    """

    def __init__(self, teachers: Sequence[nn.Module], cfg: DistillConfig | None = None,
                 cache: TeacherLogitCache | None = None, total_steps: int = 1) -> None:
        self.teachers = list(teachers)
        if not self.teachers:
            raise ValueError("DistillationObjective needs at least one teacher")
        self.cfg = cfg or DistillConfig()
        self.alpha = self.cfg.schedule(total_steps)  # alpha(step)
        if self.cfg.cache_top_k and cache is None:
            raise ValueError("cache_top_k > 0 needs a TeacherLogitCache (pass cache=...)")
        self.cache = cache
        self._checked = False
        for t in self.teachers:
            t.eval()
            t.requires_grad_(False)

    def __repr__(self) -> str:
        c = self.cfg
        return (f"DistillationObjective(teachers={len(self.teachers)}, alpha={self.alpha}, T={c.temperature}, "
                f"combine={c.combine}, hard_weight={c.hard_weight}, top_k={c.cache_top_k})")

    @torch.no_grad()
    def teacher_probs(self, input_ids: torch.Tensor, vocab: int, index: int | None = None) -> torch.Tensor:
        """Combined teacher distribution (B, T, vocab) at the configured temperature, float32.
        With the cache, batch `index` is read from it, or computed and stored."""
        T = self.cfg.temperature
        device = input_ids.device
        probs: list[torch.Tensor] = []
        if self.cfg.cache_top_k:
            entry = self.cache.get(index) if index is not None else None
            if entry is None:
                entry = [tuple(self._run(t, input_ids).topk(self.cfg.cache_top_k, dim=-1)) for t in self.teachers]
                if index is not None:
                    self.cache.put(index, entry)
                # round like the stored copy, so a cache hit and a miss give the same loss
                entry = [(v.to(self.cache.dtype), i) for v, i in entry]
            probs = [topk_to_probs(v.to(device), i.to(device), vocab, T) for v, i in entry]
        else:
            probs = [F.softmax(self._run(t, input_ids) / T, dim=-1) for t in self.teachers]
        return combine_teachers(probs, self.cfg.combine, self.cfg.teacher_weights)

    def _run(self, teacher: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        dev = next(teacher.parameters()).device
        if dev != input_ids.device:
            teacher.to(input_ids.device)
        return teacher(input_ids).logits.float()  # (B, T, V)

    def __call__(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        if isinstance(batch, dict):
            input_ids, labels = batch["input_ids"], batch["labels"]
            step, index = int(batch.get("step", 0)), batch.get("index")
        else:
            (input_ids, labels), step, index = batch, 0, None
        if not self._checked:  # refuse a vocabulary mismatch on the first step, before any update
            check_teachers(getattr(model, "module", model), self.teachers)
            self._checked = True
        out = model(input_ids)  # no labels: the HF wrapper would shift them again
        t_probs = self.teacher_probs(input_ids, out.logits.shape[-1], None if index is None else int(index))
        if t_probs.shape != out.logits.shape:
            raise ValueError(f"teacher distribution {tuple(t_probs.shape)} does not match the student's logits "
                             f"{tuple(out.logits.shape)}; teachers must share the student's vocabulary")
        mask = labels != IGNORE_INDEX
        alpha = self.alpha(step)
        kd = kd_loss(out.logits, t_probs, alpha, step, self.cfg.temperature, mask)
        zero = torch.zeros((), device=kd.device)
        hard = lm_loss(out.logits, labels) if self.cfg.hard_weight else zero
        aux = out.aux_loss if getattr(out, "aux_loss", None) is not None else zero
        loss = self.cfg.kd_weight * kd + self.cfg.hard_weight * hard + aux
        return {"loss": loss, "kd_loss": kd.detach(), "hard_loss": hard.detach(), "aux_loss": aux.detach(),
                "alpha": torch.tensor(alpha, device=kd.device)}
