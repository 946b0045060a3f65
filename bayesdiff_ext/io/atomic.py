"""Files and folders that appear whole or not at all: written under a hidden temporary name beside
the target, then renamed into place (``os.replace``), so a reader sees the old content or the new,
never part of it. Every file the package writes goes through here."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_directory", "atomic_write"]


def _sibling(path: Path, kind: str) -> Path:
    """A hidden, unique name in ``path``'s folder (same file system, so the rename is atomic)."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.{kind}")


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` to the file ``path`` atomically, replacing any file there.

    Args:
        path: the file to write; its folder must exist.
        data: the content; ``str`` is written as UTF-8.

    Returns:
        ``path`` as a ``Path``. The temporary file gets the permissions of any new file (the
        process umask) and is removed if writing or renaming fails; the error is re-raised.
    """
    path = Path(path)
    partial = _sibling(path, "partial")
    try:
        with open(partial, "xb") as file:
            file.write(data.encode() if isinstance(data, str) else data)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return path


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, replace: bool = False) -> Iterator[Path]:
    """A folder that appears at ``path`` only once everything in it has been written.

    Args:
        path: the folder to create; its parent must exist. Without ``replace`` it must not exist or
            be an empty folder.
        replace: replace an existing folder at ``path`` (it is moved aside, and deleted once the new
            one is in place; put back if the rename fails).

    Yields:
        The hidden staging folder to fill. When the ``with`` block ends normally it is renamed to
        ``path``; when it raises, the staging folder is deleted and the error re-raised.
    """
    path = Path(path)
    staging = _sibling(path, "partial")
    staging.mkdir()
    try:
        yield staging
        old = _sibling(path, "old") if replace and path.exists() else None
        if old is not None:
            os.replace(path, old)
        try:
            os.replace(staging, path)
        except BaseException:
            if old is not None:
                os.replace(old, path)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
