"""Text corpora: the built-in standard-library docstring corpus and user text files.

Every machine with Python has the standard library, so its docstrings (about 1.5 MB of
English technical prose on CPython 3.11) make a default corpus that needs no download
and no shared data directory.
"""

from __future__ import annotations

import ast
import inspect
import logging
import os
import sysconfig
import warnings
from pathlib import Path

__all__ = ["stdlib_docstring_corpus", "read_corpus", "TEXT_SUFFIXES"]

logger = logging.getLogger(__name__)

# Directories whose docstrings are test scaffolding, third-party code or legacy tools.
_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
)
_DOC_NODES = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
TEXT_SUFFIXES = (".txt", ".md")


def _python_files(root: Path) -> list[Path]:
    """``*.py`` files under ``root``, pruning skipped directories, sorted by relative path."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        found.extend(Path(dirpath, f) for f in filenames if f.endswith(".py"))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _docstrings(path: Path) -> list[str] | None:
    """Module, class and function docstrings of one file in source order; None if unparsable."""
    try:
        source = path.read_bytes()
        with warnings.catch_warnings():  # e.g. invalid escape sequences in old modules
            warnings.simplefilter("ignore")
            tree = ast.parse(source, filename=str(path))
    except (OSError, SyntaxError, ValueError, RecursionError):
        return None
    defs = (n for n in ast.walk(tree) if isinstance(n, _DOC_NODES))
    nodes = sorted(defs, key=lambda n: n.lineno)
    docs = (ast.get_docstring(n, clean=False) for n in (tree, *nodes))
    # strip(): cleandoc keeps a trailing whitespace-only line when no line sets a margin
    return [inspect.cleandoc(d).strip() for d in docs if d]


def stdlib_docstring_corpus(root: str | Path | None = None, min_chars: int = 40) -> list[str]:
    """Docstrings of the Python standard library, one document per docstring.

    Walks the ``*.py`` files under ``root`` (default: this interpreter's
    ``sysconfig.get_paths()["stdlib"]``) in sorted path order, skipping
    ``site-packages``, ``test``/``tests``, ``idlelib``, ``lib2to3`` and ``__pycache__``
    directories and files that fail to parse. Each module, class and function docstring
    is cleaned with ``inspect.cleandoc`` and stripped; docstrings shorter than
    ``min_chars`` and exact duplicates (first occurrence wins) are dropped. The result
    is deterministic for a given Python installation. Takes a few seconds (parsing
    ~600 files).
    """
    root = Path(root) if root is not None else Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(
            f"standard library directory {root} does not exist; pass root= pointing at a "
            f"directory of .py files, or give read_corpus a path to your own text"
        )
    seen: set[str] = set()
    corpus: list[str] = []
    n_files = n_failed = 0
    for path in _python_files(root):
        docs = _docstrings(path)
        if docs is None:
            n_failed += 1
            continue
        n_files += 1
        for doc in docs:
            if len(doc) >= min_chars and doc not in seen:
                seen.add(doc)
                corpus.append(doc)
    logger.info(
        "stdlib docstring corpus: %d docstrings, %d characters from %d files under %s "
        "(%d unparsable files skipped)",
        len(corpus), sum(map(len, corpus)), n_files, root, n_failed,
    )
    if not corpus:
        raise ValueError(
            f"no docstrings of >= {min_chars} characters found under {root}; pass a "
            f"corpus path (a .txt/.md file or a directory of them) instead"
        )
    return corpus


def _read_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")  # tolerate a byte-order mark
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path} is not valid UTF-8 (byte offset {e.start}: {e.reason}); convert it, "
            f"e.g. `iconv -f latin1 -t utf-8 '{path}' > '{path}.utf8'`, and use the "
            f"converted file"
        ) from None


def read_corpus(path: str | Path | None) -> list[str]:
    """Read a text corpus as a list of documents.

    Args:
        path: ``None`` for the built-in :func:`stdlib_docstring_corpus`; a file, read
            as one UTF-8 document; or a directory, whose ``*.txt`` and ``*.md`` files
            (recursively, sorted by relative path) each become one document.
            Whitespace-only documents in a directory are skipped.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: a file is not UTF-8, a directory has no text files, or the corpus
            holds only whitespace.
    """
    if path is None:
        return stdlib_docstring_corpus()
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"corpus path {path} does not exist; pass an existing text file or directory "
            f"of {'/'.join(TEXT_SUFFIXES)} files, or no path for the built-in stdlib "
            f"docstring corpus"
        )
    if path.is_file():
        files = [path]
    else:
        files = sorted(
            (p for p in path.rglob("*") if p.suffix.lower() in TEXT_SUFFIXES and p.is_file()),
            key=lambda p: p.relative_to(path).as_posix(),
        )
        if not files:
            raise ValueError(
                f"corpus directory {path} contains no {' or '.join(TEXT_SUFFIXES)} files; "
                f"add some, or pass a single text file instead"
            )
    texts = [_read_utf8(f) for f in files]
    docs = [t for t in texts if t.strip()]
    if not docs:
        what = "file" if path.is_file() else f"directory ({len(files)} files)"
        raise ValueError(
            f"corpus {what} {path} is empty (only whitespace); add text to it or pass "
            f"another path"
        )
    if len(docs) < len(texts):
        logger.info("skipped %d whitespace-only files in %s", len(texts) - len(docs), path)
    logger.info(
        "read corpus %s: %d documents, %d characters", path, len(docs), sum(map(len, docs))
    )
    return docs
