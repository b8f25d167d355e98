"""Atomic, pickle-free training checkpoints.

Layout of one checkpoint, `ckpt_root/step-000123/`:

    model.safetensors, config.json   weights + model config (the model's `save_pretrained`)
      or adapter_model.safetensors,  for a PEFT (LoRA) model: only the adapter, as its
      adapter_config.json            `save_pretrained` writes it (the frozen base is not copied)
    optimizer.pt                     {"optimizer": ..., "scheduler": ...} state dicts (tensors + numbers)
    rng.pt                           torch CPU / CUDA, numpy and python RNG states as tensors
    trainer_state.json               step, tokens_seen, best val loss, train config, ...

`ckpt_root/latest` is a one-line text file naming the newest complete checkpoint.
Multi-process strategies write `torch.distributed.checkpoint` shards instead (see
`autoglm.distributed.checkpoint`); `list_checkpoints` / `load_latest` see both kinds.

Atomicity (`autoglm.atomic`): everything is written into a hidden temp directory inside
`ckpt_root`, each file and the directory are fsync'ed, and the directory is renamed to
`step-NNNNNN` (atomic on POSIX); only then is `latest` rewritten, again through a temp file
and a rename. A crash at any point leaves either the previous
checkpoint as latest or the new one complete - never a partial `step-*` directory.
Loading uses safetensors and `torch.load(..., weights_only=True)` only.

One process writes a checkpoint directory at a time (the trainer's main process).
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_model
from torch import nn

from ..atomic import atomic_dir, atomic_write_text

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "load_latest", "list_checkpoints",
           "capture_rng_state", "restore_rng_state"]

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step-(\d+)$")
_LATEST = "latest"
_STATE = "trainer_state.json"
_WEIGHTS = "model.safetensors"
_WEIGHTS_INDEX = "model.safetensors.index.json"
_ADAPTER = "adapter_model.safetensors"  # PEFT models: the checkpoint holds only the adapter
_OPTIM = "optimizer.pt"
_RNG = "rng.pt"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or does not fit the model."""


def _advice() -> str:
    return "start without resuming (drop --resume) or choose another output directory"


# --------------------------------------------------------------------------- RNG
def capture_rng_state() -> dict[str, Any]:
    """Global RNG states as tensors, so `torch.load(weights_only=True)` can read them back."""
    version, py_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state((npst["kind"], npst["keys"].numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["cached_gaussian"]))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            log.warning("checkpoint has CUDA RNG states for %d devices but %d are visible; "
                        "CUDA RNG not restored (dropout masks will differ from the original run)",
                        len(cuda), torch.cuda.device_count())


# ------------------------------------------------------------------------- files
@contextlib.contextmanager
def _quiet_hf_progress():
    """save_pretrained draws a tqdm bar per save; keep it out of the training progress bar."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        yield
        return
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _save_weights(model: nn.Module, directory: Path) -> None:
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    if hasattr(model, "save_pretrained") and hasattr(model, "config"):
        with _quiet_hf_progress():
            model.save_pretrained(directory)
    else:  # plain nn.Module: safetensors handles tied/shared tensors
        save_model(model, str(directory / _WEIGHTS))


def _load_adapter(model: nn.Module, file: Path) -> None:
    """Load a PEFT adapter checkpoint (what a PeftModel's `save_pretrained` wrote) into
    `model`, checking that its keys and shapes are exactly the model's adapter weights."""
    directory = file.parent
    if not hasattr(model, "peft_config"):
        raise CheckpointError(f"checkpoint {directory} holds only a PEFT adapter ({file.name}) but the model is a "
                              f"plain {type(model).__name__}; resume with the LoRA configuration the run started "
                              f"with, or {_advice()}")
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    try:
        sd = load_file(str(file))
    except Exception as e:  # safetensors raises its own error types on bad headers
        raise CheckpointError(f"cannot read adapter weights {file}: {e}; the file is corrupt: {_advice()}") from e
    own = get_peft_model_state_dict(model)
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    shapes = sorted(k for k in sd if k in own and tuple(sd[k].shape) != tuple(own[k].shape))
    if missing or unexpected or shapes:
        raise CheckpointError(f"adapter checkpoint {directory} does not match the model's adapter: missing "
                              f"{missing[:5]}, unexpected {unexpected[:5]}, other shape {shapes[:5]}; resume with "
                              f"the LoRA targets and rank the run started with, or {_advice()}")
    set_peft_model_state_dict(model, sd)


def _load_weights(model: nn.Module, directory: Path) -> None:
    model = getattr(model, "_orig_mod", model)
    index = directory / _WEIGHTS_INDEX
    if not index.exists() and not (directory / _WEIGHTS).exists() and (directory / _ADAPTER).exists():
        _load_adapter(model, directory / _ADAPTER)
        return
    if index.exists():  # sharded save_pretrained output
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [directory / s for s in shards]
    else:
        files = [directory / _WEIGHTS]
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.exists():
            raise CheckpointError(f"checkpoint {directory} has no weights file {f.name}; it is incomplete: {_advice()}")
        try:
            sd.update(load_file(str(f)))
        except Exception as e:  # safetensors raises its own error types on bad headers
            raise CheckpointError(f"cannot read weights {f}: {e}; the file is corrupt: {_advice()}") from e
    own = model.state_dict()
    loaded_ptrs = {own[k].data_ptr() for k in sd if k in own}
    # a key absent from the file is fine when it aliases a loaded tensor (tied embeddings / LM head)
    missing = sorted(k for k in own if k not in sd and own[k].data_ptr() not in loaded_ptrs)
    unexpected = sorted(k for k in sd if k not in own)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {directory} does not match the model: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}; "
            f"resume with the model config the run started with, or {_advice()}")
    try:
        model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise CheckpointError(f"checkpoint {directory} does not fit the model: {e}; resume with the model "
                              f"config the run started with, or {_advice()}") from e


