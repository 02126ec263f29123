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
when it is the user's own and not writable by others, and holds, for each content's SHA-256,
the paths it was named at and what was built of it (a class or function with its arguments:
a record someone sent cannot make a trusted file run another function of it). A damaged
record trusts nothing (and the next write replaces it). Like direnv's ``allow``.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from pathlib import Path

__all__ = ["store_path", "is_trusted", "trusted_at", "remember"]

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


def _read() -> dict[str, dict[str, list[str]]]:
    """``sha256 -> {"paths": [...], "builds": [...]}`` (a version-1 record: paths only)."""
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

    def strings(v: object) -> list[str]:
        return [x for x in v if isinstance(x, str)] if isinstance(v, list) else []

    return {k: {"paths": strings(v), "builds": []} if isinstance(v, list) else
            {"paths": strings(v.get("paths")), "builds": strings(v.get("builds"))}
            for k, v in data["files"].items() if isinstance(k, str) and isinstance(v, (list, dict))}


def is_trusted(sha256: str, build: str | None = None) -> bool:
    """This user named content ``sha256`` before (and built ``build`` of it: a class or
    function with its arguments, ``ModelSource.build_key``)."""
    entry = _read().get(sha256)
    return bool(entry) and (build is None or build in entry["builds"])


def trusted_at(path: str | os.PathLike, sha256: str) -> bool:
    """This user named the file at ``path`` with content ``sha256``: there, the files beside it
    are theirs too."""
    return str(Path(path).resolve()) in (_read().get(sha256) or {}).get("paths", [])


def remember(path: str | os.PathLike, sha256: str, build: str | None = None) -> bool:
    """Record that this user named ``path`` with content ``sha256`` (and built ``build`` of it);
    False where the record cannot be written (a read-only home): the run still trains,
    rebuilding it then needs the file named again."""
    import fcntl

    from mnistkit.files.outputs import atomic_write

    where = str(Path(path).resolve())
    entry = _read().get(sha256) or {"paths": [], "builds": []}
    if where in entry["paths"] and (build is None or build in entry["builds"]):
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
            entry = files.pop(sha256, None) or {"paths": [], "builds": []}   # re-inserted: the newest last
            for key, value in (("paths", where), ("builds", build)):
                if value is not None and value not in entry[key]:
                    entry[key].append(value)
            files[sha256] = entry
            while sum(len(v["paths"]) + len(v["builds"]) for v in files.values()) > MAX_ENTRIES:
                files.pop(next(iter(files)))   # the least recently named first
            atomic_write(target, json.dumps({"version": 2, "files": files}, indent=1) + "\n")
        finally:
            os.close(fd)
    except Exception:  # an OSError, a RunError from atomic_write: a run never fails for this record
        return False
    return True
