"""The pre-training recipe: corpus -> tokenizer -> token cache -> model -> Trainer -> run directory.

`autoglm train` is this recipe; `configs/pretrain-*.yaml` are its configs. The run
directory it writes is described in `autoglm.rundir`.

Example:
    >>> from autoglm.settings import load_config
    >>> cfg = load_config(PretrainConfig, overrides={"model.preset": "tiny", "train.max_steps": 20})
    >>> cfg.model.preset, cfg.train.max_steps, cfg.train.warmup_steps, cfg.data.path is None
    ('tiny', 20, 2, True)
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from ..distributed.config import DistributedSpec
from ..settings import section, setting
from ..training.config import TrainConfig
from .common import ModelSpec, TextData, run_info

__all__ = ["PretrainConfig", "EarlyExitSpec", "PretrainOutput", "pretrain"]

log = logging.getLogger(__name__)


@dataclass
class EarlyExitSpec:
    """LayerSkip-style exits trained with the model (see `training.EarlyExitObjective`)."""

    enabled: bool = setting(False, "also train early exits: intermediate layers get a next-token loss through "
                                   "the shared head, so `autoglm serve` can stop decoding early", flag="early_exit")
    weight: float = setting(1.0, "weight of the exit losses against the last layer's", flag="exit_weight")
    layers: tuple[int, ...] | None = setting(None, "layers after which exits are trained (and tried when serving); "
                                                   "none = every intermediate layer", flag="exit_layers")
    target: Literal["labels", "model"] = setting(
        "labels", "what the exits learn: labels (the next token of the text, LayerSkip) or model (the last layer's "
                  "own distribution, self-distillation: the exit then drafts what the full model would say, for "
                  "self-speculative decoding)", flag="exit_target")

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ValueError(f"weight must be >= 0, got {self.weight}")
        if self.layers is not None and (not self.layers or min(self.layers) < 1):
            raise ValueError(f"layers must be layer counts >= 1, e.g. 2 or 2,4; got {self.layers}")


@dataclass
class PretrainConfig:
    out: Path = setting(Path("runs/default"), "run directory: model, tokenizer, metrics, checkpoints")
    model: ModelSpec = section(ModelSpec)
    data: TextData = section(TextData)
    train: TrainConfig = section(TrainConfig)
    early_exit: EarlyExitSpec = section(EarlyExitSpec)
    dist: DistributedSpec = section(DistributedSpec, "processes and strategy (torchrun): ddp, fsdp, zero1, ...")
    init_from: Path | None = setting(None, "start from this run's weights and tokenizer instead of a fresh model "
                                           "(continued pre-training, e.g. a second phase with other settings)")
    resume: bool = setting(False, "continue from OUT/checkpoints/latest with OUT/config.yaml's settings (options "
                                  "given override them; a longer --steps is fine)")
    overwrite: bool = setting(False, "replace the run already saved in OUT (it is deleted first); without it such "
                                     "an OUT is refused")
    device: str | None = setting(None, "cpu, cuda or cuda:N; none = cuda when available")
    sample_prompt: str = setting("The", "prompt of the sample generated at the end; '' = no sample")


@dataclass
class PretrainOutput:
    model: Any  # OpenAutoGLMForCausalLM, trained (unsharded); None on ranks other than the main one
    tokenizer: Any
    result: Any  # training.TrainResult
    run: Any  # RunDir; None on ranks other than the main one
    source: str  # the corpus it trained on


def pretrain(cfg: PretrainConfig, progress: bool = True, console: Any = None, callbacks: Sequence[Any] = (),
             tokenizer: Any = None, prepared: Any = None) -> PretrainOutput:
    """Train `cfg.model` on `cfg.data` and save the run directory `cfg.out`. `tokenizer`: use
    this one instead of training a new one; `prepared`: the corpus already tokenized
    (`data.prepare_corpus`), so several runs on one corpus read and tokenize it once."""
    import torch

    from ..atomic import atomic_files
    from ..data import iter_eval_batches, prepare_corpus
    from ..distributed import make_strategy
    from ..distributed.data import rank_batch
    from ..distributed.runtime import torchrun_rank
    from ..rundir import RunDir, claim_out_dir
    from ..settings import to_yaml
    from ..training import EarlyExitObjective, Trainer
    from .common import build_model

    out = Path(cfg.out)
    if cfg.resume and not (out / "checkpoints").is_dir():
        raise FileNotFoundError(f"resume requested but {out / 'checkpoints'} does not exist; drop --resume to "
                                f"start a new run, or point --out at an earlier run")
    if cfg.resume:
        _check_resumed_data(cfg, out)
    if torchrun_rank() == 0:  # one process deletes a run being replaced
        claim_out_dir(out, cfg.resume, cfg.overwrite)
    elif not cfg.overwrite:
        claim_out_dir(out, cfg.resume)  # refuses as the main rank does
    init = RunDir.open(cfg.init_from, role="init_from run") if cfg.init_from is not None else None
    init_model = init.load_model() if init is not None else None
    model_cfg = init_model.config if init_model is not None else cfg.model.config()
    if cfg.train.seq_len > model_cfg.max_position_embeddings:
        raise ValueError(f"train.seq_len ({cfg.train.seq_len}) is longer than the model's "
                         f"max_position_embeddings ({model_cfg.max_position_embeddings}); lower --seq-len")
    ee = cfg.early_exit
    if ee.enabled and ee.layers is not None and max(ee.layers) >= model_cfg.num_hidden_layers:
        raise ValueError(f"early_exit.layers {list(ee.layers)} must be < the model's {model_cfg.num_hidden_layers} "
                         f"layers (the last layer is the full model)")
    t = cfg.train
    # a multi-process strategy joins torchrun's process group here; its checks run before any work
    strategy = make_strategy(cfg.dist.strategy, device=cfg.device, **cfg.dist.strategy_options())
    strategy.check(model_cfg, t)
    if cfg.resume and (out / "tokenizer.json").is_file():
        tokenizer = RunDir(out).load_tokenizer()
    elif init is not None:
        tokenizer = init.load_tokenizer()

    def prepare() -> Any:
        return prepared or prepare_corpus(cfg.data.path, cfg.data.cache_dir,
                                          cfg.model.vocab_size or model_cfg.vocab_size, tokenizer,
                                          cfg.data.val_fraction, cfg.data.extra_train)

    def write_run_files(data: Any) -> None:
        # the tokenizer and config a resume needs, written before step 1: a run stopped before its
        # final save resumes with the token ids and settings it started with
        if not cfg.resume:
            with atomic_files(out) as tmp:
                data.tokenizer.save_pretrained(tmp)
                (tmp / "config.yaml").write_text(to_yaml(cfg))

    if strategy.world_size > 1:
        # the main process trains the tokenizer, builds the token cache and saves the tokenizer
        # into OUT; the others then load that tokenizer (not train it again) and read the cache
        data = prepare() if strategy.is_main else None
        if strategy.is_main:
            write_run_files(data)
        strategy.barrier()
        if not strategy.is_main:
            if tokenizer is None and prepared is None and (out / "tokenizer.json").is_file():
                tokenizer = RunDir(out).load_tokenizer()  # (a resumed run without one trains it again)
            data = prepare()
    else:
        data = prepare()
        write_run_files(data)
    torch.manual_seed(t.seed)
    model = init_model.train() if init_model is not None else build_model(cfg.model, len(data.tokenizer))
    objective = EarlyExitObjective(ee.weight, ee.layers, ee.target) if ee.enabled else None
    train, val = data.tokens.train, data.tokens.val
    dp_rank, dp_size = strategy.data_parallel_rank, strategy.data_parallel_size
    trainer = Trainer(model, t, train_batch=lambda i: rank_batch(train, t.batch_size, t.seq_len, i, t.seed, dp_rank,
                                                                 dp_size),
                      eval_batches=lambda: iter_eval_batches(val, t.batch_size, t.seq_len, max_batches=t.eval_batches),
                      out_dir=out, objective=objective, progress=progress, strategy=strategy,
                      console=console, callbacks=callbacks)
    guard = getattr(strategy, "collective_errors", None)  # a dead rank: one clear error, not a hang
    with guard() if guard is not None else contextlib.nullcontext():
        result = trainer.fit(resume=cfg.resume)
        model = strategy.export_model(trainer.model)  # sharded strategies gather the full weights here
    if not strategy.is_main:
        return PretrainOutput(None, data.tokenizer, result, None, data.source)
    extra: dict[str, Any] = {"data": data.source, "token_cache": str(data.tokens.path)}
    if ee.enabled:  # what `autoglm serve` reads to try exactly the trained exits
        layers = ee.layers if ee.layers is not None else range(1, model.config.num_hidden_layers)
        extra["early_exit"] = {"layers": list(layers), "weight": ee.weight, "target": ee.target}
    info = run_info("pretrain", cfg, result, **extra)
    # config.yaml is the recipe of the whole run (what --config re-runs), resumed or not
    run = RunDir.save(out, model, data.tokenizer, info, config_yaml=to_yaml(replace(cfg, resume=False)))
    return PretrainOutput(model, data.tokenizer, result, run, data.source)


def _check_resumed_data(cfg: PretrainConfig, out: Path) -> None:
    """A resumed run must read the corpus it started on: the same token ids at the same data
    position. OUT/config.yaml (written before the first step) says which one that was."""
    from ..settings import load_config

    saved_file = out / "config.yaml"
    if not saved_file.is_file():
        return  # a run from before config.yaml was written at the start: nothing to compare
    saved = load_config(PretrainConfig, saved_file).data
    for field in ("path", "extra_train", "val_fraction"):
        a, b = getattr(saved, field), getattr(cfg.data, field)
        if _same_files(a) != _same_files(b):
            raise ValueError(f"resume: the run in {out} trained with data.{field} = {_shown(a)} but this command "
                             f"gives {_shown(b)}; resume on the same data (drop the option: --resume reads "
                             f"{saved_file}), or start a new run (another --out, or --init-from {out} for a second "
                             f"phase on new data)")


def _same_files(v: Any) -> Any:
    """A data setting with its paths resolved, so runs/x and ./runs/x compare equal."""
    if isinstance(v, Path):
        return v.resolve()
    return tuple(_same_files(x) for x in v) if isinstance(v, tuple) else v


def _shown(v: Any) -> str:
    if v is None:
        return "the built-in corpus"
    if isinstance(v, tuple):
        return "[" + ", ".join(map(str, v)) + "]"
    return str(v)
