"""One writer per folder: an OS-level lock (``flock``) on ``FOLDER/.lock``, held for a whole
training (or sweep) and released by the kernel if the process dies, so a stale lock file of a
dead process never blocks. The file holds the holder's PID, for the message a second writer
gets and for ``mnistkit runs``."""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

from mnistkit.errors import RunError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no locking
    fcntl = None

__all__ = ["FolderLock", "holder"]

LOCK_NAME = ".lock"
_HELD = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)   # what flock says when another holds the lock


class FolderLock:
    """``FolderLock.acquire(folder, what)`` takes the lock or raises one line naming the holder's
    PID; ``release`` (or the process ending) gives it back."""

    def __init__(self, fd: int | None, path: Path) -> None:
        self._fd, self.path = fd, path

    @classmethod
    def acquire(cls, folder: str | os.PathLike, what: str = "run") -> "FolderLock":
        path = Path(folder) / LOCK_NAME
        if fcntl is None:
            return cls(None, path)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as exc:
            raise RunError(f"cannot lock {folder}: {exc.strerror or exc}; check the folder's permissions") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in _HELD:   # a file system without locks (NFS without lockd, ...): go on unlocked
                os.close(fd)
                return cls(None, path)
            pid = _read_pid(fd)
            os.close(fd)
            raise RunError(f"{folder} is in use by another mnistkit process (PID {pid or 'unknown'}) training this "
                           f"{what}; wait for it to end, or stop it first") from None
        with contextlib.suppress(OSError):   # the PID is for messages only: a full disk does not stop the lock
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        return cls(fd, path)

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)   # closing the descriptor releases the flock
            self._fd = None


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def holder(folder: str | os.PathLike) -> int | None:
    """The PID of the process holding ``folder``'s lock, or None when nobody holds it (a lock
    file a dead process left behind is not held)."""
    path = Path(folder) / LOCK_NAME
    if fcntl is None or not path.is_file() or path.is_symlink():
        return None
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))   # never blocks, even on a swapped-in pipe
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        return (_read_pid(fd) or -1) if exc.errno in _HELD else None
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
