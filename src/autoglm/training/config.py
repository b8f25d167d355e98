"""Training configuration: one dataclass, validated in `__post_init__`, serialisable.

Every field carries a one-line *why*. `dataclasses.asdict(cfg)` gives plain JSON types
(the tuple `betas` becomes a list in JSON; `TrainConfig.from_dict` turns it back).

Example:
    >>> cfg = TrainConfig(max_steps=50)
    >>> cfg.tokens_per_step, cfg.warmup_steps
    (4096, 5)
    >>> TrainConfig.from_dict(dataclasses.asdict(cfg)) == cfg
    True
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from ..settings import from_dict, setting

__all__ = ["TrainConfig", "PRECISIONS"]

PRECISIONS = ("auto", "bf16", "fp32", "fp16")


@dataclass
class TrainConfig:
    batch_size: int = setting(16, "sequences per micro-batch; memory scales with batch_size * seq_len")
    seq_len: int = setting(256, "tokens per sequence; must be <= the model's max_position_embeddings")
    grad_accum: int = setting(1, "micro-batches per optimizer step: effective batch = batch_size * "
                                 "grad_accum")
    lr: float = setting(3e-3, "peak learning rate; small models tolerate (and need) a high one")
    min_lr_ratio: float = setting(0.1, "cosine floor as a fraction of lr (Chinchilla: decay to ~10%)")
    weight_decay: float = setting(0.1, "AdamW decoupled decay, applied to >=2-D weights only")
    betas: tuple[float, float] = setting((0.9, 0.95), "beta2 0.95 is steadier than 0.999 for LM pre-training")
    grad_clip: float = setting(1.0, "clip the global grad norm to this; 0 disables clipping (norm still "
                                    "reported)")
    warmup_steps: int | None = setting(None, "linear warmup from 0 avoids early Adam blow-ups; none = "
                                             "min(100, max_steps / 10)")
    max_steps: int = setting(1000, "optimizer steps; the cosine schedule reaches its floor here", flag="steps")
    max_seconds: float | None = setting(None, "wall-clock budget per fit() call: stop early, still eval + save "
                                              "at the end")
    eval_every: int = setting(200, "evaluate every N optimizer steps; 0 = only at the end")
    eval_batches: int = setting(20, "cap on evaluation batches, so an eval costs a bounded time")
    save_every: int = setting(500, "checkpoint every N optimizer steps; 0 = only at the end")
    keep_checkpoints: int = setting(2, "newest checkpoints kept on disk; older ones are pruned")
    seed: int = setting(1337, "seeds torch's global RNG at the start of a fresh run (dropout, etc.)")
    precision: Literal["auto", "bf16", "fp32", "fp16"] = setting("auto", "auto = bf16 autocast on CUDA if supported, "
                                                                         "else fp32; fp16 = fp16 autocast + grad "
                                                                         "scaler (CUDA only)")
    grad_checkpointing: bool = setting(False, "recompute block activations in backward: less memory, ~30% "
                                              "slower")
    log_every: int = setting(10, "log a metrics row every N steps (each row forces a device sync)")
    compile: bool = setting(False, "torch.compile the model; pays off on GPU for long runs")

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # lists come back from JSON
        if self.warmup_steps is None:
            self.warmup_steps = min(100, max(1, self.max_steps // 10)) if isinstance(self.max_steps, int) else 0
        self.validate()

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len * self.grad_accum

    def validate(self) -> None:
        """Raise ValueError naming the bad field and the fix."""

        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(msg)

        for name in ("batch_size", "seq_len", "grad_accum", "max_steps", "eval_batches",
                     "keep_checkpoints", "log_every"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                 f"{name} must be a positive integer, got {v!r}")
        for name in ("warmup_steps", "eval_every", "save_every", "seed"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                 f"{name} must be a non-negative integer, got {v!r}")
        need(self.lr > 0, f"lr must be positive, got {self.lr}")
        need(0.0 <= self.min_lr_ratio <= 1.0, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas),
             f"betas must be two numbers in [0, 1), got {self.betas!r}")
        need(self.grad_clip >= 0, f"grad_clip must be >= 0 (0 disables clipping), got {self.grad_clip}")
        need(self.warmup_steps <= self.max_steps,
             f"warmup_steps ({self.warmup_steps}) must be <= max_steps ({self.max_steps}); "
             f"lower warmup_steps (e.g. to {max(self.max_steps // 10, 0)}) or raise max_steps")
        need(self.max_seconds is None or self.max_seconds > 0,
             f"max_seconds must be positive or None (no time budget), got {self.max_seconds}")
        need(self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {self.precision!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """Inverse of `dataclasses.asdict`; unknown keys are an error naming them."""
        return from_dict(cls, d)
