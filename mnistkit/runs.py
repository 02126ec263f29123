"""Run directories: resolved config, metrics.jsonl, checkpoints; all written atomically.

A run folder ``runs/<model>-<timestamp>/`` holds everything needed to reproduce and audit a
run: ``config.yaml`` (model, resolved recipe, data), ``metrics.jsonl`` (one line per epoch),
``last.pt`` (resumable: weights, optimizer, scheduler, RNG states) and ``best.pt``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from mnistkit.errors import MnistkitError

CHECKPOINT_FORMAT = "mnistkit-checkpoint"
CHECKPOINT_VERSION = 1


class RunError(MnistkitError):
    """A run folder or checkpoint that cannot be used."""


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``: readers
    see the old file or the new one, never half of one."""
    path = Path(path)
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def new_run_dir(runs_dir: str | os.PathLike, model: str) -> Path:
    root = Path(runs_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for n in range(1000):
            path = root / (f"{model}-{stamp}" + (f"-{n}" if n else ""))
            try:
                path.mkdir()
                return path
            except FileExistsError:
                continue
    except OSError as exc:
        raise RunError(f"cannot create a run folder in {root}: {exc.strerror or exc}; "
                       "pass --runs-dir with a folder you can write to") from None
    raise RunError(f"too many runs of {model} in {root} this second")


def write_config(run_dir: Path, config: dict[str, Any]) -> None:
    atomic_write(run_dir / "config.yaml", yaml.safe_dump(config, sort_keys=False))


def read_config(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "config.yaml"
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise RunError(f"{run_dir} is not a run folder (no config.yaml)") from None
    except yaml.YAMLError as exc:
        raise RunError(f"{path} is not valid YAML ({exc}); the run folder is damaged") from None
    if not isinstance(data, dict) or "model" not in data or "recipe" not in data:
        raise RunError(f"{path} is not a mnistkit run config")
    return data


def write_metrics(run_dir: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise RunError(f"{path}:{n} is not valid JSON; the run folder is damaged") from None
    return rows


def best_row(metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """The epoch with the highest test accuracy, the earliest on ties: the epoch best.pt holds."""
    return max(metrics, key=lambda r: (r["test_acc"], -r["epoch"]))


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    import torch

    buffer = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, **payload}, buffer)
    atomic_write(path, buffer.getvalue())


def resolve_checkpoint(target: str | os.PathLike) -> Path:
    """A run folder means its ``best.pt`` (else ``last.pt``); a file means itself."""
    path = Path(target)
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / name).is_file():
                return path / name
        raise RunError(f"{path} has no checkpoint (best.pt or last.pt); is it a run folder?")
    if not path.exists():
        raise RunError(f"{path} does not exist; pass a run folder (e.g. runs/I3-...) or a .pt checkpoint")
    return path


def load_checkpoint(target: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a mnistkit checkpoint safely (``weights_only=True``: no code can run)."""
    import torch

    path = resolve_checkpoint(target)
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        unsafe = re.search(r"GLOBAL (\S+) was not an allowed global", str(exc))
        if unsafe or "Unsupported global" in str(exc):
            what = unsafe.group(1) if unsafe else "a Python object"
            raise RunError(f"{path} was refused: it asks to call {what} while loading, which could run code; "
                           "a mnistkit checkpoint holds only tensors and plain values") from None
        raise RunError(f"{path} is truncated or corrupt (not a readable checkpoint); use another checkpoint "
                       "or re-run training") from None
    except Exception as exc:  # any other failure to parse an untrusted file means the same to a user
        raise RunError(f"{path} is truncated or corrupt ({type(exc).__name__}); use another checkpoint "
                       "or re-run training") from None
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise RunError(f"{path} is not a mnistkit checkpoint (a foreign file?)")
    version = data.get("format_version")
    if not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise RunError(f"{path} has checkpoint format version {version}, newer than this mnistkit "
                       f"understands ({CHECKPOINT_VERSION}); upgrade mnistkit")
    return data


def find_runs(runs_dir: str | os.PathLike, model: str | None = None) -> list[Path]:
    """Run folders under ``runs_dir`` (optionally of one model), oldest first."""
    root = Path(runs_dir)
    if not root.is_dir():
        return []
    runs = [p for p in root.iterdir() if (p / "config.yaml").is_file()]
    if model is not None:
        runs = [p for p in runs if p.name.split("-")[0].lower() == model.lower()]
    return sorted(runs, key=lambda p: (p.stat().st_mtime, p.name))
