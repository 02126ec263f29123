"""``mnistkit init``: a starting project for the exercise: a change-log with the assignment's
constraints and two iterations of the user's own (``S1`` in ``models.py``, ``S2`` as a YAML
architecture), and a ``.gitignore`` for ``runs/``. Nothing that exists is ever overwritten: the
files are written all or none, into a folder that has none of them."""

from __future__ import annotations

import os
from pathlib import Path

from mnistkit.errors import UsageError

__all__ = ["TEMPLATES", "init_project"]

TEMPLATES = Path(__file__).with_name("templates") / "project"
FILES = {"experiments.yaml": "experiments.yaml", "models.py": "models.py", "s2.yaml": "s2.yaml",
         ".gitignore": "gitignore"}   # name in the project -> template


def init_project(folder: str | os.PathLike = ".") -> list[Path]:
    """Write the starting project into ``folder`` (made when missing); returns the files written."""
    from mnistkit.files.outputs import atomic_write_all, check_output_path

    if os.fspath(folder) == "":   # Path("") is the current folder: an unset variable must not write there
        raise UsageError("the project's folder is an empty path; name a folder (mnistkit init my-project), "
                         "or '.' for the current one")
    root = Path(folder)
    if root.exists() and not root.is_dir():
        raise UsageError(f"{root} is a file, not a folder; name a new or existing folder for the project")
    present = [name for name in FILES if os.path.lexists(root / name)]
    if present:
        raise UsageError(f"{root} already has {', '.join(present)}; mnistkit init never overwrites a file: "
                         "choose a new folder (mnistkit init my-project)")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create {root}: {exc.strerror or exc}; choose a folder you can write to") from None
    files = [(root / name, (TEMPLATES / template).read_bytes()) for name, template in FILES.items()]
    for path, _ in files:
        check_output_path(path)
    try:
        atomic_write_all(files)
    except OSError as exc:
        raise UsageError(f"cannot write the project into {root}: {exc.strerror or exc}; nothing was written") from None
    return [path for path, _ in files]
