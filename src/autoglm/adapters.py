"""Task adapters: small modules that read the backbone's final hidden states.

An adapter is an `nn.Module` called as `adapter(hidden (B, T, d), attention_mask (B, T) | None)`.
Adapter *types* are registered by name with `@adapter_type("name")` and must expose the
keyword arguments that rebuild them as `self.init_kwargs`; a saved adapter is a folder
with `adapter_config.json` (type name + kwargs) and `adapter.safetensors`. Loading only
instantiates registered types: nothing is imported or unpickled from the folder.

Example:
    >>> import torch
    >>> head = SequenceClassificationAdapter(hidden_size=8, num_labels=3)
    >>> head(torch.randn(2, 5, 8), None).shape
    torch.Size([2, 3])
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .atomic import atomic_dir

__all__ = ["adapter_type", "adapter_types", "check_name", "save_adapter", "load_adapter",
           "SequenceClassificationAdapter"]

_TYPES: dict[str, type[nn.Module]] = {}
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def adapter_type(name: str):
    """Class decorator registering an adapter type under `name`."""

    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        cls.adapter_type_name = name
        _TYPES[name] = cls
        return cls

    return wrap


def adapter_types() -> list[str]:
    return sorted(_TYPES)


def check_name(name: str) -> None:
    if not _NAME.match(name) or "." in name:
        raise ValueError(f"adapter name {name!r} is invalid; use 1-64 letters, digits, '_' or '-'")


def save_adapter(module: nn.Module, directory: str | Path) -> Path:
    """Write the adapter atomically (temp folder, then rename) and return its folder."""
    type_name = getattr(module, "adapter_type_name", None)
    if type_name not in _TYPES or not hasattr(module, "init_kwargs"):
        raise TypeError(f"{type(module).__name__} is not a registered adapter type; decorate it with "
                        f"@adapter_type('name') and store its constructor kwargs in self.init_kwargs")
    directory = Path(directory)
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    with atomic_dir(directory) as tmp:
        save_file(state, str(tmp / "adapter.safetensors"))
        (tmp / "adapter_config.json").write_text(json.dumps({"type": type_name, "kwargs": module.init_kwargs},
                                                            indent=2))
    return directory


def load_adapter(directory: str | Path) -> nn.Module:
    directory = Path(directory)
    cfg_path = directory / "adapter_config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: {directory} is not a saved adapter "
                                f"(save one with model.save_task_adapter(name, dir))")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("type") not in _TYPES:
        raise ValueError(f"adapter type {cfg.get('type')!r} in {cfg_path} is unknown; registered types: "
                         f"{adapter_types()}; import the module that defines it first")
    module = _TYPES[cfg["type"]](**cfg.get("kwargs", {}))
    module.load_state_dict(load_file(str(directory / "adapter.safetensors")))
    return module


@adapter_type("sequence-classification")
class SequenceClassificationAdapter(nn.Module):
    """Pool the hidden states (last real token or mean) and classify: (B, T, d) -> (B, num_labels)."""

    def __init__(self, hidden_size: int, num_labels: int, pooling: str = "last") -> None:
        super().__init__()
        if pooling not in ("last", "mean"):
            raise ValueError(f"pooling must be 'last' or 'mean', got {pooling!r}")
        self.init_kwargs = {"hidden_size": hidden_size, "num_labels": num_labels, "pooling": pooling}
        self.pooling = pooling
        self.score = nn.Linear(hidden_size, num_labels)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones(hidden.shape[:2], device=hidden.device)
        m = attention_mask[:, -hidden.shape[1]:].to(hidden.dtype)  # (B, T)
        if self.pooling == "mean":
            pooled = (hidden * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp_min(1)
        else:  # last real token (works for right and left padding)
            idx = (m * torch.arange(1, m.shape[1] + 1, device=m.device)).argmax(1)
            pooled = hidden[torch.arange(hidden.shape[0]), idx]
        return self.score(pooled.float() if self.score.weight.dtype == torch.float32 else pooled)
