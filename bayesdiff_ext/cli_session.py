"""The ``bayesdiff`` command's process: its process group, signals, and a sampling run's work folder.

A front-door helper of :mod:`bayesdiff_ext.cli` (docs/ARCHITECTURE.md):

* Under ``torchrun`` (``WORLD_SIZE`` > 1) it joins the process group
  (:func:`~bayesdiff_ext.distributed.init_from_environment`: gloo on the CPU, NCCL for CUDA, each
  process on GPU ``LOCAL_RANK``), leaves it at the end, and makes process 0 the only one that prints
  progress and writes files. A process that fails tells the others, which stop with its error
  (:mod:`bayesdiff_ext.distributed`); a final status exchange ends every command.
* SIGINT and SIGTERM stop the command with exit status 130 and 143.
* ``sample``, ``demo`` and ``eval``'s generation run in the work folder beside their output
  (:mod:`bayesdiff_ext.io.work_folder`): locked (a second run into the same ``--out`` is refused),
  finished batches kept, ``--resume`` continuing an interrupted run with the same settings. Once the
  output is written it is removed.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import torch

from bayesdiff_ext import distributed
from bayesdiff_ext._version import __version__
from bayesdiff_ext.batch_runner import run_batches
from bayesdiff_ext.io.outputs import check_output_dir, timestamped_out_dir
from bayesdiff_ext.io.work_folder import WorkFolder, work_folder_for

__all__ = ["CommandSession", "Stopped", "current"]

#: Commands that sample batch by batch into an output folder (opened before the command runs).
BATCH_COMMANDS = ("sample", "demo")
#: Commands whose batches are kept for ``--resume`` (``eval`` opens its work folder once its settings are known).
RESUMABLE = (*BATCH_COMMANDS, "eval")
#: Options that do not change a batch's numbers (left out of the settings a resume must match).
PRESENTATION = ("out", "resume", "no_progress", "debug", "device", "aggregation", "filter")

_CURRENT: CommandSession | None = None


class Stopped(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; ``exit_code`` is 128 + the signal's number."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.exit_code = 128 + signum


def current() -> CommandSession:
    """The session of the command being run."""
    if _CURRENT is None:
        raise RuntimeError("no bayesdiff command is running")
    return _CURRENT


class CommandSession:
    """The context of one ``bayesdiff`` command (``with CommandSession(args, argv): ...``)."""

    def __init__(self, args, argv: list[str]) -> None:
        self.args, self.argv = args, list(argv)
        self.work: WorkFolder | None = None
        self.rank, self.world = 0, 1
        self._joined = False
        self._handlers: dict[int, Any] = {}

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ the context
    def __enter__(self) -> CommandSession:
        global _CURRENT
        if threading.current_thread() is threading.main_thread():
            self._handlers = {s: signal.signal(s, _stop) for s in (signal.SIGINT, signal.SIGTERM)}
        _CURRENT = self
        try:
            joined_before = distributed.is_distributed()
            distributed.init_from_environment()
            self._joined = distributed.is_distributed() and not joined_before
            self.rank, self.world = distributed.rank_and_world()
            with distributed.failing_together():
                self._prepare()
        except BaseException:
            self._leave()
            raise
        return self

    def __exit__(self, kind, error, traceback) -> None:
        try:
            if error is None:
                distributed.barrier()  # a process that failed after its last batch still fails the run
                if self.work is not None:
                    self.work.remove()
                    self.work = None
            else:
                distributed.report_failure(error)
        finally:
            if self.work is not None:
                self.work.close()
            self._leave()

    def _leave(self) -> None:
        global _CURRENT
        _CURRENT = None
        for signum, handler in self._handlers.items():
            signal.signal(signum, handler)
        if self._joined:
            torch.distributed.destroy_process_group()

    def _prepare(self) -> None:
        args = self.args
        if not self.is_main:
            args.no_progress = True
        if args.command == "eval" and args.reuse and self.world > 1:
            raise ValueError(f"bayesdiff eval --reuse renders in one process: run it without torchrun (this launch has {self.world})")
        if args.command not in BATCH_COMMANDS:
            return
        if args.out is None:
            args.out = distributed.broadcast(timestamped_out_dir())
        args.out = check_output_dir(args.out)  # its errors before the work folder beside it is made
        self.open_work(run_settings(args))

    def open_work(self, settings: dict[str, Any]) -> None:
        """Open and lock (process 0) the work folder beside ``--out`` for a run made by ``settings``
        (:func:`batch_settings`); its batches are then kept, and a ``--resume`` continues them. A
        failure (another run's lock, other settings) stops every process."""
        args = self.args
        with distributed.failing_together():
            if self.is_main:
                command = shlex.join(["bayesdiff", *self.argv])
                self.work = WorkFolder.open(args.out, settings, resume=args.resume, command=command)
                if self.work.stale_owner is not None:
                    self.say(f"bayesdiff: a run into {args.out} was killed ({self.work.stale_owner.describe()}); taking over")
                if args.resume and not self.work.resumed:
                    self.say(f"bayesdiff: nothing to resume in {self.work.path}; starting the run")
        distributed.barrier()

    # ------------------------------------------------------------------ what the commands use
    def say(self, message: str) -> None:
        """A progress line on stderr, from process 0 only."""
        if self.is_main:
            print(message, file=sys.stderr, flush=True)

    def error_line(self, message: str) -> str:
        where = f" (process {self.rank} of {self.world})" if self.world > 1 else ""
        return f"bayesdiff: error{where}: {message}"

    def run_batches(self, sample_batch, num_images: int, batch_size: int):
        """:func:`~bayesdiff_ext.batch_runner.run_batches` of the run, kept in its work folder."""
        if self.work is not None and self.work.resumed:
            done = len(self.work.finished())
            self.say(f"bayesdiff: resuming: {done} batch(es) kept in {self.work.path}")
        return run_batches(sample_batch, num_images, batch_size, self.work)

    def resume_hint(self) -> str | None:
        """How to continue an interrupted run (process 0, once batches are kept)."""
        if not self.is_main or self.args.command not in RESUMABLE or self.args.out is None:
            return None
        folder = work_folder_for(self.args.out)
        kept = len(list((folder / "batches").glob("*.safetensors"))) if folder.is_dir() else 0
        if kept == 0:
            return None
        command = shlex.join(["bayesdiff", *_without_out_and_resume(self.argv), "--out", str(self.args.out), "--resume"])
        launcher = " (under torchrun as before)" if self.world > 1 else ""
        return f"bayesdiff: {kept} finished batch(es) are kept in {folder}; to continue{launcher}: {command}"


def _stop(signum, frame) -> None:
    raise Stopped(signum)


def _without_out_and_resume(argv: list[str]) -> list[str]:
    kept, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == "--out":
            skip = True
        elif item != "--resume" and not item.startswith("--out="):
            kept.append(item)
    return kept


def run_settings(args) -> dict[str, Any]:
    """What makes a sampling run's batches: every option but :data:`PRESENTATION` (see :func:`batch_settings`)."""
    options = {name: value for name, value in vars(args).items() if name not in PRESENTATION and name != "command"}
    return batch_settings(args.command, options, args.device)


def batch_settings(command: str, options: dict[str, Any], device: str | None) -> dict[str, Any]:
    """What makes a run's batches: ``options`` (by name), the device type, the package version, and a
    fingerprint of each file or folder an option names (a ``Path``)."""
    settings: dict[str, Any] = {"command": command, "version": __version__, "device type": _device_type(device)}
    for name, value in sorted(options.items()):
        option = "--" + name.replace("_", "-")
        paths = value if isinstance(value, (list, tuple)) and value and isinstance(value[0], Path) else [value]
        if all(isinstance(p, Path) for p in paths):
            settings[option] = [str(p.expanduser().absolute()) for p in paths]
            settings[f"{option} contents"] = [_fingerprint(p) for p in paths]
        else:
            settings[option] = value
    return settings


def _device_type(name: str | None) -> str:
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name).type


def _fingerprint(path: Path) -> str:
    """A digest of the names, sizes and modification times of the files at ``path`` (cheap for GB of
    weights; a file rewritten with other contents changes its time)."""
    path = path.expanduser()
    if not path.exists():
        return "missing"
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for file in files:
        stat = file.stat()
        digest.update(f"{file.relative_to(path) if file != path else file.name}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]
