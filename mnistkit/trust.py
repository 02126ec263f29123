"""Which Python model files this user has named, with which content: the only code mnistkit
imports on its own when it rebuilds a model from a run folder.

A run folder records the path and SHA-256 of the file its model came from. Checking the hash
against the file alone would not stop a planted folder (a config naming a file it brought
along, with that file's hash), so a run's Python model is imported only when this user named
that very content on this machine before: by training from it, or by pointing at it with
``--model-code``. Trust is in the content, wherever it lies: a moved or copied project's runs
rebuild from their files (or the run folder's copy) without naming them again; content this
user never named stays refused. The record lives in the user's own state folder
(``$XDG_STATE_HOME/mnistkit/trusted-code.json``, by default ``~/.local/state``), is used only
when it is the user's own and not writable by others, and holds ``sha256 -> [paths]``. A damaged
record trusts nothing (and the next write replaces it). Like direnv's ``allow``.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from pathlib import Path

__all__ = ["store_path", "is_trusted", "remember"]

MAX_BYTES = 1 << 20
MAX_ENTRIES = 2000   # oldest forgotten first


def store_path() -> Path:
    root = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(root) / "mnistkit" / "trusted-code.json"


def _private(path: Path) -> bool:
    """The file and its folder belong to this user and nobody else can write them."""
    try:
        for p in (path, path.parent):
            st = os.lstat(p)
            if st.st_uid != os.getuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) or stat.S_ISLNK(st.st_mode):
                return False
    except OSError:
        return False
    return True


def _read() -> dict[str, list[str]]:
    path = store_path()
    if not _private(path):
        return {}
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_BYTES + 1)
        data = json.loads(raw) if len(raw) <= MAX_BYTES else None
    except (OSError, ValueError, RecursionError):   # a deeply nested file: damaged
        return {}
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        return {}
    return {k: [p for p in v if isinstance(p, str)] for k, v in data["files"].items()
            if isinstance(k, str) and isinstance(v, list)}


def is_trusted(sha256: str) -> bool:
    """This user named a file with content ``sha256`` before."""
    return bool(_read().get(sha256))


def remember(path: str | os.PathLike, sha256: str) -> bool:
    """Record that this user named ``path`` with content ``sha256``; False where the record
    cannot be written (a read-only home): the run still trains, rebuilding it then needs the
    file named again."""
    from mnistkit.outputs import atomic_write

    import fcntl

    where = str(Path(path).resolve())
    if where in _read().get(sha256, []):
        return True
    target = store_path()
    try:
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(OSError):
            os.chmod(target.parent, stat.S_IMODE(os.lstat(target.parent).st_mode) & ~0o022)
        if target.exists() and not _private(target):
            return False
        # read, change and rewrite under one lock: concurrent trainings (a sweep's workers) each keep theirs
        fd = os.open(target.parent / ".trusted-code.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            files = _read()
            if where not in files.get(sha256, []):
                files.setdefault(sha256, []).append(where)
                while sum(len(v) for v in files.values()) > MAX_ENTRIES:
                    files.pop(next(iter(files)))
                atomic_write(target, json.dumps({"version": 1, "files": files}, indent=1) + "\n")
        finally:
            os.close(fd)
    except Exception:  # an OSError, a RunError from atomic_write: a run never fails for this record
        return False
    return True