def _step_of(path: Path) -> int | None:
    m = _STEP_DIR.match(path.name)
    return int(m.group(1)) if m else None


def _is_complete(path: Path) -> bool:
    if path.is_dir() and (path / _STATE).is_file() and (path / ".metadata").is_file():
        return True  # torch.distributed.checkpoint shards (autoglm.distributed.checkpoint)
    return (path.is_dir() and (path / _STATE).is_file() and (path / _OPTIM).is_file()
            and ((path / _WEIGHTS).is_file() or (path / _WEIGHTS_INDEX).is_file() or (path / _ADAPTER).is_file()))


def list_checkpoints(ckpt_root: str | Path) -> list[Path]:
    """Complete `step-*` checkpoints under `ckpt_root`, oldest first."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = [(s, p) for p in root.iterdir() if (s := _step_of(p)) is not None and _is_complete(p)]
    return [p for _, p in sorted(found)]


def _write_latest(root: Path, name: str) -> None:
    atomic_write_text(root / _LATEST, name + "\n")


def _prune(root: Path, keep: int, protect: Path) -> None:
    ckpts = list_checkpoints(root)
    for old in ckpts[:-keep] if keep > 0 else ckpts:
        if old.resolve() != protect.resolve():
            log.debug("pruning old checkpoint %s", old)
            shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------ public
def save_checkpoint(ckpt_root: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    scheduler: Any | None, state: dict[str, Any], keep: int | None = None) -> Path:
    """Atomically write checkpoint `ckpt_root/step-{step:06d}` and point `latest` at it.

    `state` must be JSON-serialisable (it becomes trainer_state.json, with "step" and
    "format_version" added). `keep`: newest complete checkpoints to keep (None = all).
    Returns the checkpoint directory.
    """
    root = Path(ckpt_root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".step-*.*-*"):  # temporary folders left by a process killed mid-save
        shutil.rmtree(stale, ignore_errors=True)
    name = f"step-{step:06d}"
    final = root / name
    with atomic_dir(final) as tmp:  # re-saving a step (e.g. after a resume) swaps the old copy out
        _save_weights(model, tmp)
        torch.save({"optimizer": optimizer.state_dict() if optimizer is not None else None,
                    "scheduler": scheduler.state_dict() if scheduler is not None else None}, tmp / _OPTIM)
        torch.save(capture_rng_state(), tmp / _RNG)
        full_state = {**state, "step": step, "format_version": FORMAT_VERSION}
        (tmp / _STATE).write_text(json.dumps(full_state, indent=2, sort_keys=True))  # written last
    _write_latest(root, name)
    if keep is not None:
        _prune(root, keep, protect=final)
    log.info("saved checkpoint %s", final)
    return final


def load_latest(ckpt_root: str | Path) -> Path | None:
    """The checkpoint `latest` names; if that is missing or incomplete, the newest complete
    `step-*` directory; None when there is no checkpoint at all."""
    root = Path(ckpt_root)
    pointer = root / _LATEST
    if pointer.is_file():
        target = root / pointer.read_text().strip()
        if _step_of(target) is not None and _is_complete(target):
            return target
        log.warning("%s names %s, which is missing or incomplete; falling back to the newest complete "
                    "checkpoint", pointer, target.name)
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scheduler: Any | None = None, restore_rng: bool = True) -> dict[str, Any]:
    """Load weights (safetensors) into `model`, optimizer/scheduler/RNG states (weights-only
    torch.load) and return the trainer state dict. Raises CheckpointError naming the path."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint at {path}: the directory does not exist; {_advice()}")
    try:
        state = json.loads((path / _STATE).read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint {path} has no {_STATE}; it is incomplete: {_advice()}") from e
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {path}/{_STATE} is corrupt ({e}): {_advice()}") from e
    _load_weights(model, path)
    if optimizer is not None or scheduler is not None:
        opt = _torch_load(path / _OPTIM)
        if optimizer is not None:
            if opt.get("optimizer") is None:
                raise CheckpointError(f"checkpoint {path} holds no optimizer state; {_advice()}")
            try:
                optimizer.load_state_dict(opt["optimizer"])
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"optimizer state in {path} does not fit this optimizer ({e}); resume with "
                                      f"the same model and trainable parameters, or {_advice()}") from e
        if scheduler is not None and opt.get("scheduler") is not None:
            scheduler.load_state_dict(opt["scheduler"])
    if restore_rng and (path / _RNG).exists():
        restore_rng_state(_torch_load(path / _RNG))
    return state


def _torch_load(file: Path) -> Any:
    if not file.exists():
        raise CheckpointError(f"checkpoint file {file} is missing; the checkpoint is incomplete: {_advice()}")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, unpickling refused, ...
        raise CheckpointError(f"cannot read {file} ({type(e).__name__}: {e}); it is corrupt or was not written "
                              f"by autoglm: {_advice()}") from e
