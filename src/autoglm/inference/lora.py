"""Multi-LoRA serving: many PEFT LoRA adapters on one base model, chosen per request, never merged.

The runner packs every scheduled request's tokens into one (1, N) row, so a step can hold
tokens of several adapters and of the base model side by side. `MultiLoRA` puts a forward
hook on each base `nn.Linear` that some adapter targets; within a step
(`with lora.batch(runs): ...`) the hook adds, for every adapter `a` present in the step,

    y[idx_a] += scale_a * (x[idx_a] @ A_a^T) @ B_a^T        # idx_a: packed rows of a's requests

(S-LoRA / punica style: tokens grouped by adapter, one pair of small matmuls per adapter
and layer). Outside `batch`, or when no token of the step uses an adapter, the hooks
return at once and the base path is untouched. Inference only: `lora_dropout` is off,
`scale = lora_alpha / r` (`lora_alpha / sqrt(r)` with `use_rslora`), per-module rank and
alpha from `rank_pattern` / `alpha_pattern` as PEFT reads them.

MoE experts see only the tokens routed to them, in the order of the sorted dispatch
(`modules.moe`); a pre-hook on each `MoEFeedForward` that holds a targeted expert repeats
the (deterministic) routing to learn which packed token each expert row is.

Adapters are PEFT directories as `autoglm finetune --lora` saves them
(`adapter_config.json` + `adapter_model.safetensors`); only safetensors are read (no pickle).

Example:
    >>> lora = MultiLoRA(model)                       # doctest: +SKIP
    >>> lora.add("sql", "runs/a-lora-sql")            # doctest: +SKIP
    >>> with lora.batch([("sql", 5), (None, 1)]):     # 5 packed tokens on "sql", then 1 on the base
    ...     logits = model(ids).logits                # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..modules.moe import MoEFeedForward, route, sorted_groups

__all__ = ["LoRAModule", "LoRAAdapter", "MultiLoRA", "load_lora_adapter"]

logger = logging.getLogger(__name__)

# LoraConfig fields whose non-default values change the math in ways served here would ignore
_UNSUPPORTED = {"use_dora": "DoRA", "lora_bias": "LoRA bias terms", "fan_in_fan_out": "fan_in_fan_out (Conv1D)",
                "modules_to_save": "modules_to_save (fully trained extra modules)",
                "trainable_token_indices": "trainable token indices", "target_parameters": "target_parameters",
                "layer_replication": "layer_replication", "use_qalora": "QALoRA",
                "alora_invocation_tokens": "activated LoRA (aLoRA)"}
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")


@dataclass
class LoRAModule:
    """The low-rank delta of one Linear: y += scale * (x @ A^T) @ B^T."""

    A: torch.Tensor  # (r, in_features)
    B: torch.Tensor  # (out_features, r)
    scale: float


@dataclass
class LoRAAdapter:
    name: str
    path: Path
    modules: dict[str, LoRAModule] = field(default_factory=dict)  # module name (in the model) -> delta

    @property
    def rank(self) -> int:
        return max(m.A.shape[0] for m in self.modules.values())

    @property
    def num_parameters(self) -> int:
        return sum(m.A.numel() + m.B.numel() for m in self.modules.values())


def _fail(name: str, path: Path, msg: str) -> ValueError:
    return ValueError(f"LoRA adapter {name!r} ({path}): {msg}")


def _check_targets(model: nn.Module, cfg: dict, name: str, path: Path) -> None:
    """Every name in target_modules must match a Linear of this model (PEFT itself only
    fails when none matches)."""
    from ..training.lora import resolve_targets

    targets = cfg.get("target_modules")
    if not targets:
        raise _fail(name, path, "adapter_config.json names no target_modules")
    if isinstance(targets, str):  # PEFT reads a string as a regex over the full module names
        if not any(re.fullmatch(targets, n) for n, m in model.named_modules() if isinstance(m, nn.Linear)):
            raise _fail(name, path, f"target_modules regex {targets!r} matches no linear layer of this model")
        return
    try:
        resolve_targets(model, sorted(targets))
    except ValueError as e:
        raise _fail(name, path, f"{e}; was the adapter trained on another base model?") from None


def _moe_parent(modules: dict[str, nn.Module], mod_name: str) -> tuple[MoEFeedForward, int | None] | None:
    """The innermost MoE layer holding `mod_name`, and the expert index (None: not in an expert)."""
    parts = mod_name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        parent = modules.get(".".join(parts[:i]))
        if isinstance(parent, MoEFeedForward):
            return parent, int(parts[i + 1]) if parts[i] == "experts" and i + 1 < len(parts) else None
    return None


def _pattern(pattern: dict, module: str, default):
    if not pattern:
        return default
    from peft.utils.other import get_pattern_key

    return pattern.get(get_pattern_key(list(pattern), module), default)


def load_lora_adapter(model: nn.Module, name: str, path: str | Path) -> LoRAAdapter:
    """Read a PEFT LoRA directory and check it against `model` (dimensions, targets, options).

    Raises FileNotFoundError / ValueError naming the problem; nothing is changed on `model`."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file, weights_file = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"LoRA adapter {name!r}: {path} holds no adapter_config.json; give a directory "
                                f"saved by `autoglm finetune --lora` (or PEFT's save_pretrained)")
    if not weights_file.is_file():
        raise FileNotFoundError(f"LoRA adapter {name!r}: {path} holds no adapter_model.safetensors (only "
                                f"safetensors are loaded; re-save with safe_serialization=True)")
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise _fail(name, path, f"peft_type is {cfg['peft_type']!r}; only LORA adapters can be served")
    for key, what in _UNSUPPORTED.items():
        if cfg.get(key):
            raise _fail(name, path, f"{what} is not supported by the engine ({key}={cfg[key]!r}); "
                                    f"merge the adapter (`autoglm merge`) and serve the merged model")
    if cfg.get("bias", "none") != "none":
        raise _fail(name, path, f"bias={cfg['bias']!r} trains base biases; not supported unmerged (merge instead)")
    _check_targets(model, cfg, name, path)

    tensors = load_file(str(weights_file))
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise _fail(name, path, f"unexpected tensor {key!r} in adapter_model.safetensors: only "
                                    f"lora_A/lora_B weights of Linear layers can be served")
        parts.setdefault(m["module"], {})[m["part"]] = t
    if not parts:
        raise _fail(name, path, "adapter_model.safetensors holds no LoRA weights")

    modules = dict(model.named_modules())
    params = next(model.parameters())
    r0, alpha0, rslora = cfg.get("r", 8), cfg.get("lora_alpha", 8), cfg.get("use_rslora", False)
    out = LoRAAdapter(name, path)
    for mod_name, ab in sorted(parts.items()):
        base = modules.get(mod_name)
        if not isinstance(base, nn.Linear):
            raise _fail(name, path, f"module {mod_name!r} is not a linear layer of this model; was the adapter "
                                    f"trained on another base model (config says "
                                    f"{cfg.get('base_model_name_or_path')!r})?")
        if not mod_name.startswith("model.layers."):
            raise _fail(name, path, f"LoRA on {mod_name!r} is not supported by the engine (only the decoder "
                                    f"layers' linear layers); merge the adapter instead")
        if set(ab) != {"A", "B"}:
            raise _fail(name, path, f"module {mod_name!r} has lora_{'A' if 'A' in ab else 'B'} but not its pair")
        A, B = ab["A"], ab["B"]
        r = _pattern(cfg.get("rank_pattern") or {}, mod_name, r0)
        if A.dim() != 2 or B.dim() != 2 or A.shape != (r, base.in_features) or B.shape != (base.out_features, r):
            raise _fail(name, path, f"{mod_name} is a Linear({base.in_features} -> {base.out_features}) here, "
                                    f"but the adapter has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} "
                                    f"(rank {r}): it was trained on a base model of other dimensions")
        moe = _moe_parent(modules, mod_name)
        if moe is not None and moe[1] is not None and moe[0].dispatch == "gather":
            raise _fail(name, path, f"{mod_name} is an MoE expert and this model's MoE dispatch is 'gather' "
                                    f"(stacked expert weights, no per-expert linear call); load the model with "
                                    f"moe_dispatch='sorted' or 'dense' to serve expert LoRA")
        alpha = _pattern(cfg.get("alpha_pattern") or {}, mod_name, alpha0)
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        out.modules[mod_name] = LoRAModule(A.to(params.device, params.dtype), B.to(params.device, params.dtype),
                                           float(scale))
    return out


