"""The fine-tuning recipe: a saved model fine-tuned fully or with LoRA (PEFT).

Data is a text file or folder (random windows, loss on every token) or a JSONL of
{"prompt", "completion"} records (loss on the completions only). With LoRA only the
adapter is saved (see `autoglm.training.lora`); both modes write resumable checkpoints
to OUT/checkpoints (with LoRA each holds the adapter, optimizer, scheduler, RNG and step)
and `resume` continues from the latest, reproducing the uninterrupted run.
`autoglm finetune` is this recipe.

Example:
    >>> from autoglm.settings import load_config
    >>> cfg = load_config(FinetuneConfig, overrides={"base": "runs/a", "data": "d.jsonl", "out": "runs/b",
    ...                                              "lora.enabled": True, "lora.targets": "q_proj,o_proj"})
    >>> cfg.lora.targets, cfg.train.max_steps, cfg.train.lr
    (('q_proj', 'o_proj'), 200, 0.001)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..settings import section, setting
from ..training.config import TrainConfig
from .common import DEFAULT_CACHE, run_info

__all__ = ["FinetuneConfig", "LoraSpec", "FinetuneOutput", "finetune", "is_jsonl"]


@dataclass
class LoraSpec:
    enabled: bool = setting(False, "LoRA through PEFT instead of full fine-tuning (only the adapter is saved)",
                            flag="lora")
    targets: tuple[str, ...] = setting(("q_proj", "v_proj"), "modules that get LoRA: projection names, full "
                                                             "module names, or 'experts'", flag="target")
    r: int = setting(8, "LoRA rank")
    alpha: int = setting(16, "LoRA scaling numerator (the update is scaled by alpha / r)", flag="lora_alpha")
    dropout: float = setting(0.05, "dropout on the LoRA input", flag="lora_dropout")

    def __post_init__(self) -> None:
        if not self.targets:
            raise ValueError("targets is empty; name at least one module, e.g. q_proj,v_proj")
        if self.r < 1 or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"need r >= 1 and 0 <= dropout < 1; got r={self.r}, dropout={self.dropout}")


@dataclass
class FinetuneConfig:
    base: Path | None = setting(None, "base model directory (written by `autoglm train`)", argument=True,
                                required=True)
    data: Path | None = setting(None, "a .jsonl of {prompt, completion} records (loss on completions) or text",
                                required=True)
    out: Path | None = setting(None, "output run directory (with LoRA: the adapter only)", required=True)
    lora: LoraSpec = section(LoraSpec)
    train: TrainConfig = section(TrainConfig, max_steps=200, batch_size=8, seq_len=128, lr=1e-3, save_every=100)
    val_fraction: float = setting(0.1, "share of the records (or tokens) held out for validation")
    cache_dir: Path = setting(DEFAULT_CACHE, "where tokenized text corpora are cached")
    resume: bool = setting(False, "continue from OUT/checkpoints/latest (same options as the run)")
    overwrite: bool = setting(False, "replace the run already saved in OUT (it is deleted first); without it such "
                                     "an OUT is refused")
    device: str | None = setting(None, "cpu, cuda or cuda:N; none = cuda when available")

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")


@dataclass
class FinetuneOutput:
    model: Any
    result: Any  # training.TrainResult
    info: dict[str, Any]  # run.json: trainable/total parameters, held-out eval before and after


def is_jsonl(path: str | Path) -> bool:
    return Path(path).suffix.lower() in (".jsonl", ".json")


def finetune(cfg: FinetuneConfig, progress: bool = True, console: Any = None, eval_data: Any = None,
             callbacks: Sequence[Any] = ()) -> FinetuneOutput:
    """Fine-tune `cfg.base` on `cfg.data`; every input is checked before training.

    `eval_data`: a callable returning the held-out batches to use instead of the data's own
    validation tail (e.g. a validation split for choosing the learning rate). `callbacks`:
    passed to the Trainer (objects with `on_step(trainer, row)` / `on_eval(trainer, row)`)."""
    import torch

    from ..data import iter_eval_batches, prepare_corpus, sample_batch
    from ..rundir import RunDir, claim_out_dir
    from ..settings import to_yaml
    from ..training import SingleDevice, Trainer, evaluate
    from ..training.lora import apply_lora, lora_config, save_lora, trainable_parameters
    from ..training.sft_data import SFTDataset, encode_sft, read_sft_jsonl

    base, out, t = RunDir.open(cfg.base, role="base model"), Path(cfg.out), cfg.train
    if out.resolve() == base.path.resolve():
        raise ValueError(f"--out {out} is the base model's own directory; write the fine-tuned run elsewhere")
    claim_out_dir(out, cfg.resume, cfg.overwrite)
    tok = base.load_tokenizer()
    if is_jsonl(cfg.data):
        records = read_sft_jsonl(cfg.data)
        n_val = int(len(records) * cfg.val_fraction)
        enc = encode_sft(records, tok, t.seq_len)
        train_ds = SFTDataset(enc[:len(enc) - n_val], tok.pad_token_id)
        val_ds = SFTDataset(enc[len(enc) - n_val:], tok.pad_token_id) if n_val else None
        train_batch = train_ds.batch_fn(t.batch_size, t.seed)
        eval_batches = val_ds.eval_batches(t.batch_size) if val_ds else None
    else:
        data = prepare_corpus(cfg.data, cfg.cache_dir, tokenizer=tok, val_fraction=cfg.val_fraction)
        train, val = data.tokens.train, data.tokens.val
        train_batch = lambda i: sample_batch(train, t.batch_size, t.seq_len, i, t.seed)  # noqa: E731
        eval_batches = lambda: iter_eval_batches(val, t.batch_size, t.seq_len, max_batches=t.eval_batches)  # noqa: E731
    if eval_data is not None:
        eval_batches = eval_data
    model = base.load_model().train()
    if cfg.lora.enabled:
        torch.manual_seed(t.seed)  # LoRA A is initialised randomly: same seed, same adapter
        lo = cfg.lora
        model = apply_lora(model, lora_config(lo.targets, lo.r, lo.alpha, lo.dropout))
    n_train, n_total = trainable_parameters(model)
    before = evaluate(model, eval_batches()) if eval_batches else None
    trainer = Trainer(model, t, train_batch=train_batch, eval_batches=eval_batches, out_dir=out, progress=progress,
                      strategy=SingleDevice(cfg.device), console=console, callbacks=callbacks)
    result = trainer.fit(resume=cfg.resume)
    info = run_info("finetune-lora" if cfg.lora.enabled else "finetune-full", cfg, result,
                    base_model=str(base.path.resolve()), data=str(Path(cfg.data).resolve()),
                    trainable_params=n_train, total_params=n_total, eval_before=before,
                    eval_after=result.final_eval)
    if cfg.lora.enabled:
        save_lora(model, tok, out, base.path, info, config_yaml=to_yaml(cfg))
    else:
        RunDir.save(out, model, tok, info, config_yaml=to_yaml(cfg))
    return FinetuneOutput(model, result, info)
