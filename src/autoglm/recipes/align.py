"""The multimodal alignment recipe: image-text pairs -> image encoder + Open-AutoGLM text
backbone aligned in one embedding space (CLIP loss, momentum encoders, negative queues) ->
aligned model directory + evaluation (zero-shot, recall@K, linear probe).

`autoglm align` is `align(AlignConfig)`, `autoglm align eval DIR` is `evaluate(AlignEvalConfig)`,
`autoglm align projector` trains the language model's image prefix (`ProjectorConfig`,
see `autoglm.multimodal.projector`); benchmarks/alignment.py calls the same functions.
Without a file the built-in digits run (no download); configs/align-digits.yaml is the
config behind the documented result.

Example:
    >>> from autoglm.settings import load_config
    >>> cfg = load_config(AlignConfig, overrides={"train.max_steps": 20, "loss.queue_size": 128})
    >>> cfg.data.source, cfg.text.model, cfg.loss.momentum, cfg.loss.queue_size, cfg.train.batch_size
    ('digits', 'tiny', 0.995, 128, 64)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..distributed.config import DistributedSpec
from ..multimodal.encoders import ImageEncoderConfig
from ..multimodal.model import LossConfig
from ..settings import section, setting
from ..training.config import TrainConfig

__all__ = ["ALIGN_STRATEGIES", "AlignData", "TextTower", "AlignDistributed", "AlignConfig", "AlignEvalConfig",
           "ProjectorConfig", "AlignOutput", "load_split", "run_data", "run_stratified", "align", "train_supervised", "evaluate", "evaluate_model",
           "train_projector"]

log = logging.getLogger(__name__)

# strategies `align` runs under: one process, or full replicas (the gathered loss needs the
# global batch's features on every rank, and the momentum EMA reads whole weights)
ALIGN_STRATEGIES = ("single", "ddp", "zero1")


@dataclass
class AlignData:
    source: str = setting("digits", "'digits' (scikit-learn's bundled 8x8 digits, captions from templates), a "
                                    "CSV/TSV/JSONL (or JSON array) of image paths and captions, a folder of pairs "
                                    "(cat.png + cat.txt, one caption per line), or a COCO captions JSON", flag="data")
    image_root: Path | None = setting(None, "folder the image paths are relative to; none = the caption file's")
    image_col: str = setting("image", "column (CSV) or field (JSONL) holding the image path")
    caption_col: str = setting("caption", "column or field holding the caption")
    sep: str | None = setting(None, "CSV separator; none = tab for .tsv, else ','")
    label_col: str | None = setting(None, "column or field holding each image's class (a class name, or an index "
                                          "into the class names file), for zero-shot and the linear probe; none "
                                          "= no labels (retrieval only)")
    val_fraction: float = setting(0.15, "share of the images held out for validation (settings are chosen here)")
    test_fraction: float = setting(0.2, "share of the images held out for the reported test numbers")
    split_seed: int = setting(0, "seed of the (stratified, where there are labels) split")
    class_names: Path | None = setting(None, "text file, one class name per line, for zero-shot; none = the "
                                             "source's own (digits: zero .. nine)")
    templates: Path | None = setting(None, "text file, one zero-shot prompt template per line with {name} (and "
                                           "{digit} = class index); none = the built-in ensemble")
    crop_scale: tuple[float, float] = setting((0.6, 1.0), "random resized crop: area share range")
    hflip: float = setting(0.0, "probability of a left-right flip (0 for digits: a mirrored 2 is no 2)")
    word_mask: float = setting(0.1, "probability of dropping each caption word")
    max_caption_tokens: int = setting(32, "captions are cut to this many tokens (end-of-text included)")

    def __post_init__(self) -> None:
        self.crop_scale = tuple(self.crop_scale)
        if not (0 <= self.val_fraction < 1 and 0 <= self.test_fraction < 1 and self.val_fraction + self.test_fraction < 1):
            raise ValueError(f"val_fraction ({self.val_fraction}) and test_fraction ({self.test_fraction}) must be "
                             f">= 0 with a sum below 1")
        if self.max_caption_tokens < 2:
            raise ValueError(f"max_caption_tokens must be >= 2, got {self.max_caption_tokens}")
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"crop_scale {list(self.crop_scale)} must be two area shares 0 < min <= max <= 1, "
                             f"e.g. 0.6,1.0 (1,1 = no crop)")
        for name in ("hflip", "word_mask"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be a probability in [0, 1], got {getattr(self, name)}")


@dataclass
class TextTower:
    model: str = setting("tiny", "text backbone: a model preset (fresh weights, a tokenizer trained on the "
                                 "captions) or a run directory of `autoglm train` (its weights and tokenizer)",
                         flag="text_model")
    vocab_size: int = setting(512, "tokenizer vocabulary trained on the captions (preset only)")
    pooling: Literal["last", "mean"] = setting("last", "caption summary: the end-of-text token's state, or the mean")


@dataclass
class AlignDistributed(DistributedSpec):
    """The `dist` section of `align`: one process or full replicas (the two towers are small
    enough to replicate, and the momentum encoders' EMA reads whole, unsharded weights)."""

    strategy: str = setting("single", "single (one process), ddp (DistributedDataParallel) or zero1 "
                                      "(ZeroRedundancyOptimizer over DDP)")
    param_dtype: Literal["fp32", "bf16"] = setting("fp32", "fsdp only (not used by align)", cli=False)
    reduce_dtype: Literal["fp32", "bf16"] = setting("fp32", "fsdp only (not used by align)", cli=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.strategy not in ALIGN_STRATEGIES:
            raise ValueError(f"strategy {self.strategy!r} does not train an aligned model; use "
                             f"{', '.join(ALIGN_STRATEGIES)} (ddp or zero1 on several processes: the towers are "
                             f"replicated, not sharded, since the momentum encoders update from whole weights)")


@dataclass
class AlignConfig:
    out: Path = setting(Path("runs/align"), "output directory: aligned model, tokenizer, metrics, checkpoints")
    data: AlignData = section(AlignData, "image-text pairs and augmentations")
    image: ImageEncoderConfig = section(ImageEncoderConfig, "the ViT-style image encoder")
    text: TextTower = section(TextTower, "the text backbone")
    loss: LossConfig = section(LossConfig, "shared space, temperature, momentum encoders and queues")
    train: TrainConfig = section(TrainConfig, "optimiser and loop", batch_size=64, max_steps=600, lr=1e-3,
                                 weight_decay=0.05, betas=(0.9, 0.98), eval_every=100, save_every=300,
                                 log_every=10, seq_len=32)
    resume: bool = setting(False, "continue from OUT/checkpoints/latest")
    overwrite: bool = setting(False, "replace the run already in OUT (aligned model or checkpoints; it is deleted "
                                     "first); without it such an OUT is refused")
    device: str | None = setting(None, "cpu, cuda or cuda:N; none = cuda when available")
    dist: AlignDistributed = section(AlignDistributed, "processes and strategy (torchrun): ddp or zero1, every "
                                                       "rank's features gathered into one global batch (OpenCLIP's "
                                                       "gather-with-grad)")


@dataclass
class AlignEvalConfig:
    model_dir: Path | None = setting(None, "an aligned model directory (`autoglm align --out`)", argument=True,
                                     required=True)
    data: AlignData = section(AlignData, "the pairs and split to evaluate on: without --data the training run's "
                                         "(source, columns, split, class names, templates), with any other data "
                                         "option given on top")
    split: Literal["val", "test"] = setting("test", "which held-out split to report")
    probe: bool = setting(True, "also fit the supervised linear probe on the training split's image embeddings")
    json_out: Path | None = setting(None, "also write the result as JSON here")


@dataclass
class ProjectorConfig:
    align_dir: Path | None = setting(None, "aligned model directory whose image encoder is used", required=True)
    lm: Path | None = setting(None, "language model run directory (`autoglm train`); the projector is saved "
                                    "under LM/adapters/NAME", required=True)
    name: str = setting("image", "adapter name under LM/adapters/")
    prefix_tokens: int = setting(4, "image embeddings enter the model as this many prefix tokens")
    hidden: int = setting(256, "hidden width of the projector MLP")
    data: AlignData = section(AlignData, "image-caption pairs (the split of the aligned run)", word_mask=0.0)
    train: TrainConfig = section(TrainConfig, "optimiser and loop (the backbone stays frozen); lr and steps "
                                 "chosen on validation captions of digits", batch_size=64,
                                 max_steps=1000, lr=1e-2, weight_decay=0.0, eval_every=0, save_every=0,
                                 log_every=10, seq_len=32)
    caption_end: str = setting("\n", "text that ends a caption in training and stops a generated one (the "
                                     "language model's line end); '' = its end-of-text token")
    eval_samples: int = setting(200, "held-out images captioned greedily to score caption accuracy")
    eval_split: Literal["val", "test"] = setting("test", "the held-out split they come from (choose settings on val)")
    device: str | None = setting(None, "cpu, cuda or cuda:N; none = cuda when available")


@dataclass
class AlignOutput:
    model: Any  # AlignModel (with momentum towers while training), eval mode
    tokenizer: Any
    result: Any  # training.TrainResult
    out: Path
    eval: dict[str, Any]  # evaluate_model on val and test
    curve: list[dict[str, float]]  # zero-shot val accuracy during training
    seconds_per_epoch: float


# ------------------------------------------------------------------ data
def _read_lines(path: Path, what: str) -> tuple[str, ...]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{what} file {path} does not exist; give a text file with one entry per line")
    lines = tuple(x.strip() for x in Path(path).read_text(encoding="utf-8").splitlines() if x.strip())
    if not lines:
        raise ValueError(f"{what} file {path} is empty")
    return lines


def load_split(d: AlignData, channels: int = 1, size: int = 16, stratify: bool | None = None) -> dict[str, Any]:
    """{"data": PairData, "train"/"val"/"test": PairData subsets, "class_names", "templates"}.
    The split is stratified by class where the data has labels, unless `stratify` is False
    (a run trained without labels, evaluated with them, keeps its own split)."""
    from ..multimodal.data import ZERO_SHOT_TEMPLATES, load_pairs, split_indices

    names = _read_lines(d.class_names, "class names") if d.class_names is not None else ()
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"class names file {d.class_names} names {dup} more than once; give each class one line")
    pairs = load_pairs(d.source, d.image_root, d.image_col, d.caption_col, d.sep, channels, size, d.label_col, names)
    if pairs.images.shape[1] != channels:  # digits are grey; an RGB encoder gets three equal channels
        pairs.images = pairs.images.expand(-1, channels, -1, -1).contiguous() if channels == 3 else \
            pairs.images.mean(1, keepdim=True)
    if pairs.labels is None and (d.class_names is not None or d.templates is not None):
        given = "class_names (--class-names)" if d.class_names is not None else "templates (--templates)"
        raise ValueError(f"{given} is for zero-shot classification, which needs each image's class: {d.source} has "
                         f"no labels; set label_col (--label-col) to the caption table's class column, or drop it")
    if pairs.labels is not None and names and int(pairs.labels.max()) >= len(names):
        raise ValueError(f"class names file {d.class_names} has {len(names)} names but {d.source} has class index "
                         f"{int(pairs.labels.max())}; give one name per class, in class-index order")
    tr, va, te = split_indices(len(pairs), d.val_fraction, d.test_fraction, d.split_seed,
                               pairs.labels if stratify is not False else None)
    names = names or pairs.class_names
    templates = _read_lines(d.templates, "templates") if d.templates is not None else ZERO_SHOT_TEMPLATES
    for t in templates:
        if "{name}" not in t and "{digit}" not in t:
            raise ValueError(f"template {t!r} names no class; put {{name}} where the class name goes")
        try:
            t.format(name="x", digit=0)
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"template {t!r} is not a valid format string ({type(e).__name__}: {e}); only {{name}} "
                             f"and {{digit}} may stand in braces (write {{{{ and }}}} for literal braces)") from None
    return {"data": pairs, "train": pairs.subset(tr), "val": pairs.subset(va), "test": pairs.subset(te),
            "class_names": tuple(names), "templates": tuple(templates)}


