"""bayesdiff_ext.io.atomic: a file or folder appears whole or not at all, and nothing is left behind."""

import os

import pytest

from bayesdiff_ext.io.atomic import atomic_directory, atomic_write


def test_atomic_write_creates_and_replaces_a_file_with_the_usual_permissions(tmp_path):
    path = tmp_path / "out.txt"
    assert atomic_write(path, "first ✓") == path
    assert path.read_text(encoding="utf-8") == "first ✓"
    atomic_write(str(path), b"\x00second")
    assert path.read_bytes() == b"\x00second"
    assert os.listdir(tmp_path) == ["out.txt"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "out.bin"
    atomic_write(path, b"old")
    with pytest.raises(TypeError):
        atomic_write(path, 12345)  # not bytes: fails while writing
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["out.bin"]
    with pytest.raises(FileNotFoundError):
        atomic_write(tmp_path / "missing" / "out.bin", b"x")


def test_atomic_directory_appears_only_when_complete(tmp_path):
    target = tmp_path / "run"
    with atomic_directory(target) as staging:
        (staging / "a.txt").write_text("a")
        assert not target.exists() and staging.parent == tmp_path and staging.name.startswith(".run.")
    assert (target / "a.txt").read_text() == "a" and os.listdir(tmp_path) == ["run"]

    with pytest.raises(RuntimeError, match="injected"):
        with atomic_directory(tmp_path / "failed") as staging:
            (staging / "a.txt").write_text("a")
            raise RuntimeError("injected")
    assert os.listdir(tmp_path) == ["run"]


def test_atomic_directory_replaces_a_folder_only_when_asked(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(OSError):
        with atomic_directory(target) as staging:
            (staging / "new.txt").write_text("new")
    assert os.listdir(target) == ["old.txt"] and os.listdir(tmp_path) == ["model"]
    with atomic_directory(target, replace=True) as staging:
        (staging / "new.txt").write_text("new")
    assert os.listdir(target) == ["new.txt"] and os.listdir(tmp_path) == ["model"]
