"""One run at a time per output: a lock file held with ``flock`` for the life of the run.

The file records its owner (pid, host, start time, command), so a second run is refused with a
message naming the first. The kernel drops an ``flock`` when its process ends, however it ends
(SIGKILL and crashes included), so a lock whose owner is gone is free again: the next run takes it
and reports the stale owner it found. POSIX only (``fcntl``); on network file systems ``flock`` is as
good as the file system's locking.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["LockOwner", "RunLock"]


@dataclass(frozen=True)
class LockOwner:
    """Who holds (or held) a lock."""

    pid: int
    host: str
    started: str
    command: str

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, started {self.started}: {self.command}"


class RunLock:
    """An exclusive lock on ``path``, held from :meth:`acquire` to :meth:`release`.

    Attributes:
        stale (`LockOwner` or None): the owner recorded by a run that ended without releasing the
            lock (killed), found when this one took it.
    """

    def __init__(self, path: Path, descriptor: int, stale: LockOwner | None) -> None:
        self.path, self._descriptor, self.stale = path, descriptor, stale

    @classmethod
    def acquire(cls, path: str | os.PathLike, command: str) -> RunLock:
        """Take the lock at ``path`` (created if missing) for this process, recording ``command``.

        Raises:
            `FileExistsError`: a live run holds it; the message names its owner.
        """
        path = Path(path)
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_owner(descriptor)
            os.close(descriptor)
            who = owner.describe() if owner else "a process that has not written its name yet"
            raise FileExistsError(
                f"another run is writing this output ({who}; lock {path}): wait for it to finish, or choose "
                "another --out"
            ) from None
        stale = _read_owner(descriptor)
        owner = LockOwner(
            pid=os.getpid(),
            host=socket.gethostname(),
            started=datetime.datetime.now().isoformat(timespec="seconds"),
            command=command,
        )
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, json.dumps(asdict(owner)).encode(), 0)
        os.fsync(descriptor)
        return cls(path, descriptor, stale)

    def release(self) -> None:
        """Give the lock up (the file stays: it names the last owner). Idempotent."""
        if self._descriptor is not None:
            os.close(self._descriptor)  # closing drops the flock
            self._descriptor = None


def _read_owner(descriptor: int) -> LockOwner | None:
    size = os.fstat(descriptor).st_size
    if size == 0:
        return None
    try:
        return LockOwner(**json.loads(os.pread(descriptor, size, 0)))
    except (ValueError, TypeError):
        return LockOwner(pid=-1, host="?", started="?", command="(unreadable lock file)")
