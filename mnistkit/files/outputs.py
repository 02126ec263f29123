"""Writing files safely: atomically (a temporary file in the same folder, fsynced, then renamed),
several at once all or none, and outputs the user named (which may be a symlink, a device or on
a full disk)."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path

from mnistkit.errors import RunError
from mnistkit.files.safeio import read_text_bounded

__all__ = ["atomic_write", "atomic_write_all", "check_output_path", "write_output", "write_folder", "check_folder"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _umask_mode() -> int:
    """The mode an ordinary ``open(path, "w")`` gives a new file under the current umask."""
    return 0o666 & ~_umask()


def _stage(path: Path, raw: bytes) -> str:
    """Write ``raw`` to a temporary file beside ``path``, fsynced, with the mode an ordinary
    ``open()`` would give (a replaced file keeps its own), not mkstemp's 0600. Returns its name."""
    try:
        mode = path.stat().st_mode & 0o7777 if path.is_file() else _umask_mode()
    except OSError:
        mode = _umask_mode()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``: readers
    see the old file or the new one, never half of one."""
    path = Path(path)
    tmp = _stage(path, data.encode() if isinstance(data, str) else data)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_all(files: list[tuple[Path, bytes]]) -> None:
    """Several files, all or none: every one is staged (the step that needs disk space and can
    fail) before any is renamed into place, in the order given."""
    staged: list[tuple[str, Path]] = []
    try:
        for path, raw in files:
            staged.append((_stage(path, raw), path))
        for tmp, path in staged:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in staged:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise


# the files of a run folder (runs.py, checkpoint.py, lock.py): never an output's target
RUN_FILES = ("config.yaml", "metrics.jsonl", "last.pt", "best.pt", "outcome.json", ".lock", "model.py", "model.yaml")


def check_output_path(path: str | os.PathLike, inputs: tuple[str | os.PathLike, ...] = ()) -> None:
    """Refuse, before anything is written, an output path that cannot be written (a folder, a
    missing parent folder, a symlink loop), or that is, once links are resolved, one of the
    command's ``inputs`` or a file of a run folder (``export RUN -o RUN/best.pt`` replaced the
    run's checkpoint). A command writing several outputs checks them with ``check_outputs``."""
    path = Path(path)
    try:
        if path.is_dir():
            raise RunError(f"cannot write {path}: it is a folder; give a file name")
        real = Path(os.path.realpath(path))
        if not real.parent.is_dir():
            raise RunError(f"cannot write {path}: the folder {real.parent} does not exist; create it or choose "
                           "another path")
        for given in inputs:
            if given is not None and Path(os.path.realpath(given)) == real:
                raise RunError(f"cannot write {path}: it is {given}, which this command reads; choose another "
                               "output path")
        if real.name in RUN_FILES and (real.parent / "config.yaml").is_file():
            raise RunError(f"cannot write {path}: it is a file of the run folder {real.parent} and would "
                           "replace it; choose another output path")
    except OSError as exc:
        raise RunError(f"cannot write {path}: {exc.strerror or exc}; choose another output path") from None


def check_outputs(paths: list[str | os.PathLike | None], inputs: tuple[str | os.PathLike, ...] = ()) -> None:
    """``check_output_path`` for each path given, and no two of them the same file."""
    seen: dict[Path, str | os.PathLike] = {}
    for path in (p for p in paths if p):
        check_output_path(path, inputs)
        real = Path(os.path.realpath(path))
        if real in seen:
            raise RunError(f"cannot write {path}: it is also {seen[real]}, another output of this command; give "
                           "each its own path")
        seen[real] = path


