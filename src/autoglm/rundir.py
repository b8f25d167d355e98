"""`RunDir`: the one way a saved run or model directory is recognised, loaded and written.

A run directory written by `autoglm train` (and `distill`, `finetune`, `graph pretrain`):

    out/
      config.json, model.safetensors          final weights (HF layout; AutoModelForCausalLM)
      tokenizer.json, tokenizer_config.json   the byte-level BPE tokenizer
      run.json                                recipe, resolved config, data source, result
      config.yaml                             the resolved recipe config (re-run with --config)
      metrics.jsonl                           one JSON row per log / eval step
      checkpoints/step-*/, checkpoints/latest resumable checkpoints (atomic)

Three kinds of directory are recognised by the files they hold:

* `model`: a causal LM (`config.json` + `model.safetensors`);
* `lora`: a PEFT LoRA adapter (`adapter_config.json` + `adapter_model.safetensors`) whose
  `run.json` records its base model;
* `graph`: a graph SSL encoder (`graph_ssl_config.json` + `model.safetensors`).

Every command that takes such a directory opens it with `RunDir.open(path, kind)`, so a
wrong directory gets the same clear message everywhere. Writes go through
`autoglm.atomic` (files land by rename; a crash keeps the previous model intact).

Example:
    >>> import tempfile
    >>> RunDir.open(tempfile.mkdtemp())  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    FileNotFoundError: ... is not a saved model directory (it lacks config.json, model.safetensors); ...
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .atomic import atomic_files

__all__ = ["RunDir", "KINDS", "claim_out_dir"]

# kind -> (files it must hold, what it is called, how to make one)
KINDS: dict[str, tuple[tuple[str, ...], str, str]] = {
    "model": (("config.json", "model.safetensors"), "saved model directory",
              "train one with `autoglm train --out {path}`"),
    "lora": (("adapter_config.json", "adapter_model.safetensors"), "LoRA adapter directory",
             "make one with `autoglm finetune BASE --lora --out {path}`"),
    "graph": (("graph_ssl_config.json", "model.safetensors"), "graph model directory",
              "pre-train one with `autoglm graph pretrain --out {path}`"),
    "align": (("align_config.json", "model.safetensors"), "CLIP-style image-text model directory",
              "train one with `autoglm align --out {path}`"),
}


@dataclass(frozen=True)
class RunDir:
    path: Path
    kind: str = "model"

    # ----------------------------------------------------------------- opening
    @classmethod
    def open(cls, path: str | Path, kind: str = "model", role: str | None = None) -> "RunDir":
        """Check that `path` is a directory of `kind` and return it; FileNotFoundError naming
        the missing files and how to make such a directory otherwise. `role` names the
        directory in the message (e.g. "teacher", "base model")."""
        if kind not in KINDS:
            raise ValueError(f"unknown run directory kind {kind!r}; known: {sorted(KINDS)}")
        path = Path(path)
        need, what, how = KINDS[kind]
        missing = [f for f in need if not (path / f).is_file()]
        if missing:
            where = f"{role} {path}" if role else str(path)
            found = cls.detect(path)
            also = f"; it looks like a {KINDS[found][1]}" if found and found != kind else ""
            state = "does not exist" if not path.exists() else f"lacks {', '.join(missing)}"
            if kind == "model" and found == "lora":  # an adapter where a whole model is needed
                how = "fold it into its base model with `autoglm merge {path} --out {path}-merged` and pass that"
            raise FileNotFoundError(f"{where} is not a {what} (it {state}){also}; {how.format(path=path)}")
        return cls(path, kind)

    @staticmethod
    def detect(path: str | Path) -> str | None:
        """The kind of directory `path` is, or None."""
        path = Path(path)
        for kind, (need, _, _) in KINDS.items():
            if all((path / f).is_file() for f in need):
                return kind
        return None

    # -------------------------------------------------------------- metadata
    @property
    def info(self) -> dict[str, Any]:
        """run.json (recipe, config, data source, result); {} when the directory has none."""
        f = self.path / "run.json"
        if not f.is_file():
            return {}
        try:
            return json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{f} is not valid JSON ({e}); the run directory is damaged") from None

    @property
    def data_source(self) -> Path | None:
        """The corpus the model was trained on (None: the built-in corpus or unknown)."""
        src = self.info.get("data")
        return None if not src or str(src).startswith("builtin:") else Path(src)

    @property
    def base_model(self) -> Path | None:
        """A LoRA adapter's base model directory, as its run.json records it."""
        base = self.info.get("base_model")
        return Path(base) if base else None

    # ----------------------------------------------------------------- loading
    def load_tokenizer(self):
        from .tokenizer import load_tokenizer

        return load_tokenizer(self.path)

    def load_model(self, dtype=None, device=None):
        """The causal LM in eval mode (`kind` must be "model")."""
        from .hf import OpenAutoGLMForCausalLM

        if self.kind != "model":
            raise ValueError(f"{self.path} is a {KINDS[self.kind][1]}, not a model; load it with its own loader")
        kw = {"dtype": dtype} if dtype is not None else {}
        model = OpenAutoGLMForCausalLM.from_pretrained(self.path, **kw).eval()
        return model.to(device) if device is not None else model

    def load(self, dtype=None, device=None):
        """(model, tokenizer)."""
        return self.load_model(dtype, device), self.load_tokenizer()

    # ------------------------------------------------------------------ saving
    @classmethod
    def save(cls, out: str | Path, model, tokenizer=None, info: dict[str, Any] | None = None,
             config_yaml: str | None = None) -> "RunDir":
        """Write the model (its `save_pretrained`: a plain model or a PEFT adapter), tokenizer,
        run.json and config.yaml into `out`. Each file lands by atomic rename, so an
        interrupted save leaves the previous files intact; checkpoints and metrics stay."""
        out = Path(out)
        with atomic_files(out) as tmp:
            model.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            if info is not None:
                (tmp / "run.json").write_text(json.dumps(info, indent=2, default=str))
            if config_yaml is not None:
                (tmp / "config.yaml").write_text(config_yaml)
        kind = cls.detect(out)
        return cls(out, kind or "model")


def claim_out_dir(out: str | Path, resume: bool = False, overwrite: bool = False) -> None:
    """Make sure a fresh run may write into `out`. A directory that already holds a saved run
    (any kind in `KINDS`) is refused unless the run is being resumed (`resume`) or replaced
    (`overwrite`: the old run's directory is deleted first, so no file of it stays beside the
    new one's). A directory holding checkpoints but no saved model (a run stopped before its
    end) is left to the trainer, which resumes it or refuses to start over it."""
    out = Path(out)
    kind = RunDir.detect(out)
    if kind is None or resume:
        return
    if not overwrite:
        raise FileExistsError(f"{out} already holds a {KINDS[kind][1]}; pass --resume to continue it (if it saved "
                              f"checkpoints), --overwrite to replace it, or choose another --out")
    import shutil

    shutil.rmtree(out)
