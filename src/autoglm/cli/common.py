"""What every `autoglm` sub-command shares: the consoles, logging set-up, the default
cache folder and the one way to fail on bad input."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

__all__ = ["console", "err", "fail", "setup_logging", "DEFAULT_CACHE", "user_errors", "run_under_torchrun"]

console = Console()  # results (stdout)
err = Console(stderr=True)  # logs, progress bars and errors (stderr)
DEFAULT_CACHE = Path.home() / ".cache" / "autoglm"


def fail(exc: BaseException) -> NoReturn:
    """Print `error: <exc>` on stderr and exit with code 2. `soft_wrap`: the message is not broken
    at the terminal width, so paths in it stay whole (users copy them)."""
    msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc  # KeyError's str() adds quotes
    err.print(f"[bold red]error:[/] {escape(str(msg))}", soft_wrap=True, highlight=False)
    raise typer.Exit(code=2)


def user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean bad input (printed as `error: ...`, exit 2), not a bug."""
    from ..training.checkpoint import CheckpointError

    errors: list[type[BaseException]] = [ValueError, FileNotFoundError, FileExistsError, NotADirectoryError,
                                         KeyError, UnicodeDecodeError, CheckpointError]
    try:
        from ..export.onnx_export import ExportError
        errors.append(ExportError)
    except ImportError:  # onnx not installed: the export commands say so themselves
        pass
    return tuple(errors)


def setup_logging(verbose: bool = False, quiet: tuple[str, ...] = ()) -> None:
    """Log lines through rich on stderr (above any progress bar); `quiet`: loggers kept at WARNING."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=err, show_path=False, show_time=False)], force=True)
    for noisy in ("httpx", "urllib3", "filelock", *quiet):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()  # "Loading weights" / "Writing model shards" bars on every load/save


def run_under_torchrun(cfg, command: str, strategies: str = "ddp, fsdp or zero1") -> bool:
    """The distributed entry of a training command whose config has a `dist` section.

    Not yet under torchrun with a multi-process strategy: start torchrun running `autoglm
    <command> --config <cfg as YAML>` on every process, wait for it, and return True (this
    process is done). Under torchrun: refuse strategy `single` on several processes (each would
    train alone into the same directory), leave only the main rank's INFO logs, and return
    False (this process trains). `strategies`: the multi-process ones to name in that error."""
    from ..distributed.runtime import launched_by_torchrun, torchrun_rank, torchrun_world_size

    if cfg.dist.strategy != "single" and not launched_by_torchrun():
        from ..distributed.launch import launch

        code = launch(cfg, command)
        if code:
            fail(RuntimeError(f"torchrun exited with code {code}: a rank failed (its error is printed above)"))
        return True
    if cfg.dist.strategy == "single" and torchrun_world_size() > 1:
        fail(ValueError(f"launched by torchrun on {torchrun_world_size()} processes but --strategy is single (each "
                        f"would train alone into the same directory); pass --strategy {strategies}"))
    if torchrun_rank() > 0:  # the main rank reports; the others only warn
        logging.getLogger("autoglm").setLevel(logging.WARNING)
    return False
