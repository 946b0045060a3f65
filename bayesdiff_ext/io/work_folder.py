"""A long run's finished batches, kept beside its output folder until the output is written.

Layout of ``<out>.work/`` (a sibling of the output folder ``<out>``)::

    lock                    the run's lock (:mod:`bayesdiff_ext.io.run_lock`): one run at a time
    settings.json           the settings that made the batches; a resume must match them
    batches/000003.safetensors   batch 3's tensors, with its sampler settings and timings as metadata

Each batch file is written atomically when the batch is done, so a run killed at any moment keeps
every batch it finished; a resumed run computes only the missing ones. Once the output folder is
written, the work folder is removed.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from bayesdiff_ext.io.atomic import atomic_write
from bayesdiff_ext.io.run_lock import RunLock

__all__ = ["WorkFolder", "work_folder_for"]

SETTINGS_FILE = "settings.json"
BATCHES = "batches"


def work_folder_for(out: str | os.PathLike) -> Path:
    """``<out>.work``: where the run writing ``out`` keeps its finished batches."""
    out = Path(out).expanduser().absolute()
    return out.with_name(f"{out.name}.work")


def as_json(value: Any) -> Any:
    """``value`` as JSON gives it back (tuples as lists, other objects as their text)."""
    return json.loads(json.dumps(value, default=str))


class WorkFolder:
    """The work folder of one run, locked by this process while it is open.

    Attributes:
        path (`Path`): the folder.
        resumed (`bool`): whether it held batches of an interrupted run when opened.
        stale_owner: the owner of a lock left by a killed run, if one was found.
    """

    def __init__(self, path: Path, lock: RunLock, resumed: bool) -> None:
        self.path, self._lock, self.resumed = path, lock, resumed
        self.stale_owner = lock.stale

    @classmethod
    def open(cls, out: str | os.PathLike, settings: Mapping[str, Any], *, resume: bool, command: str) -> WorkFolder:
        """Open (creating it) the work folder of the run writing ``out``, and lock it.

        Args:
            out: the run's output folder.
            settings: what makes the batches (JSON-able; keys name the options, e.g. ``"--steps"``).
            resume: continue the interrupted run kept there; without it such a folder is refused.
            command: the command line, recorded in the lock.

        Raises:
            `FileExistsError`: another live run holds the lock; or the folder keeps an interrupted run
            and ``resume`` is false. `ValueError`: ``resume`` with settings that differ from the kept
            run's (the message names the first one that differs).
        """
        path = work_folder_for(out)
        path.mkdir(parents=True, exist_ok=True)
        lock = RunLock.acquire(path / "lock", command)
        try:
            settings = as_json(dict(settings))
            kept = _read_settings(path)
            if kept is not None and not resume:
                raise FileExistsError(
                    f"{path} keeps an interrupted run into {Path(out).name} ({len(_batch_numbers(path))} batches "
                    "done): pass --resume to continue it, or delete that folder to start over"
                )
            if kept is not None:
                _check_same(kept, settings, path)
            else:
                shutil.rmtree(path / BATCHES, ignore_errors=True)  # batches without settings are not a run's
                (path / BATCHES).mkdir()
                atomic_write(path / SETTINGS_FILE, json.dumps(settings, indent=2, sort_keys=True))
        except BaseException:
            lock.release()
            raise
        return cls(path, lock, resumed=kept is not None)

    def finished(self) -> list[int]:
        """The numbers of the batches kept, in order."""
        return _batch_numbers(self.path)

    def save_batch(self, number: int, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        """Keep batch ``number`` (atomically): its tensors and JSON-able ``meta``."""
        from safetensors.torch import save

        # copies: safetensors refuses tensors that share memory (a sampler's image may be its mean)
        data = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in tensors.items()}
        atomic_write(self._batch_path(number), save(data, metadata={"meta": json.dumps(as_json(dict(meta)))}))

    def load_batch(self, number: int) -> tuple[dict[str, torch.Tensor], dict]:
        """The tensors and meta of kept batch ``number``."""
        from safetensors import safe_open

        with safe_open(self._batch_path(number), framework="pt") as file:
            tensors = {name: file.get_tensor(name) for name in file.keys()}
            meta = json.loads(file.metadata()["meta"])
        return tensors, meta

    def remove(self) -> None:
        """Delete the folder (the run's output is written) and give up the lock."""
        shutil.rmtree(self.path, ignore_errors=True)
        self._lock.release()

    def close(self) -> None:
        """Give up the lock, keeping the batches for a resume; a folder with none is deleted."""
        if not self.finished():
            shutil.rmtree(self.path, ignore_errors=True)
        self._lock.release()

    def _batch_path(self, number: int) -> Path:
        return self.path / BATCHES / f"{number:06d}.safetensors"


def _batch_numbers(path: Path) -> list[int]:
    folder = path / BATCHES
    if not folder.is_dir():
        return []
    return sorted(int(f.stem) for f in folder.glob("*.safetensors") if f.stem.isdigit())


def _read_settings(path: Path) -> dict | None:
    file = path / SETTINGS_FILE
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except ValueError:
        raise ValueError(f"{file} is not readable JSON: delete {path} to start over") from None


def _check_same(kept: dict, settings: dict, path: Path) -> None:
    for name in sorted(kept.keys() | settings.keys()):
        if kept.get(name) != settings.get(name):
            raise ValueError(
                f"cannot resume: {name} was {_shown(kept.get(name))} in the interrupted run and is "
                f"{_shown(settings.get(name))} now ({path / SETTINGS_FILE}); run it with the same settings, "
                "or choose another --out"
            )


def _shown(value: Any) -> str:
    return "(not set)" if value is None else json.dumps(value)
