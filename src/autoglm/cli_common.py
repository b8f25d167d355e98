"""What every `autoglm` sub-command shares: the stderr console and the one way to fail on bad input."""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console

err = Console(stderr=True)


def fail(exc: BaseException) -> NoReturn:
    """Print `error: <exc>` on stderr and exit with code 2. `soft_wrap`: the message is not broken
    at the terminal width, so paths in it stay whole (users copy them)."""
    err.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
    raise typer.Exit(code=2)
