"""LoRA through PEFT, layered on the HF-compatible model (the model itself knows nothing of it).

Default `LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
lora_dropout=0.05, task_type="CAUSAL_LM")`. Other targets are any projection name
(`k_proj`, `o_proj`, `gate_proj`, `up_proj`, `down_proj`), a full module name, or the
alias `"experts"` (every linear layer inside the MoE experts).

PEFT only fails when *no* requested name matches; a misspelled name next to a correct
one is silently ignored. `resolve_targets` checks each name on its own and raises
before any training starts.

Example:
    >>> from autoglm import OpenAutoGLMConfig, OpenAutoGLMForCausalLM
    >>> model = OpenAutoGLMForCausalLM(OpenAutoGLMConfig.from_name("tiny"))
    >>> resolve_targets(model, ["q_proj", "v_prj"])
    Traceback (most recent call last):
    ...
    ValueError: LoRA target module 'v_prj' matches no linear layer of OpenAutoGLMForCausalLM; available names: ...
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

__all__ = ["DEFAULT_TARGETS", "resolve_targets", "lora_config", "apply_lora", "trainable_parameters",
           "save_lora", "load_lora", "merge_lora"]

log = logging.getLogger(__name__)

DEFAULT_TARGETS = ("q_proj", "v_proj")


def _linear_names(model: nn.Module) -> list[str]:
    # adapters (task heads) are not LoRA targets: they are trained on their own
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.startswith("adapters.")]


def resolve_targets(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """Check that every requested target matches at least one nn.Linear (as PEFT matches:
    the full name or its last dotted components) and expand the alias "experts".
    Returns the list to pass to LoraConfig(target_modules=...)."""
    if isinstance(targets, str):
        targets = [targets]
    if not targets:
        raise ValueError("no LoRA target modules given; e.g. --target q_proj --target v_proj")
    names = _linear_names(model)
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    out: list[str] = []
    for t in targets:
        if t == "experts":
            hit = [n for n in names if ".experts." in n]
            if not hit:
                raise ValueError(f"LoRA target 'experts' matches nothing: {type(model).__name__} has no MoE experts "
                                 f"(num_experts=0?); target the dense FFN with gate_proj/up_proj/down_proj")
            out.extend(hit)
            continue
        if not any(n == t or n.endswith("." + t) for n in names):
            raise ValueError(f"LoRA target module {t!r} matches no linear layer of {type(model).__name__}; "
                             f"available names: {', '.join(leaves)} (or 'experts', or a full module name)")
        out.append(t)
    return list(dict.fromkeys(out))


def lora_config(targets: Sequence[str] = DEFAULT_TARGETS, r: int = 8, alpha: int = 16, dropout: float = 0.05,
                modules_to_save: Sequence[str] | None = None) -> LoraConfig:
    """The project's default LoraConfig (task_type CAUSAL_LM); targets are not checked here."""
    if r < 1:
        raise ValueError(f"LoRA rank r must be >= 1, got {r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
    return LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=dropout,
                      task_type="CAUSAL_LM", modules_to_save=list(modules_to_save) if modules_to_save else None)


def apply_lora(model: nn.Module, config: LoraConfig | None = None) -> PeftModel:
    """Wrap `model` in a PEFT model with LoRA on the (checked) target modules; only the LoRA
    weights (and `modules_to_save`) are trainable."""
    config = config or lora_config()
    targets = config.target_modules
    if isinstance(targets, str):  # PEFT treats a string as a regex; keep it as is
        log.info("LoRA targets given as a regex %r; not checked name by name", targets)
    else:
        config.target_modules = set(resolve_targets(model, sorted(targets)))
    return get_peft_model(model, config)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, tied weights counted once."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def save_lora(model: PeftModel, tokenizer, out_dir: str | Path, base_model_dir: str | Path | None = None,
              run_info: dict | None = None, config_yaml: str | None = None) -> Path:
    """Save only the adapter (adapter_config.json + adapter_model.safetensors), the tokenizer,
    and run.json with the base model directory so `merge` can find it (atomically, by RunDir)."""
    from ..rundir import RunDir

    info = {"base_model": str(Path(base_model_dir).resolve()) if base_model_dir else None, **(run_info or {})}
    return RunDir.save(out_dir, model, tokenizer, info, config_yaml=config_yaml).path


def load_lora(adapter_dir: str | Path, base_dir: str | Path | None = None,
              torch_dtype: torch.dtype | None = None) -> PeftModel:
    """Load the base model (AutoModelForCausalLM) and put the saved LoRA adapter on it (unmerged).
    `base_dir`: the base model directory (default: the one the adapter's run.json records)."""
    from transformers import AutoModelForCausalLM

    from ..rundir import RunDir

    adapter = RunDir.open(adapter_dir, "lora")
    base = base_dir if base_dir is not None else adapter.base_model
    if base is None:
        raise ValueError(f"{adapter_dir} does not record its base model; pass the base model directory "
                         f"(--base) explicitly")
    base = RunDir.open(base, role="base model").path
    kw = {"dtype": torch_dtype} if torch_dtype is not None else {}
    model = AutoModelForCausalLM.from_pretrained(base, **kw)
    return PeftModel.from_pretrained(model, adapter.path).eval()


def merge_lora(adapter_dir: str | Path, out_dir: str | Path, base_dir: str | Path | None = None,
               overwrite: bool = False) -> nn.Module:
    """Fold the LoRA weights into the base model and save a plain model (no PEFT needed to
    load it) with the adapter's tokenizer in `out_dir` (a saved run there is refused unless
    `overwrite`). Returns the merged model."""
    from ..rundir import RunDir, claim_out_dir

    for src in (adapter_dir, base_dir):
        if src is not None and Path(out_dir).resolve() == Path(src).resolve():
            raise ValueError(f"--out {out_dir} is an input directory; write the merged model elsewhere")
    if not overwrite:
        claim_out_dir(out_dir)  # refused before the work
    model = load_lora(adapter_dir, base_dir).merge_and_unload()
    claim_out_dir(out_dir, overwrite=overwrite)  # a run being replaced goes only once the merge is done
    adapter = RunDir(Path(adapter_dir), "lora")
    tok = adapter.load_tokenizer() if (Path(adapter_dir) / "tokenizer.json").is_file() else None
    info = {"recipe": "merge", "adapter": str(Path(adapter_dir).resolve()),
            "base_model": str(adapter.base_model or base_dir)}
    if "data" in adapter.info:  # what it was fine-tuned on (INT8 calibration reads it)
        info["data"] = adapter.info["data"]
    RunDir.save(out_dir, model, tok, info)
    return model
