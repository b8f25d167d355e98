"""Atomic writes keep the permissions a plain write would give: an existing file or folder keeps
its own, a new one gets the umask's (not the 0600/0700 of a temporary file)."""

import os
import stat

import pytest

from autoglm.atomic import atomic_dir, atomic_write_text


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(p):
    return stat.S_IMODE(p.stat().st_mode)


def test_new_file_gets_the_umasks_mode_and_a_replaced_one_keeps_its_own(tmp_path, umask_022):
    new = tmp_path / "new.yaml"
    atomic_write_text(new, "a: 1\n")
    plain = tmp_path / "plain.yaml"
    plain.write_text("a: 1\n")  # what open() gives under the same umask
    assert mode(new) == mode(plain) == 0o644
    kept = tmp_path / "weights.yaml"
    kept.write_text("old")
    kept.chmod(0o640)
    atomic_write_text(kept, "new")
    assert (kept.read_text(), mode(kept)) == ("new", 0o640)


def test_atomic_dir_gets_the_umasks_mode_and_a_replaced_folder_keeps_its_own(tmp_path, umask_022):
    with atomic_dir(tmp_path / "model") as d:
        (d / "config.json").write_text("{}")
    plain = tmp_path / "plain"
    plain.mkdir()
    assert mode(tmp_path / "model") == mode(plain) == 0o755
    (tmp_path / "model").chmod(0o750)
    with atomic_dir(tmp_path / "model") as d:
        (d / "config.json").write_text("{}")
    assert mode(tmp_path / "model") == 0o750
