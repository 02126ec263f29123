"""Run directories: resolved config, metrics.jsonl, checkpoints; all written atomically.

A run folder ``runs/<model>-<timestamp>/`` holds everything needed to reproduce and audit a
run: ``config.yaml`` (model, resolved recipe, data), ``metrics.jsonl`` (one line per epoch),
``last.pt`` (resumable: weights, optimizer, scheduler, RNG states) and ``best.pt``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import pickle
import re
import signal
import stat
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import yaml

from mnistkit import strictjson
from mnistkit.errors import RunError

CHECKPOINT_FORMAT = "mnistkit-checkpoint"
CHECKPOINT_VERSION = 1


def _umask_mode() -> int:
    """The mode an ordinary ``open(path, "w")`` gives a new file under the current umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``: readers
    see the old file or the new one, never half of one. The file gets the mode an ordinary
    ``open()`` would give it (a replaced file keeps its own), not the temporary file's 0600."""
    path = Path(path)
    raw = data.encode() if isinstance(data, str) else data
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
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


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
                       "choose a runs folder you can write to") from None
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


@dataclass(frozen=True)
class EpochMetrics:
    """One line of metrics.jsonl: what one finished epoch measured. Accuracies in percent."""

    epoch: int
    train_loss: float
    train_acc: float
    test_loss: float
    test_acc: float
    lr: float
    seconds: float
    train_images_per_s: float
    val_loss: float | None = None  # only when the run holds out a validation split
    val_acc: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str = "metrics") -> "EpochMetrics":
        if not isinstance(data, dict):
            raise RunError(f"{where} is not a metrics row; the run folder is damaged")
        values = {}
        for f in dataclasses.fields(cls):
            value = data.get(f.name)
            if value is None and f.default is None:
                continue
            ok = isinstance(value, int) if f.type == "int" else isinstance(value, (int, float))
            if isinstance(value, bool) or not ok or not math.isfinite(value):
                raise RunError(f"{where}: {f.name} is {value!r}, not a finite number; the run folder is damaged")
            values[f.name] = value
        return cls(**values)


def write_metrics(run_dir: Path, rows: list[EpochMetrics]) -> None:
    atomic_write(run_dir / "metrics.jsonl", "".join(strictjson.dumps(r.to_dict()) + "\n" for r in rows))


def read_metrics(run_dir: Path) -> list[EpochMetrics]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                data = json.loads(line)
            except json.JSONDecodeError:
                raise RunError(f"{path}:{n} is not valid JSON; the run folder is damaged") from None
            rows.append(EpochMetrics.from_dict(data, where=f"{path}:{n}"))
    return rows


def selected_on(metrics: list[EpochMetrics]) -> str:
    """Which split chooses the best epoch: ``validation`` when the run holds one out, else
    ``test`` (then "best" is optimistic by construction, and every display says so)."""
    return "validation" if metrics and metrics[0].val_acc is not None else "test"


def best_row(metrics: list[EpochMetrics]) -> EpochMetrics:
    """The epoch best.pt holds: the highest validation accuracy when the run has a validation
    split, else the highest test accuracy; the earliest on ties."""
    if selected_on(metrics) == "validation":
        return max(metrics, key=lambda r: (r.val_acc if r.val_acc is not None else -1.0, -r.epoch))
    return max(metrics, key=lambda r: (r.test_acc, -r.epoch))


@contextlib.contextmanager
def sigint_deferred() -> Iterator[None]:
    """Hold back Ctrl-C while an epoch's results are written, so that metrics.jsonl, best.pt and
    last.pt always describe the same epoch; a Ctrl-C pressed meanwhile is raised right after."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return
    pending: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pending:
        raise KeyboardInterrupt


class RunWriter:
    """The one writer of a run folder, and the one owner of "best".

    ``create`` makes the folder with ``config.yaml`` and an epoch-0 ``last.pt`` (so a folder that
    exists can always be resumed); ``commit`` writes one finished epoch: ``best.pt`` when it is
    the best so far, then ``last.pt``, then ``metrics.jsonl`` (last: whatever it lists, the
    checkpoints already hold), all while Ctrl-C is held back.
    """

    def __init__(self, run_dir: Path, meta: dict[str, Any], metrics: list[EpochMetrics] | None = None) -> None:
        self.run_dir, self.meta = Path(run_dir), meta
        self.metrics: list[EpochMetrics] = list(metrics or [])

    @classmethod
    def create(cls, runs_dir: str | os.PathLike, meta: dict[str, Any], config: dict[str, Any],
               state: dict[str, Any]) -> "RunWriter":
        with sigint_deferred():
            run_dir = new_run_dir(runs_dir, meta["model"])
            write_config(run_dir, config)
            writer = cls(run_dir, meta)
            writer._save_last(0, state)
        return writer

    @property
    def best(self) -> EpochMetrics | None:
        return best_row(self.metrics) if self.metrics else None

    @property
    def epoch(self) -> int:
        return self.metrics[-1].epoch if self.metrics else 0

    def _save_last(self, epoch: int, state: dict[str, Any]) -> None:
        save_checkpoint(self.run_dir / "last.pt", {**self.meta, "epoch": epoch,
                                                   "metrics": [r.to_dict() for r in self.metrics], **state})

    def commit(self, row: EpochMetrics, weights: dict[str, Any], state: dict[str, Any]) -> bool:
        """Write epoch ``row``; ``weights`` is the model's state_dict, ``state`` the rest of
        what resuming needs. Returns whether this epoch is the new best."""
        with sigint_deferred():
            previous = self.best
            self.metrics.append(row)
            is_best = self.best is row and previous is not row
            if is_best:
                save_checkpoint(self.run_dir / "best.pt", {**self.meta, "epoch": row.epoch,
                                                           "metrics": [r.to_dict() for r in self.metrics],
                                                           "state_dict": weights})
            self._save_last(row.epoch, {"state_dict": weights, **state})
            write_metrics(self.run_dir, self.metrics)
        return is_best


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