def _absolute_data(d: AlignData) -> dict[str, Any]:
    """`d` as a dict with its paths made absolute, saved with the aligned model so that
    `autoglm align eval` finds the run's data from any working directory."""
    from ..settings import to_dict

    out = to_dict(d)
    if d.source != "digits":
        out["source"] = str(Path(d.source).resolve())
    for k in ("image_root", "class_names", "templates"):
        if getattr(d, k) is not None:
            out[k] = str(Path(getattr(d, k)).resolve())
    return out


def _claim_out(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse (or with `overwrite` delete) an OUT that holds an aligned model, checkpoints or
    another saved run, before anything is written into it."""
    import shutil

    from ..multimodal.store import ALIGN_FILES
    from ..rundir import KINDS, RunDir

    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file, not a directory; choose a directory for the run")
    if resume:
        if not (out / "checkpoints").is_dir():
            raise FileNotFoundError(f"resume requested but {out / 'checkpoints'} does not exist; drop --resume to "
                                    f"start a new run, or point --out at an earlier run")
        return
    held = [f for f in ALIGN_FILES if (out / f).is_file()] + (["checkpoints/"] if (out / "checkpoints").is_dir()
                                                               else [])
    kind = RunDir.detect(out)
    if kind not in (None, "align"):  # an aligned run is named by its files above
        held.append(KINDS[kind][1])
    if not held:
        return
    if not overwrite:
        raise FileExistsError(f"{out} already holds a run ({', '.join(held)}); pass --resume to continue it, "
                              f"--overwrite to replace it, or choose another --out")
    log.warning("--overwrite: deleting the run in %s", out)
    shutil.rmtree(out)


def _global_batch(n: int, batch_size: int, world_size: int) -> int:
    """Pairs per global batch (all of a split smaller than `batch_size`); it must split evenly
    over the data-parallel ranks."""
    B = min(batch_size, n)
    if B % world_size:
        held = "" if B == batch_size else f", all of the training split's {n}"
        raise ValueError(f"the global batch ({B} pairs{held}) must be divisible by the {world_size} data-parallel "
                         f"ranks; use --batch-size {max(world_size, B // world_size * world_size)} or another --nproc")
    return B


def _batch_fn(train: Any, tokenizer: Any, d: AlignData, image_size: int, batch_size: int, seed: int,
              rank: int = 0, world_size: int = 1):
    """Micro-batch i as a pure function of (seed, i): images sampled without replacement,
    one of each image's captions, random resized crop (+ flip), word masking. With several
    data-parallel ranks, rank r keeps rows [r B/W, (r + 1) B/W) of that global batch: every
    rank makes the whole batch's random draws (cheap) and crops only its own images, so the
    union of the ranks' rows is exactly one process's batch."""
    import numpy as np
    import torch

    from ..distributed.data import rank_rows
    from ..multimodal.augment import mask_words, random_hflip, random_resized_crop
    from ..multimodal.evaluate import encode_captions

    n = len(train)
    B = _global_batch(n, batch_size, world_size)
    rows = rank_rows(B, rank, world_size)

    def batch(i: int) -> dict[str, Any]:
        rng = np.random.default_rng([seed, i])
        g = torch.Generator().manual_seed(int(rng.integers(2**62)))
        idx = rng.choice(n, B, replace=False)
        caps = [train.captions[j][int(rng.integers(len(train.captions[j])))] for j in idx]
        caps = [mask_words(c, d.word_mask, g) for c in caps]
        own = torch.from_numpy(idx[rows])  # the image work is this rank's rows only; the draws are the batch's
        images = random_resized_crop(train.images[own], image_size, d.crop_scale, generator=g, part=(B, rows))
        images = random_hflip(images, d.hflip, g, part=(B, rows))
        ids, mask = encode_captions(tokenizer, caps, d.max_caption_tokens)  # padded as the whole batch
        out = {"images": images, "input_ids": ids[rows], "attention_mask": mask[rows]}
        if train.labels is not None:  # read by the supervised reference and false_negatives='same_label'
            out["labels"] = train.labels[own]
        return out

    return batch


def _text_backbone(t: TextTower, captions: list[str], out: Path, resume: bool) -> tuple[Any, Any, str]:
    """(backbone, tokenizer, description) from a preset (a tokenizer trained on `captions`, saved
    into `out` at once so that a resumed run tokenizes the same; with `resume` the one in `out`
    is read back: a resumed run's, or the main rank's on the other ranks) or a run."""
    from ..config import PRESETS
    from ..tokenizer import load_tokenizer, save_tokenizer, train_tokenizer

    if t.model in PRESETS:
        from ..config import OpenAutoGLMConfig
        from ..hf import OpenAutoGLMForCausalLM

        if not (resume and (out / "tokenizer.json").is_file()):
            save_tokenizer(train_tokenizer(captions, vocab_size=t.vocab_size), out)
        tok = load_tokenizer(out)
        lm = OpenAutoGLMForCausalLM(OpenAutoGLMConfig.from_name(t.model, vocab_size=len(tok)))
        return lm.model, tok, f"preset {t.model}"
    from ..rundir import RunDir

    lm, tok = RunDir.open(t.model, role="text model").load()
    return lm.model.train(), tok, f"run {t.model}"


# ------------------------------------------------------------------- eval
def evaluate_model(model: Any, tokenizer: Any, split: dict[str, Any], which: str = "test", probe: bool = True,
                   max_len: int = 32) -> dict[str, Any]:
    """Zero-shot accuracy (where the data has labels), recall@1/5 both ways, and the linear
    probe (train-split embeddings; C chosen on val; `which` reported), all in percent."""
    from ..multimodal.evaluate import class_embeddings, embed_images, linear_probe, retrieval, zero_shot_accuracy

    part = split[which]
    out: dict[str, Any] = {"split": which, "images": len(part), "captions": sum(len(c) for c in part.captions)}
    if not len(part):  # val_fraction / test_fraction 0: nothing to score
        log.warning("the %s split is empty (its fraction is 0): no %s metrics", which, which)
        return out
    img = embed_images(model, part.images)
    if part.labels is not None and split["class_names"]:
        cls = class_embeddings(model, tokenizer, split["class_names"], split["templates"], max_len)
        out["zero_shot_acc"] = zero_shot_accuracy(img, cls, part.labels)
    out.update(retrieval(model, tokenizer, part.images, part.captions, max_len=max_len))
    tr, va = split["train"], split["val"]
    if probe and part.labels is not None and (not len(va) or len(tr.labels.unique()) < 2):
        log.warning("no linear probe: it needs a validation split (to choose C) and two classes in training")
    elif probe and part.labels is not None:
        res = linear_probe(embed_images(model, tr.images), tr.labels, embed_images(model, va.images), va.labels,
                           img, part.labels)
        out["probe_acc"] = res["test_acc"]
        out["probe_C"] = res["C"]
    return out


class ZeroShotCurve:
    """Trainer callback: zero-shot accuracy on the validation split every `every` steps."""

    def __init__(self, split: dict[str, Any], tokenizer: Any, every: int, steps_per_epoch: float, max_len: int) -> None:
        self.split, self.tok, self.every, self.spe, self.max_len = split, tokenizer, every, steps_per_epoch, max_len
        self.points: list[dict[str, float]] = []
        self.seconds = 0.0
        self._next: int | None = None  # set at the first row (a resumed run starts past step 1)

    def on_step(self, trainer: Any, row: dict[str, float]) -> None:
        from ..multimodal.evaluate import class_embeddings, embed_images, zero_shot_accuracy

        step = int(row["step"])
        if self.every and self._next is None:
            self._next = ((step - 1) // self.every + 1) * self.every
        if not self.every or step < self._next or self.split["val"].labels is None or not len(self.split["val"]):
            return
        self._next = (step // self.every + 1) * self.every
        t = time.perf_counter()
        model = trainer.strategy.unwrap(trainer.model)
        import torch

        with torch.random.fork_rng(devices=[]):
            cls = class_embeddings(model, self.tok, self.split["class_names"], self.split["templates"], self.max_len)
            acc = zero_shot_accuracy(embed_images(model, self.split["val"].images), cls, self.split["val"].labels)
        self.points.append({"step": step, "epoch": round(step / self.spe, 2), "val_zero_shot_acc": acc})
        log.info("step %d (epoch %.1f): zero-shot val accuracy %.2f%%", step, step / self.spe, acc)
        self.seconds += time.perf_counter() - t


# ------------------------------------------------------------------ train
def align(cfg: AlignConfig, progress: bool = True, console: Any = None, split: dict[str, Any] | None = None,
          evaluate_at_end: bool = True, callbacks: Sequence[Any] = ()) -> AlignOutput:
    """Train the aligned model on `cfg.data` (or a `load_split` result) and save `cfg.out`;
    evaluate it on the val and test splits. `callbacks`: more Trainer callbacks.

    Under torchrun (`cfg.dist`: ddp or zero1) every rank trains on its slice of each global
    batch, with every rank's features gathered into the loss, so the run follows one process
    training on the whole batch; the main rank trains the tokenizer, evaluates and saves, and
    the others return an AlignOutput whose model is None."""
    import contextlib

    import torch

    from ..distributed import make_strategy
    from ..distributed.runtime import torchrun_rank
    from ..multimodal.model import AlignModel, AlignObjective
    from ..multimodal.store import save_aligned
    from ..settings import to_yaml
    from ..training import Trainer
    from .common import run_info

    out = Path(cfg.out)
    if cfg.resume and cfg.overwrite:
        raise ValueError("resume and overwrite exclude each other: --resume continues the run in OUT, --overwrite "
                         "deletes it")
    split = split or load_split(cfg.data, cfg.image.channels, cfg.image.image_size)
    if cfg.loss.false_negatives == "same_label" and split["train"].labels is None:
        raise ValueError(f"loss.false_negatives 'same_label' needs each image's class, and {split['data'].source} "
                         f"has none; set label_col (--label-col) or use --false-negatives same_caption")
    if torchrun_rank() == 0:  # one process deletes a run being replaced; the others refuse as it does
        _claim_out(out, cfg.resume, cfg.overwrite)  # after the data loaded: a bad input deletes nothing
    elif not cfg.overwrite:
        _claim_out(out, cfg.resume, False)
    # a multi-process strategy joins torchrun's process group here (every rank has claimed OUT)
    strategy = make_strategy(cfg.dist.strategy, device=cfg.device, **cfg.dist.strategy_options())
    train = split["train"]
    t = cfg.train
    B = _global_batch(len(train), t.batch_size, strategy.data_parallel_size)  # checked before anything is written
    if strategy.is_main:
        for s in split["data"].skipped[:20]:
            log.warning("skipped %s: %s", s["item"], s["reason"])
    captions = [c for cs in train.captions for c in cs]
    torch.manual_seed(t.seed)
    if strategy.is_main:  # trains the captions' tokenizer and saves it into OUT
        backbone, tok, text_desc = _text_backbone(cfg.text, captions, out, cfg.resume)
    strategy.barrier()
    if not strategy.is_main:  # the main rank's tokenizer, not one trained again
        backbone, tok, text_desc = _text_backbone(cfg.text, captions, out, resume=True)
    model = AlignModel(cfg.image, backbone, cfg.loss, cfg.text.pooling)
    spe = len(train) / B
    curve = ZeroShotCurve(split, tok, t.eval_every if strategy.is_main else 0, spe, cfg.data.max_caption_tokens)
    batch = _batch_fn(train, tok, cfg.data, cfg.image.image_size, t.batch_size, t.seed,
                      strategy.data_parallel_rank, strategy.data_parallel_size)
    trainer = Trainer(model, t, train_batch=batch, out_dir=out, objective=AlignObjective(cfg.loss), strategy=strategy,
                      progress=progress, console=console, callbacks=[curve, *callbacks])
    guard = getattr(strategy, "collective_errors", None)  # a dead rank: one clear error, not a hang
    with guard() if guard is not None else contextlib.nullcontext():
        result = trainer.fit(resume=cfg.resume)
        model = strategy.export_model(trainer.model)
    train_s = result.elapsed - curve.seconds
    sec_epoch = train_s / max(result.steps_run / spe, 1e-9)
    if not strategy.is_main:
        return AlignOutput(None, tok, result, out, {}, [], sec_epoch)
    model.eval()
    ev: dict[str, Any] = {}
    if evaluate_at_end:
        ev = {w: evaluate_model(model, tok, split, w, max_len=cfg.data.max_caption_tokens) for w in ("val", "test")}
    last = next((r for r in reversed(result.history) if "loss" in r), {})
    info = run_info("align", cfg, result, data=split["data"].source, text_model=text_desc,
                    skipped=split["data"].skipped, split={k: len(split[k]) for k in ("train", "val", "test")},
                    seconds_per_epoch=round(sec_epoch, 3), final_loss=last.get("loss"),
                    logit_scale=last.get("logit_scale"), curve=curve.points, eval=ev)
    meta = {"max_len": cfg.data.max_caption_tokens, "class_names": list(split["class_names"]),
            "templates": list(split["templates"]), "data": _absolute_data(cfg.data),
            "split_stratified": split["train"].labels is not None}
    save_aligned(model, tok, out, meta, info, to_yaml(dataclasses.replace(cfg, overwrite=False)))  # re-runs refuse
    return AlignOutput(model, tok, result, out, ev, curve.points, sec_epoch)


def train_supervised(cfg: AlignConfig, split: dict[str, Any] | None = None, progress: bool = False,
                     console: Any = None) -> dict[str, Any]:
    """The supervised reference: `cfg.image`'s encoder + a linear head trained with cross-entropy
    on the labels, with the aligned run's batches (augmentations included), optimiser and steps.
    Nothing is saved. -> {"val_acc", "test_acc" (percent), "seconds_per_epoch", "steps"}."""
    import torch

    from ..multimodal.supervised import SupervisedImageClassifier, SupervisedObjective, accuracy
    from ..training import SingleDevice, Trainer

    split = split or load_split(cfg.data, cfg.image.channels, cfg.image.image_size)
    train = split["train"]
    if train.labels is None:
        raise ValueError(f"{split['data'].source} has no class labels; the supervised reference needs them "
                         f"(use the digits)")
    t = cfg.train
    torch.manual_seed(t.seed)
    model = SupervisedImageClassifier(cfg.image, int(split["data"].labels.max()) + 1)
    captions = [c for cs in train.captions for c in cs]
    from ..tokenizer import _wrap, train_tokenizer  # noqa: PLC2701 (batches carry captions; unused here)

    tok = _wrap(train_tokenizer(captions, vocab_size=cfg.text.vocab_size))
    trainer = Trainer(model, t, train_batch=_batch_fn(train, tok, cfg.data, cfg.image.image_size, t.batch_size,
                                                      t.seed),
                      objective=SupervisedObjective(), strategy=SingleDevice(cfg.device), progress=progress,
                      console=console)
    res = trainer.fit()
    spe = len(train) / min(t.batch_size, len(train))
    return {"val_acc": accuracy(model, split["val"].images, split["val"].labels),
            "test_acc": accuracy(model, split["test"].images, split["test"].labels),
            "seconds_per_epoch": res.elapsed / max(res.steps_run / spe, 1e-9), "steps": res.steps}


def run_data(d: AlignData, meta: dict[str, Any], **defaults: Any) -> AlignData:
    """The data to use with an aligned run (`meta` = its align_config.json): `d` when it names
    another source (its options belong to that file); else the run's own data section, with the
    options of `d` that differ from the defaults on top (`--class-names`, `--split-seed`, ...).
    A run saved without its data section: `d`."""
    from ..settings import ConfigError, from_dict

    base = AlignData(**defaults)
    if d.source != base.source or not isinstance(meta.get("data"), dict):
        return d
    given = {f.name: getattr(d, f.name) for f in dataclasses.fields(AlignData)
             if getattr(d, f.name) != getattr(base, f.name)}
    try:
        saved = from_dict(AlignData, {**meta["data"], **defaults, **{k: _plain(v) for k, v in given.items()}})
    except (ConfigError, TypeError, ValueError) as e:
        raise ValueError(f"the aligned run's data section is damaged or does not fit the options given ({e}); "
                         f"give the data with --data") from None
    if saved.source != "digits" and not Path(saved.source).exists():
        raise FileNotFoundError(f"the aligned run was trained on {saved.source}, which no longer exists; give the "
                                f"data with --data (and its column, split and class options)")
    log.info("using the run's data: %s", saved.source)
    return saved


def run_stratified(d: AlignData, meta: dict[str, Any]) -> bool | None:
    """Whether the run's split was stratified, when `d` is the run's own data (so that labels
    added at evaluation do not move training images into the test split); else None."""
    saved = meta.get("data") if isinstance(meta.get("data"), dict) else {}
    same = d.source == saved.get("source") and d.split_seed == saved.get("split_seed") and \
        d.val_fraction == saved.get("val_fraction") and d.test_fraction == saved.get("test_fraction")
    return meta.get("split_stratified") if same else None


def _plain(v: Any) -> Any:
    return str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v


def evaluate(cfg: AlignEvalConfig) -> dict[str, Any]:
    """Load `cfg.model_dir` and evaluate it on `cfg.data`'s `cfg.split` (with no data option given,
    the run's own data and split); the zero-shot class names and templates are the data's (or
    the files given), else the saved run's."""
    from ..atomic import atomic_write_text
    from ..multimodal.store import load_aligned

    model, tok, meta = load_aligned(cfg.model_dir)
    d = run_data(cfg.data, meta)
    split = load_split(d, model.image_cfg.channels, model.image_cfg.image_size, run_stratified(d, meta))
    if cfg.data.class_names is None and not split["class_names"] and meta.get("class_names"):
        split["class_names"] = tuple(meta["class_names"])
    if cfg.data.templates is None and meta.get("templates"):
        split["templates"] = tuple(meta["templates"])
    res = evaluate_model(model, tok, split, cfg.split, cfg.probe, meta.get("max_len", 32))
    res.update(model_dir=str(cfg.model_dir), data=split["data"].source, skipped=len(split["data"].skipped))
    if cfg.json_out is not None:
        atomic_write_text(cfg.json_out, json.dumps(res, indent=1))
    return res


def train_projector(cfg: ProjectorConfig, progress: bool = True, console: Any = None) -> dict[str, Any]:
    """Train the image-prefix projector on the frozen LM (see `autoglm.multimodal.projector`)."""
    from ..multimodal.projector import train_image_projector

    return train_image_projector(cfg, progress=progress, console=console)
