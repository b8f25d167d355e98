"""One command from a distributed checkpoint to a single safetensors model directory.

    autoglm consolidate runs/x --out runs/x-step500
    autoglm consolidate runs/x/checkpoints/step-000500 --out model/

The checkpoint is a `torch.distributed.checkpoint` folder written by any multi-process
strategy (ddp, fsdp, zero1, tp, pp, ep) on any number of ranks; the run directory, its
`checkpoints/` folder (the `latest` checkpoint is taken) or one `step-NNNNNN` folder may be
given. One process, no process group, no GPU: the model is built on CPU from the model config
the checkpoint carries (`config.json`; older checkpoints: the run's `config.json`, or its
`config.yaml` and tokenizer), DCP loads every rank's shards into it (FSDP/TP shards are
stitched together, every expert-parallel rank's experts and every pipeline stage's blocks
are read, and a weight the checkpoint lacks is an error, never left at its initial value),
and the result is written like a trained run's final weights: `config.json`,
`model.safetensors`, `generation_config.json`, the run's tokenizer files and a `run.json`
naming the checkpoint. `AutoModelForCausalLM.from_pretrained(OUT)` (after `import autoglm`),
`autoglm generate OUT` and `autoglm export OUT` read it. Files land by atomic rename; an
OUT that already holds a model is refused unless `overwrite` is given.

Example (no checkpoint there):
    >>> import tempfile
    >>> resolve_checkpoint(tempfile.mkdtemp())  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    FileNotFoundError: ... is not a distributed checkpoint ...
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

__all__ = ["resolve_checkpoint", "checkpoint_model_config", "consolidate"]

log = logging.getLogger(__name__)

MODEL_CONFIG = "config.json"  # the model config a distributed checkpoint carries (checkpoint.py writes it)


def resolve_checkpoint(path: str | Path) -> Path:
    """The `step-NNNNNN` folder meant by `path`: that folder itself, a `checkpoints/` folder
    (its `latest`), or a run directory (its `checkpoints/latest`)."""
    from ..training.checkpoint import load_latest
    from .checkpoint import is_distributed_checkpoint

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass a run directory, its checkpoints/ folder or one "
                                f"checkpoints/step-NNNNNN folder")
    if is_distributed_checkpoint(path):
        return path
    for root in (path, path / "checkpoints"):
        if (root / "latest").is_file() or any(root.glob("step-*")):
            found = load_latest(root)
            if found is not None and is_distributed_checkpoint(found):
                return found
            if found is not None:
                raise ValueError(f"{found} is a one-process checkpoint (model.safetensors + optimizer.pt), not a "
                                 f"distributed one: its model.safetensors is already a single-file model; load the "
                                 f"run directory itself, or resume it with --resume to save the final model")
    raise FileNotFoundError(f"{path} is not a distributed checkpoint (no .metadata) and holds no checkpoints/latest; "
                            f"pass a run directory trained with --nproc > 1, its checkpoints/ folder or one "
                            f"checkpoints/step-NNNNNN folder")


def _run_dir(ckpt: Path) -> Path | None:
    run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None
    return run if run is not None and run.is_dir() else None


def checkpoint_model_config(ckpt: Path) -> Any:
    """The model config of the checkpoint `ckpt`: its own config.json, else its run's
    config.json, else the model its run's config.yaml and tokenizer describe."""
    from ..config import OpenAutoGLMConfig

    run = _run_dir(ckpt)
    for folder in (ckpt, run):
        if folder is not None and (folder / MODEL_CONFIG).is_file():
            return OpenAutoGLMConfig.from_json_file(str(folder / MODEL_CONFIG))
    if run is not None and (run / "config.yaml").is_file() and (run / "tokenizer.json").is_file():
        from ..recipes.pretrain import PretrainConfig
        from ..rundir import RunDir
        from ..settings import load_config, read_yaml

        from dataclasses import fields

        from ..recipes.align import AlignConfig

        align_only = {f.name for f in fields(AlignConfig)} - {f.name for f in fields(PretrainConfig)}
        if align_only <= set(read_yaml(run / "config.yaml")):  # image, text, loss: an align run's sections
            raise ValueError(f"{run} is an `autoglm align` run: its checkpoints hold the image and text towers "
                             f"(with momentum encoders and queues), not a language model. Resume it to save the "
                             f"aligned model, on any number of processes (the checkpoint reshards), e.g. in one: "
                             f"autoglm align --resume --out {run} --strategy single --nproc 1")

        cfg = load_config(PretrainConfig, run / "config.yaml")
        if cfg.init_from is not None:
            return RunDir.open(cfg.init_from, role="init_from run").load_model().config
        return cfg.model.config(len(RunDir(run).load_tokenizer()))
    raise FileNotFoundError(f"{ckpt} carries no {MODEL_CONFIG} and no run directory around it says which model it "
                            f"holds; copy the run's config.json (or config.yaml and tokenizer.json) next to "
                            f"checkpoints/, or put the model's config.json into {ckpt}")


def consolidate(checkpoint: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write the model of the distributed checkpoint `checkpoint` to `out` as one safetensors
    model directory; returns `out`. Runs in one process without a process group."""
    import torch

    from ..hf import OpenAutoGLMForCausalLM
    from ..rundir import RunDir
    from .checkpoint import load_distributed_checkpoint

    ckpt = resolve_checkpoint(checkpoint)
    out = Path(out)
    if out.resolve() in (ckpt.resolve(), ckpt.parent.resolve()):
        raise ValueError(f"--out {out} is the checkpoint's own folder; choose a new directory for the model")
    kind = RunDir.detect(out)
    if kind is not None and not overwrite:
        raise FileExistsError(f"{out} already holds a {kind} directory; pass --overwrite to replace its model "
                              f"files, or choose another --out")
    config = checkpoint_model_config(ckpt)
    with torch.device("cpu"):
        model = OpenAutoGLMForCausalLM(config)
    state = load_distributed_checkpoint(None, ckpt, model, restore_rng=False)
    run = _run_dir(ckpt)
    info = {"recipe": "consolidate", "checkpoint": str(ckpt.resolve()), "step": state.get("step"),
            "strategy": state.get("strategy"), "world_size": state.get("world_size"),
            "tokens_seen": state.get("tokens_seen"), "train_config": state.get("train_config")}
    has_tokenizer = run is not None and (run / "tokenizer.json").is_file()
    RunDir.save(out, model, RunDir(run).load_tokenizer() if has_tokenizer else None, info)
    if not has_tokenizer:
        log.warning("no tokenizer next to %s: %s holds the model only; copy the run's tokenizer.json and "
                    "tokenizer_config.json into it to generate text", ckpt, out)
    log.info("consolidated %s (step %s, %s on %s ranks) into %s", ckpt, state.get("step"), state.get("strategy"),
             state.get("world_size"), out / "model.safetensors")
    return out