class MultiLoRA:
    """LoRA adapters installed as forward hooks on a base model; which adapter applies to
    which packed token is set per step with `batch` (see the module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.adapters: dict[str, LoRAAdapter] = {}
        self._hooks: dict[str, torch.utils.hooks.RemovableHandle] = {}  # module name -> hook
        self._name_of: dict[int, str] = {}  # id(Linear) -> module name
        self._expert_of: dict[int, int] = {}  # id(expert Linear) -> id(its expert module)
        self._moe_hooks: dict[int, torch.utils.hooks.RemovableHandle] = {}
        # per-step state, set by `batch`
        self._groups: dict[str, torch.Tensor | None] = {}  # adapter -> packed rows (None: all rows)
        self._num_tokens = 0
        self._token_adapter: torch.Tensor | None = None  # (N,) adapter index per packed token, -1 = base
        self._expert_groups: dict[int, dict[str, torch.Tensor | None]] = {}

    # ------------------------------------------------------------ registry
    def names(self) -> list[str]:
        return list(self.adapters)

    def __contains__(self, name: object) -> bool:
        return name in self.adapters

    def add(self, name: str, path: str | Path) -> LoRAAdapter:
        """Load an adapter directory and register it under `name` (checked before anything changes)."""
        if not isinstance(name, str) or not name.strip() or name != name.strip():
            raise ValueError(f"LoRA adapter name must be a non-empty string without surrounding spaces, got {name!r}")
        if name in self.adapters:
            raise ValueError(f"a LoRA adapter named {name!r} is already loaded (from {self.adapters[name].path}); "
                             f"pick another name")
        adapter = load_lora_adapter(self.model, name, path)
        modules = dict(self.model.named_modules())
        for mod_name in adapter.modules:
            if mod_name not in self._hooks:
                self._install(mod_name, modules)
        self.adapters[name] = adapter
        logger.info("LoRA adapter %r: %d modules, rank %d, %d parameters", name, len(adapter.modules),
                    adapter.rank, adapter.num_parameters)
        return adapter

    def remove(self, name: str) -> None:
        if name not in self.adapters:
            raise KeyError(f"no LoRA adapter named {name!r}; loaded: {self.names() or 'none'}")
        del self.adapters[name]
        used = {m for a in self.adapters.values() for m in a.modules}
        for mod_name in [m for m in self._hooks if m not in used]:
            self._hooks.pop(mod_name).remove()
            lin_id = next(i for i, n in self._name_of.items() if n == mod_name)
            del self._name_of[lin_id]
            self._expert_of.pop(lin_id, None)
        live = set(self._expert_of.values())
        for key in list(self._moe_hooks):
            if key not in live:
                self._moe_hooks.pop(key).remove()

    def _install(self, mod_name: str, modules: dict[str, nn.Module]) -> None:
        lin = modules[mod_name]
        self._name_of[id(lin)] = mod_name
        moe = _moe_parent(modules, mod_name)
        # a linear in an MoE layer but no expert (the router) is never called: route() reads its
        # .weight, so PEFT's LoRA has no effect there either
        if moe is not None and moe[1] is not None:
            parent, e = moe
            self._expert_of[id(lin)] = id(parent.experts[e])
            if id(parent) not in self._moe_hooks:
                self._moe_hooks[id(parent)] = parent.register_forward_pre_hook(self._moe_pre_hook)
        self._hooks[mod_name] = lin.register_forward_hook(self._linear_hook)

    # ---------------------------------------------------------------- step
    @property
    def active(self) -> bool:
        """True inside a `batch` whose tokens use at least one adapter."""
        return bool(self._groups)

    @contextmanager
    def batch(self, runs: Sequence[tuple[str | None, int]]) -> Iterator[None]:
        """Within the block, packed token rows are assigned to adapters by `runs`: consecutive
        (adapter name or None, number of tokens) in packing order."""
        rows: dict[str, list[int]] = {}
        n_tok = 0
        for name, n in runs:
            if name is not None:
                if name not in self.adapters:
                    raise KeyError(f"no LoRA adapter named {name!r}; loaded: {self.names() or 'none'}")
                rows.setdefault(name, []).extend(range(n_tok, n_tok + n))
            n_tok += n
        if not rows:  # a base-only step: the hooks stay no-ops
            yield
            return
        device = next(self.model.parameters()).device
        self._num_tokens = n_tok
        self._groups = {a: (None if len(r) == n_tok else torch.tensor(r, dtype=torch.long, device=device))
                        for a, r in rows.items()}
        if self._moe_hooks:
            slot = {a: i for i, a in enumerate(rows)}
            ids = [slot.get(name, -1) for name, n in runs for _ in range(n)]
            self._token_adapter = torch.tensor(ids, dtype=torch.long, device=device)
        try:
            yield
        finally:
            self._groups, self._expert_groups, self._token_adapter = {}, {}, None

    # ---------------------------------------------------------------- hooks
    def _moe_pre_hook(self, moe: MoEFeedForward, args) -> None:
        """Which packed token is each row each expert will see (same routing as the layer)."""
        if not self._groups:
            return
        xf = args[0].reshape(-1, args[0].shape[-1])
        dispatch = moe.choose(xf)  # 'auto' runs 'sorted' while the expert projections are hooked
        if dispatch not in ("sorted", "dense"):
            raise RuntimeError(f"expert LoRA needs the 'sorted' or 'dense' MoE dispatch, not {dispatch!r} "
                               f"(it never calls the experts' linear layers)")
        if dispatch == "dense":  # every expert runs on every token
            for e in moe.experts:
                self._expert_groups[id(e)] = self._groups
            return
        r = route(xf, moe.router.weight, moe.top_k)
        _, token_of, counts = sorted_groups(r.topk_idx, moe.num_experts)  # the layout the layer will use
        for e, tok in zip(moe.experts, token_of.split(counts)):
            which = self._token_adapter[tok]  # (rows,) index into self._groups of each row's adapter, -1 base
            groups = {}
            for i, a in enumerate(self._groups):
                idx = (which == i).nonzero().squeeze(1)
                if idx.numel():
                    groups[a] = None if idx.numel() == tok.numel() else idx
            self._expert_groups[id(e)] = groups

    def _linear_hook(self, lin: nn.Linear, args, out: torch.Tensor):
        if not self._groups:
            return None  # base path: output untouched
        name = self._name_of[id(lin)]
        expert = self._expert_of.get(id(lin))
        if expert is None:
            groups = self._groups
        elif expert in self._expert_groups:
            groups = self._expert_groups[expert]
        else:
            raise RuntimeError(f"LoRA hook on {name}: its MoE layer did not run its routing pre-hook this step")
        x = args[0]
        xf, y = x.reshape(-1, x.shape[-1]), out.reshape(-1, out.shape[-1])
        if expert is None and xf.shape[0] != self._num_tokens:
            raise RuntimeError(f"LoRA hook on {name} saw {xf.shape[0]} rows but the step packed "
                               f"{self._num_tokens} tokens; LoRA steps must run the eager packed forward")
        for a, idx in groups.items():
            w = self.adapters[a].modules.get(name)
            if w is None:
                continue
            if idx is None:
                y = y + ((xf @ w.A.T) @ w.B.T) * w.scale
            else:
                y = y.index_add(0, idx, ((xf[idx] @ w.A.T) @ w.B.T) * w.scale)
        return y.view(out.shape)

    def close(self) -> None:
        """Remove every hook (the model is the plain base model again)."""
        for h in [*self._hooks.values(), *self._moe_hooks.values()]:
            h.remove()
        self._hooks.clear()
        self._moe_hooks.clear()
        self._name_of.clear()
        self._expert_of.clear()
        self.adapters.clear()
