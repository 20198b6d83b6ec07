"""One run per run folder: an exclusive OS lock on ``<run>/.lock`` held for the run's lifetime.

``flock`` locks belong to the open file: the OS drops them when the process exits in any way (normal
exit, exception, ``kill -9``), so a crashed run never leaves a stale lock behind. The holder writes its
PID into the file so a second run can name it. On systems without ``fcntl`` (Windows) the lock is a
no-op with a warning.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..errors import RunError

log = logging.getLogger("ddk_fast")

LOCK_NAME = ".lock"


class RunLock:
    """``with RunLock(run_dir):`` holds the folder's lock; a second holder gets RunError naming the PID."""

    def __init__(self, run_dir: Path | str):
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            log.warning("no fcntl here: %s is not locked against a second run", self.path.parent)
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunError(
                f"run folder {self.path.parent} is in use by another run (PID {holder}); wait for it to "
                "finish, stop it, or set another [output] dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the file drops the flock
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
