"""One gateway per state directory: an exclusive lock on ``<state_dir>/gateway.lock``.

A gateway owns what its state dir holds (the audit journal, replica logs, the key-cache
snapshot). A second one on the same dir must stop before it loads a model or touches the
store, so the command takes this lock first. ``flock`` is released by the kernel when the
process ends, however it ends: a crash leaves no stale lock, only a file naming the last pid.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from types import TracebackType

LOCK_NAME = "gateway.lock"


class StateDirBusy(RuntimeError):
    """Another process holds the state dir; ``pid`` is its pid when it wrote one."""

    def __init__(self, directory: Path, pid: int | None) -> None:
        self.directory = directory
        self.pid = pid
        held = f"by pid {pid}" if pid else "by another process"
        super().__init__(f"state dir {directory} is in use {held} (another gateway runs on it)")


class StateDirLock:
    """The held lock; ``release()`` (or leaving the ``with`` block) lets it go."""

    def __init__(self, directory: Path, fd: int) -> None:
        self.directory = directory
        self._fd = fd

    def release(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)  # nobody holds it now: name no pid
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = -1

    def __enter__(self) -> StateDirLock:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def lock_state_dir(state_dir: str | Path) -> StateDirLock:
    """Create ``state_dir`` if needed and lock it for this process, or raise ``StateDirBusy``.

    The descriptor is not inheritable (``os.open``'s default), so replica processes started
    later never keep the lock alive after the gateway is gone.
    """
    directory = Path(state_dir).expanduser().resolve()
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = _read_pid(fd)
        os.close(fd)
        raise StateDirBusy(directory, pid) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return StateDirLock(directory, fd)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None
