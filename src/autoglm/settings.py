"""Typed settings and the one loader of recipe configs: dataclass defaults, then a YAML file, then overrides.

A recipe's config is a (nested) dataclass whose fields carry a one-line help in their
metadata (`setting(default, "why")`). `load_config(cls, file, overrides)` builds it:

1. start from the dataclass defaults;
2. apply the YAML file (a mapping; nested sections are nested mappings);
3. apply overrides, keyed by dotted path (`{"train.lr": 1e-3}`), e.g. from the command line;

and converts every value to the field's type on the way (strings from the command line
included: "0.4,0.2" for a tuple, "none" for an optional). Unknown keys, wrong types and
the dataclasses' own `__post_init__` checks raise `ConfigError` naming the field by its
dotted path (and the file), so a typo never trains with a default silently.

Example (a section would be a field `optim: Optim = section(Optim)`, set as `optim.lr`):
    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class Optim:
    ...     lr: float = setting(1e-3, "peak learning rate")
    ...     betas: tuple[float, float] = setting((0.9, 0.95), "AdamW betas")
    ...     steps: int = setting(100, "optimizer steps")
    >>> cfg = load_config(Optim, overrides={"betas": "0.8,0.9", "steps": "20"})
    >>> cfg.steps, cfg.betas
    (20, (0.8, 0.9))
    >>> load_config(Optim, overrides={"lrr": 1})
    Traceback (most recent call last):
    ...
    autoglm.settings.ConfigError: lrr: unknown field; Optim has: betas, lr, steps
    >>> print(to_yaml(cfg), end="")
    lr: 0.001
    betas:
    - 0.8
    - 0.9
    steps: 20
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, Union

__all__ = ["ConfigError", "setting", "section", "load_config", "from_dict", "to_dict", "to_yaml", "read_yaml", "leaves",
           "Leaf", "parse_assignments"]


class ConfigError(ValueError):
    """A config value is unknown, of the wrong type or invalid; the message names the field."""


def setting(default: Any = dataclasses.MISSING, help: str = "", *, flag: str | None = None,
            cli: bool = True, argument: bool = False, required: bool = False) -> Any:
    """A config field with its one-line help. `flag`: the command-line name if it should
    differ from the field's (e.g. "steps" for max_steps); `cli=False`: file-only;
    `argument=True`: a positional argument on the command line; `required=True`: the
    default (None) must be replaced by the file or the command line (checked by
    `load_config`, with the field's name and help in the message)."""
    meta = {"help": help, "flag": flag, "cli": cli, "argument": argument, "required": required}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def section(cls: type, help: str = "", **defaults: Any) -> Any:
    """A nested config section. `defaults`: this recipe's own defaults for some of the
    section's fields (e.g. a fine-tuning recipe's `max_steps=200`); a file or override
    that sets other fields of the section keeps them. Derived fields (those the section's
    `__post_init__` fills in) are computed after the merge, from the final values."""
    return dataclasses.field(default_factory=lambda: cls(**defaults),
                             metadata={"help": help, "section": True, "defaults": defaults})


# ------------------------------------------------------------------- types
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_optional(tp: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) < len(typing.get_args(tp)):
            return True, (args[0] if len(args) == 1 else Union[tuple(args)])
    return False, tp


def type_name(tp: Any) -> str:
    opt, inner = _is_optional(tp)
    if opt:
        return f"{type_name(inner)} or none"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return f"list of {type_name(args[0]) if args else 'values'}"
    if origin is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _split_csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """`value` converted to type `tp`, or ConfigError naming `where`."""
    opt, inner = _is_optional(tp)
    if opt:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "")):
            return None
        return _coerce(value, inner, where)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, where + ".")
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{where}: expected {type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")
        return value
    if origin in (tuple, list):
        args = typing.get_args(tp)
        items = _split_csv(value) if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise bad
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(items) == 1 and len(args) > 1 and len(set(args)) == 1:
                items = list(items) * len(args)  # "0.4" for a pair means (0.4, 0.4)
            if len(items) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(items)} ({value!r})")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(items, args)))
        elem = args[0] if args else Any
        out = [_coerce(v, elem, f"{where}[{i}]") for i, v in enumerate(items)]
        return tuple(out) if origin is tuple else out
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise bad
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.strip().lower() in ("true", "yes", "1", "on")
        raise bad
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                raise bad from None
        raise bad
    if tp is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value).expanduser()
        raise bad
    return value