def write_output(path: str | os.PathLike, data: bytes | str) -> None:
    """Write a file the user named (a report, a plot). A regular file, or a new one, is replaced
    atomically; a symlink is followed and its target written (the link stays a link); anything
    else that exists (a device, a pipe, /dev/stdout) is written directly, never replaced."""
    path = Path(path)
    raw = data.encode() if isinstance(data, str) else data
    try:
        try:
            st = os.stat(path)  # follows symlinks
        except FileNotFoundError:
            st = None
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise RunError(f"cannot write {path}: it is a folder; give a file name")
        if st is not None and not stat.S_ISREG(st.st_mode):
            with open(path, "wb") as fh:
                fh.write(raw)
            return
        atomic_write(Path(os.path.realpath(path)), raw)
    except OSError as exc:
        raise RunError(f"cannot write {path}: {exc.strerror or exc}; choose another output path") from None


FOLDER_MARK = ".mnistkit-report"  # in every folder write_folder makes: the names it wrote, one a line


def check_folder(path: str | os.PathLike, inputs: tuple[str | os.PathLike, ...] = ()) -> None:
    """Refuse, before anything is computed or written, a folder ``write_folder`` must not replace:
    a symlink or a file; a folder holding anything that write_folder did not write there (a file
    you added to a report folder, a .git, a run); the current folder or one above it; a folder
    that holds one of the command's ``inputs`` (the runs, the change-log); a missing parent."""
    path = Path(path)
    try:
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            raise RunError(f"cannot write the folder {path}: it exists and is not a folder; choose another path")
        real = Path(os.path.realpath(path))
        if real == Path.cwd().resolve() or real in Path.cwd().resolve().parents:
            raise RunError(f"cannot write the folder {path}: it is the current folder or holds it; name a folder "
                           "inside it (e.g. report)")
        if path.is_dir():
            mark = path / FOLDER_MARK
            listed = read_text_bounded(mark, 1 << 16, RunError, "a report mark").split("\n")[1:] if mark.is_file() else []
            ours = set(listed) | {FOLDER_MARK} if mark.is_file() else set()
            foreign = sorted(p.name for p in path.iterdir() if p.name not in ours)
            if foreign:
                raise RunError(f"cannot write the folder {path}: it holds {', '.join(foreign[:3])}"
                               f"{' ...' if len(foreign) > 3 else ''}, which mnistkit did not write; choose a new "
                               "folder, or move those away")
        for given in inputs:
            inside = Path(os.path.realpath(given))
            if inside == real or real in inside.parents:
                raise RunError(f"cannot write the folder {path}: it holds {given}, which this command reads; "
                               "choose another path")
        if not real.parent.is_dir():
            raise RunError(f"cannot write the folder {path}: {real.parent} does not exist; create it or choose "
                           "another path")
    except OSError as exc:
        raise RunError(f"cannot write the folder {path}: {exc.strerror or exc}; choose another path") from None


def write_folder(path: str | os.PathLike, files: dict[str, bytes | str], inputs: tuple[str | os.PathLike, ...] = ()) -> None:
    """Write a folder of files as a whole (``check_folder`` first): staged in a hidden folder
    beside ``path``, every file fsynced, then swapped in, so that a half-written folder never
    replaces a good one; the mark lists the names written, and only they may be replaced."""
    import shutil
    import tempfile

    check_folder(path, inputs)
    real = Path(os.path.realpath(path))
    try:
        stage = Path(tempfile.mkdtemp(prefix=f".{real.name}.", dir=real.parent))
        try:
            mark = "written by mnistkit; replaced whole by the next write; it wrote:\n" + "\n".join(files)
            for name, data in {**files, FOLDER_MARK: mark}.items():
                with open(stage / name, "wb") as fh:
                    fh.write(data.encode() if isinstance(data, str) else data)
                    fh.flush()
                    os.fsync(fh.fileno())
            os.chmod(stage, 0o777 & ~_umask())  # mkdtemp's is 0700
            if not real.is_dir():
                os.rename(stage, real)
                return
            old = Path(tempfile.mkdtemp(prefix=f".{real.name}.old.", dir=real.parent))
            os.rename(real, old / real.name)
            try:
                os.rename(stage, real)
            except BaseException:
                os.rename(old / real.name, real)  # the good folder back where it was
                raise
            finally:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
    except OSError as exc:
        raise RunError(f"cannot write the folder {path}: {exc.strerror or exc}; choose another path") from None
