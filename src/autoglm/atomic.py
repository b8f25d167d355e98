"""The one way files and folders are written: into a temporary sibling, fsync'ed, then
renamed into place (`os.replace` is atomic on POSIX). A crash at any point leaves the old
content or the new one complete, never a half-written file.

* `atomic_write_text(path, text)`: one file.
* `atomic_dir(final)`: build a whole folder (a checkpoint, an export, a token cache, an
  adapter) in a temporary sibling; on success it replaces `final` (an old `final` is swapped
  aside and removed), on error the temporary folder is removed and `final` is untouched.
* `atomic_files(folder)`: write several files that land in an existing folder one rename
  each (a run directory's final model next to its checkpoints).

Example:
    >>> import pathlib, tempfile
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> atomic_write_text(root / "a.txt", "hello")
    >>> with atomic_dir(root / "d") as tmp:
    ...     _ = (tmp / "x.json").write_text("{}")
    >>> sorted(p.name for p in root.iterdir()), (root / "d" / "x.json").read_text()
    (['a.txt', 'd'], '{}')
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_write_text", "atomic_dir", "atomic_files", "fsync_dir", "fsync_tree"]


def fsync_dir(path: str | Path) -> None:
    """Flush a directory entry (so a rename inside it survives a power loss); a no-op where
    directories cannot be opened (Windows: the rename is still atomic)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(path: str | Path) -> None:
    """fsync every file below `path`, then every directory (deepest first)."""
    path = Path(path)
    dirs = [path]
    for p in sorted(path.rglob("*")):
        if p.is_file() and not p.is_symlink():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        elif p.is_dir():
            dirs.append(p)
    for d in reversed(dirs):
        fsync_dir(d)


def _mode_for(path: Path, default: int) -> int:
    """The permission bits a replaced `path` keeps, or what `open`/`mkdir` would give a new one
    (`default` less the umask): `mkstemp`/`mkdtemp` make 0600/0700, which would otherwise leave
    every written file or folder private to its owner (a model another user or a pod's UID
    cannot read, a repository file turned 0600)."""
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        mask = os.umask(0)
        os.umask(mask)
        return default & ~mask


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder and a rename; an
    existing file keeps its permissions."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, _mode_for(path, 0o666))
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_dir(final: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield an empty temporary folder next to `final`; when the block ends without an error
    its content is fsync'ed and it becomes `final`. `overwrite=False` refuses (FileExistsError)
    a `final` that exists and is not empty, before anything is written."""
    final = Path(final)
    if not overwrite and final.exists() and (not final.is_dir() or any(final.iterdir())):
        raise FileExistsError(f"{final} already exists and is not empty; choose another output path or "
                              f"allow overwriting it (--overwrite)")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        tmp.chmod(_mode_for(final, 0o777))
        fsync_tree(tmp)
        if final.exists():
            aside = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.replace(final, aside / "old")
            os.replace(tmp, final)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(final.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_files(folder: str | Path) -> Iterator[Path]:
    """Yield a temporary folder inside `folder`; on success every file written there moves
    into `folder` by its own atomic rename (other files in `folder` are kept)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".write-", dir=folder))
    try:
        yield tmp
        fsync_tree(tmp)
        for f in sorted(tmp.iterdir()):
            if f.is_file():
                os.replace(f, folder / f.name)
        fsync_dir(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
