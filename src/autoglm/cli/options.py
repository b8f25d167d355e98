"""Command-line options generated from a recipe's config dataclass.

`add_recipe_command(app, name, cls, run)` registers a command whose options are the
config's fields (help from each field's metadata, grouped into one help panel per config
section), plus `--config FILE` (a YAML file) and `--print-config` (show the resolved
config as YAML and exit). A value given on the command line overrides the file, which
overrides the dataclass default; `autoglm.settings.load_config` does the merging,
type conversion and validation, so the CLI never re-states a default or a check.

Option names are the field names with dashes (`--batch-size`); a field may choose its own
(`setting(..., flag="steps")`), and a name used by two sections is spelled with the
section (`--student-preset`). Tuples and lists take a comma list or a repeated option.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Optional

import typer

from ..settings import ConfigError, Leaf, leaves, load_config, to_yaml
from .common import console, err, fail, setup_logging, user_errors

__all__ = ["add_recipe_command", "option_names"]


def _flag_of(leaf: Leaf) -> str:
    return leaf.flag or leaf.path.rsplit(".", 1)[-1]


def option_names(cls: type) -> dict[str, str]:
    """Dotted field path -> command-line name (without dashes, with '-' for '_')."""
    cli = [lf for lf in leaves(cls) if lf.cli]
    short = [_flag_of(lf) for lf in cli]
    out = {}
    for lf, s in zip(cli, short):
        name = s if short.count(s) == 1 else lf.path.replace(".", "_")
        out[lf.path] = name.replace("_", "-")
    return out


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, (tuple, list)):
        return ",".join(_show(v) for v in value) or "(empty)"
    if isinstance(value, Path):
        home = str(Path.home())
        s = str(value)
        return "~" + s[len(home):] if s.startswith(home) else s
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def _param(leaf: Leaf, name: str) -> inspect.Parameter:
    """The typer parameter for one config field: always optional (None = not given)."""
    tp = leaf.type
    origin = typing.get_origin(tp)
    opt_inner = [a for a in typing.get_args(tp) if a is not type(None)]
    base = opt_inner[0] if origin is not None and len(opt_inner) == 1 and type(None) in typing.get_args(tp) else tp
    b_origin = typing.get_origin(base)
    help_ = leaf.help.rstrip(".")
    if b_origin is Literal:
        help_ += f" (one of: {', '.join(str(c) for c in typing.get_args(base))})"
    if b_origin in (tuple, list):
        help_ += " (comma list)"
    if leaf.required:
        shown = "(required)"
    else:
        shown = "" if leaf.default is dataclasses.MISSING else f"(default: {_show(leaf.default)})"
    help_ = f"{help_}. {shown}" if help_ else shown
    section = leaf.path.rsplit(".", 1)[0] if "." in leaf.path else None
    panel = f"{section} options" if section else None
    param_name = leaf.path.replace(".", "__")
    flag = "--" + name
    if base is bool:
        annot, info = Optional[bool], typer.Option(None, f"{flag}/--no-{name}", help=help_, show_default=False,
                                                  rich_help_panel=panel)
    elif b_origin in (tuple, list):
        annot, info = Optional[list[str]], typer.Option(None, flag, help=help_, show_default=False, metavar="LIST",
                                                        rich_help_panel=panel)
    elif leaf.argument:
        py = {int: int, float: float, Path: Path}.get(base, str) if base is tp else str
        annot, info = Optional[py], typer.Argument(None, help=help_, show_default=False,
                                                   metavar=name.upper().replace("-", "_"))
    else:  # an optional field takes text, so that "none" can be given
        py = {int: int, float: float, Path: Path}.get(base, str) if base is tp else str
        metavar = {int: "INT", float: "FLOAT", Path: "PATH"}.get(base, "TEXT" if b_origin is not Literal else "CHOICE")
        annot, info = Optional[py], typer.Option(None, flag, help=help_, show_default=False, metavar=metavar,
                                                 rich_help_panel=panel)
    return inspect.Parameter(param_name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=annot)


def _overrides(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for leaf in leaves(cls):
        v = values.get(leaf.path.replace(".", "__"))
        if v is None:
            continue
        if isinstance(v, list):  # a repeated option, each maybe a comma list
            v = [part.strip() for item in v for part in str(item).split(",") if part.strip()]
            if len(v) == 1 and v[0].lower() in ("none", "null"):
                v = v[0]  # an optional list field set to none (the loader reads the word)
        out[leaf.path] = v
    return out


def add_recipe_command(app: typer.Typer, name: str, cls: type, run: Callable[[Any], None], help: str,
                       quiet_loggers: tuple[str, ...] = ()) -> None:
    """Register `name` on `app`: options from `cls`, then `run(cfg)` with the resolved config.
    Bad input (ConfigError and the other user errors `run` raises) prints `error: ...`, exit 2."""
    names = option_names(cls)
    params = [_param(lf, names[lf.path]) for lf in leaves(cls) if lf.cli]
    spelled = {lf.path: names[lf.path].upper().replace("-", "_") if lf.argument else "--" + names[lf.path]
               for lf in leaves(cls) if lf.cli}
    params.sort(key=lambda p: not isinstance(p.default, typer.models.ArgumentInfo))  # arguments first
    params += [
        inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
                          default=typer.Option(None, "--config", "-c", help="YAML file with any of these settings "
                                               "(nested by section, see configs/); options given here override it.",
                                               rich_help_panel="config")),
        inspect.Parameter("print_config", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                          default=typer.Option(False, "--print-config", help="Print the resolved config as YAML "
                                               "and exit (save it to re-run the same recipe).",
                                               rich_help_panel="config")),
        inspect.Parameter("verbose", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                          default=typer.Option(False, "--verbose", "-v", help="Debug logging.",
                                               rich_help_panel="config")),
    ]

    def command(**values: Any) -> None:
        config_file, print_config, verbose = values.pop("config"), values.pop("print_config"), values.pop("verbose")
        overrides = _overrides(cls, values)
        if config_file is None:
            config_file = _resumed_config(cls, overrides)
        try:
            cfg = load_config(cls, config_file, overrides)
        except ConfigError as e:
            fail(_with_flags(e, spelled))
        if print_config:
            console.print(to_yaml(cfg), end="", markup=False, highlight=False, soft_wrap=True)
            return
        setup_logging(verbose, quiet_loggers)
        try:
            run(cfg)
        except user_errors() as e:
            fail(e)

    command.__signature__ = inspect.Signature(params)  # typer reads the options from here
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = help
    command.__name__ = name.replace("-", "_")
    app.command(name)(command)


def _resumed_config(cls: type, overrides: dict[str, Any]) -> Path | None:
    """`--resume` without `--config`: the run's own OUT/config.yaml, so the run continues with
    the settings it started with (the options given still override them)."""
    fields = {lf.path: lf for lf in leaves(cls)}
    if not {"resume", "out"} <= set(fields) or overrides.get("resume") is not True:  # typer gives the flag as a bool
        return None
    saved = Path(overrides.get("out") or fields["out"].default) / "config.yaml"
    if not saved.is_file():
        return None
    err.print(f"resuming with the settings in {saved} (options given here override them)", markup=False)
    return saved


def _with_flags(e: ConfigError, spelled: dict[str, str]) -> str:
    """Add the command-line spelling to a message that names a field by its dotted path."""
    msg = str(e)
    for path, flag in sorted(spelled.items(), key=lambda kv: -len(kv[0])):
        if msg.startswith(path + ":") or f": {path}:" in msg:
            return msg.replace(f"{path}:", f"{path} ({flag}):", 1)
        section, _, field = path.rpartition(".")  # a section's own check: "train: max_steps must ..."
        if section and msg.startswith(f"{section}: {field} "):
            return msg.replace(f"{section}: {field} ", f"{section}: {field} ({flag}) ", 1)
    return msg
