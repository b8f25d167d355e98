"""Config sections shared by the language-model recipes, and what they do with them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..settings import setting

__all__ = ["ModelSpec", "TextData", "DEFAULT_CACHE", "build_model", "run_info"]

DEFAULT_CACHE = Path.home() / ".cache" / "autoglm"


@dataclass
class ModelSpec:
    """Which architecture to build (a preset, plus field overrides)."""

    preset: str = setting("small", "model preset: tiny, small, base, standard-small, standard-base "
                                   "(see `autoglm info`)")
    vocab_size: int | None = setting(None, "tokenizer vocabulary to train; none = the preset's")
    overrides: dict[str, Any] = setting({}, "model config fields changed from the preset, e.g. "
                                            "{window_size: 64, num_experts: 8}", cli=False)

    def __post_init__(self) -> None:
        from ..config import PRESETS, preset_names

        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {', '.join(preset_names())}")
        if self.vocab_size is not None and self.vocab_size < 260:
            raise ValueError(f"vocab_size must be >= 260 (256 bytes + special tokens), got {self.vocab_size}")

    def config(self, vocab_size: int | None = None):
        """The model config this spec describes (`vocab_size`: the tokenizer's, when known)."""
        from ..config import OpenAutoGLMConfig

        extra = {"vocab_size": vocab_size} if vocab_size is not None else {}
        return OpenAutoGLMConfig.from_name(self.preset, **{**self.overrides, **extra})


@dataclass
class TextData:
    """Where the text comes from and how it is split."""

    path: Path | None = setting(None, "text file or folder of .txt/.md files; none = the built-in corpus "
                                      "of Python standard-library docstrings", flag="data")
    cache_dir: Path = setting(DEFAULT_CACHE, "where tokenized corpora are cached (reused across runs)")
    val_fraction: float = setting(0.1, "share of the token stream held out (its tail) for validation")
    extra_train: tuple[Path, ...] = setting((), "more text files or folders for the training split only "
                                                "(validation stays the corpus's tail)")

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}; e.g. 0.1")


def build_model(spec: ModelSpec, vocab_size: int):
    """A freshly initialised model of `spec` for a tokenizer of `vocab_size` tokens."""
    from ..hf import OpenAutoGLMForCausalLM

    return OpenAutoGLMForCausalLM(spec.config(vocab_size))


def run_info(recipe: str, cfg: Any, result: Any = None, **extra: Any) -> dict[str, Any]:
    """run.json: the recipe's name, its resolved config, the result summary and extras."""
    from ..settings import to_dict

    info: dict[str, Any] = {"recipe": recipe, **extra, "config": to_dict(cfg)}
    if result is not None:
        info["result"] = {"steps": result.steps, "final_eval": result.final_eval, "stop_reason": result.stop_reason,
                          f"{result.unit}_per_s": result.rate}
    return info
