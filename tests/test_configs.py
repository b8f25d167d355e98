"""Every config file in configs/ is accepted by the command its header names.

Each file's comments show how to run it (`autoglm <command> ... --config configs/<file>`); that
command line, with `--print-config`, must resolve the file without an error, so a renamed
option or a field typo in a shipped config fails here and not in a user's hands."""

import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from autoglm.cli import app

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def command_line(path: Path) -> list[str]:
    for line in path.read_text().splitlines():
        m = re.search(rf"autoglm (.*--config configs/{re.escape(path.name)}.*)", line)
        if line.lstrip().startswith("#") and m:
            text = re.sub(r"\[[^\]]*\]", "", m.group(1).split("#")[0])  # [--optional args] left out
            words = shlex.split(text.strip("` "))
            return ["runs/x" if w == "RUN" else w for w in words]
    raise AssertionError(f"{path.name} names no `autoglm ... --config configs/{path.name}` command in its comments")


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_file_resolves_with_its_command(path):
    args = command_line(path)
    args[args.index("--config") + 1] = str(path)
    result = CliRunner().invoke(app, [*args, "--print-config"])
    assert result.exit_code == 0, (args, result.output)
    assert result.output.strip(), args
