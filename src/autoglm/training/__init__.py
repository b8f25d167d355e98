"""Training: config, AdamW + schedule, objectives, device strategy, atomic checkpoints,
evaluation and the `Trainer` loop.

Typical use (the CLI does this with `autoglm.data`):

    cfg = TrainConfig(batch_size=16, seq_len=256, max_steps=2000)
    trainer = Trainer(model, cfg,
                      train_batch=lambda i: sample_batch(train_tokens, cfg.batch_size, cfg.seq_len, i, cfg.seed),
                      eval_batches=lambda: iter_eval_batches(val_tokens, cfg.batch_size, cfg.seq_len),
                      out_dir="runs/tiny")
    result = trainer.fit(resume=False)
"""

from .checkpoint import (CheckpointError, capture_rng_state, list_checkpoints, load_checkpoint, load_latest,
                         restore_rng_state, save_checkpoint)
from .config import PRECISIONS, TrainConfig
from .evaluate import evaluate
from .loop import Callback, Trainer, TrainResult, enable_grad_checkpointing
from .objectives import CausalLMObjective, EarlyExitObjective, Objective
from .optim import build_optimizer, build_scheduler, lr_lambda, param_groups
from .strategy import SingleDevice, Strategy, autocast_context, resolve_precision

__all__ = [
    "TrainConfig", "PRECISIONS",
    "build_optimizer", "build_scheduler", "lr_lambda", "param_groups",
    "Objective", "CausalLMObjective", "EarlyExitObjective",
    "Strategy", "SingleDevice", "autocast_context", "resolve_precision",
    "CheckpointError", "save_checkpoint", "load_checkpoint", "load_latest", "list_checkpoints",
    "capture_rng_state", "restore_rng_state",
    "evaluate",
    "Trainer", "TrainResult", "Callback", "enable_grad_checkpointing",
]