def _build(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown field; {cls.__name__} has: {', '.join(sorted(fields))}")
    hints = _hints(cls)
    data = dict(data)
    for name, f in fields.items():  # a section starts from the recipe's defaults for it
        if dataclasses.is_dataclass(hints[name]) and "defaults" in f.metadata:
            given = data.get(name, {})
            if isinstance(given, Mapping):
                data[name] = {**f.metadata["defaults"], **given}
    kwargs = {name: _coerce(value, hints[name], prefix + name) for name, value in data.items()}
    for name, f in fields.items():
        if f.metadata.get("required") and kwargs.get(name, f.default) in (None, (), ""):
            raise ConfigError(f"{prefix}{name}: required ({f.metadata.get('help', '')}); set it in the config "
                              f"file or on the command line")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        where = prefix.rstrip(".")
        raise ConfigError(f"{where}: {e}" if where else str(e)) from None


# ---------------------------------------------------------------- loading
def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file's top-level mapping; ConfigError for a missing file, bad YAML or a non-mapping."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass the path of a YAML file (see configs/)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text; save the config file as UTF-8") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of fields (name: value), got "
                          f"{type(data).__name__}")
    return data


def _merge(base: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    d = base
    for i, k in enumerate(keys[:-1]):
        nxt = d.get(k)
        if not isinstance(nxt, dict):
            nxt = d[k] = {}
        d = nxt
    d[keys[-1]] = value


def parse_assignments(items: list[str]) -> dict[str, str]:
    """["train.lr=1e-3", ...] (e.g. a benchmark's --set options) -> overrides for `load_config`."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted field path, e.g. --set train.lr=1e-3")
        out[key.strip()] = value
    return out


def from_dict(cls: type, data: Mapping[str, Any]) -> Any:
    """`cls` from a (nested) mapping such as `to_dict` or `dataclasses.asdict` wrote."""
    return _build(cls, data)


def load_config(cls: type, file: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> Any:
    """Build `cls` from its defaults, the YAML `file` and the dotted-path `overrides`
    (later wins). Raises ConfigError naming the field (and the file) on any problem."""
    data: dict[str, Any] = read_yaml(file) if file is not None else {}
    for key, value in (overrides or {}).items():
        _merge(data, key, value)
    try:
        return _build(cls, data)
    except ConfigError as e:
        if file is not None:
            raise ConfigError(f"{file}: {e}") from None
        raise


# ---------------------------------------------------------------- writing
def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain JSON/YAML types (paths as strings, tuples as lists); `load_config` reads it back."""
    return _plain(cfg)


def to_yaml(cfg: Any) -> str:
    import yaml

    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)


# ---------------------------------------------------------------- leaves
@dataclasses.dataclass(frozen=True)
class Leaf:
    """One settable field of a (nested) config: its dotted path, type, default and help."""

    path: str
    type: Any
    default: Any
    help: str
    flag: str | None
    cli: bool
    argument: bool
    required: bool


def leaves(cls: type, prefix: str = "", defaults: Mapping[str, Any] | None = None) -> Iterator[Leaf]:
    """Every non-section field of `cls` and its sections, depth first, in field order;
    `defaults`: a parent recipe's defaults for this section's fields."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from leaves(tp, prefix + f.name + ".", f.metadata.get("defaults"))
            continue
        if defaults and f.name in defaults:
            default = defaults[f.name]
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        m = f.metadata
        yield Leaf(prefix + f.name, tp, default, m.get("help", ""), m.get("flag"), m.get("cli", True),
                   m.get("argument", False), m.get("required", False))
