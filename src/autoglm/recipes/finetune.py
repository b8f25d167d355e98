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

__all__ = ["FinetuneConfig", "LoraSpec", "FinetuneOutput", "finetune", "is_jsonl", "check_modules_to_save"]


@dataclass
class LoraSpec:
    enabled: bool = setting(False, "LoRA through PEFT instead of full fine-tuning (only the adapter is saved)",
                            flag="lora")
    targets: tuple[str, ...] = setting(("q_proj", "v_proj"), "modules that get LoRA: projection names, full "
                                                             "module names, or 'experts'", flag="target")
    r: int = setting(8, "LoRA rank")
    alpha: int = setting(16, "LoRA scaling numerator (the update is scaled by alpha / r)", flag="lora_alpha")
    dropout: float = setting(0.05, "dropout on the LoRA input", flag="lora_dropout")
    modules_to_save: tuple[str, ...] = setting((), "modules trained in full next to LoRA and saved with the adapter "
                                                   "(e.g. router, norm, lm_head); each must match a module",
                                               flag="modules_to_save")

    def __post_init__(self) -> None:
        if not self.targets:
            raise ValueError("targets is empty; name at least one module, e.g. q_proj,v_proj")
        if self.r < 1 or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"need r >= 1 and 0 <= dropout < 1; got r={self.r}, dropout={self.dropout}")
        if self.alpha <= 0:
            raise ValueError(f"alpha must be > 0 (the update is scaled by alpha / r), got {self.alpha}")


def check_modules_to_save(model: Any, names: Sequence[str]) -> list[str]:
    """Each `modules_to_save` entry must match a module the way PEFT matches one (every module
    whose full name ends with it: "norm" is every norm, "layers.1.mlp.router" one router):
    PEFT skips a name that matches nothing without a word, and the run would then train and
    save less than asked. Returns the names."""
    modules = [n for n, _ in model.named_modules() if n]
    for name in names:
        if not any(n.endswith(name) for n in modules):
            leaves = sorted({n.rsplit(".", 1)[-1] for n in modules if not n.rsplit(".", 1)[-1].isdigit()})
            raise ValueError(f"modules_to_save entry {name!r} matches no module of {type(model).__name__}; "
                             f"available names: {', '.join(leaves)} (or a full module name)")
    return list(dict.fromkeys(names))


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
        if not self.lora.enabled:
            # naming modules for LoRA without --lora would silently give a full fine-tuning run (a full
            # model in OUT instead of an adapter); r / alpha / dropout stay free, as scripts that run
            # both modes with one rank setting pass them to every run
            flags = {"targets": "--target", "modules_to_save": "--modules-to-save"}
            changed = [f for f in flags if getattr(self.lora, f) != getattr(_LORA_DEFAULTS, f)]
            if changed:
                raise ValueError(f"{', '.join('lora.' + f + ' (' + flags[f] + ')' for f in changed)} "
                                 f"{'is a LoRA option' if len(changed) == 1 else 'are LoRA options'} but LoRA is "
                                 f"off: add --lora (adapter only), or drop {', '.join(flags[f] for f in changed)} "
                                 f"for full fine-tuning")


_LORA_DEFAULTS = LoraSpec()


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
    if not cfg.overwrite:
        claim_out_dir(out, cfg.resume)  # a saved run in OUT is refused before any slow step
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
    if t.seq_len > model.config.max_position_embeddings:
        raise ValueError(f"train.seq_len (--seq-len {t.seq_len}) is longer than the base model's context "
                         f"(max_position_embeddings={model.config.max_position_embeddings}); lower --seq-len to "
                         f"{model.config.max_position_embeddings} or less")
    if cfg.lora.enabled:
        # adapter_config.json records the base model's path: make it absolute so that PEFT's own
        # loaders (AutoPeftModelForCausalLM.from_pretrained(OUT)) find it from any directory
        model.name_or_path = model.config._name_or_path = str(base.path.resolve())
        torch.manual_seed(t.seed)  # LoRA A is initialised randomly: same seed, same adapter
        lo = cfg.lora
        to_save = check_modules_to_save(model, lo.modules_to_save)
        model = apply_lora(model, lora_config(lo.targets, lo.r, lo.alpha, lo.dropout, modules_to_save=to_save))
    if cfg.overwrite:  # the run being replaced goes only once every input has been checked
        claim_out_dir(out, cfg.resume, overwrite=True)
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
