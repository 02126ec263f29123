"""Run folders: the config reader, metrics.jsonl, the one writer that commits an epoch and owns
"best", listing runs and their state. (The checkpoint format is ``checkpoint.py``; safe writes
``mnistkit.files.outputs``.)

A run folder ``runs/<model>-<timestamp>/`` holds everything needed to reproduce and audit a
run: ``config.yaml`` (model, resolved recipe, data), ``metrics.jsonl`` (one line per epoch),
``last.pt`` (resumable: weights, optimizer, scheduler, RNG states) and ``best.pt``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shlex
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import yaml

from mnistkit.files import strictjson
from mnistkit.errors import RunError, UsageError
from mnistkit.recipe import DataOptions, Recipe, recorded_recipe
from mnistkit.runs.checkpoint import checkpoint_bytes, save_checkpoint
from mnistkit.runs.lock import LOCK_NAME, FolderLock, holder
from mnistkit.runs.metrics import EpochMetrics, best_row, check_epochs, metrics_text, selected_on
from mnistkit.files.outputs import atomic_write, atomic_write_all
from mnistkit.files.safeio import load_yaml_bounded, read_text_bounded

def new_run_dir(runs_dir: str | os.PathLike, model: str, name: str | None = None) -> Path:
    """A new, empty run folder: ``<model>-<timestamp>``, or exactly ``name`` (a sweep's trial),
    which must not exist yet."""
    root = Path(runs_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
        if name is not None:
            try:
                (root / name).mkdir()
            except FileExistsError:
                raise RunError(f"{root / name} already exists; resume it or remove it") from None
            return root / name
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


MAX_CONFIG_BYTES = 1 << 20
STAGED = {"config", "best", "last", "metrics", "outcome", "model"}   # what a writer stages as .NAME.*.tmp
MAX_METRICS_BYTES = 16 << 20  # a line is about 300 bytes: tens of thousands of epochs
MEASURED_ON = {"dataset": str, "official_mnist": bool, "train_samples": int, "val_samples": int,
               "test_samples": int, "full_training_set": bool}


@dataclass(frozen=True)
class RunConfig:
    """A run's config.yaml, validated: what was trained, with which recipe, on which data."""

    path: Path
    model: str
    recipe: Recipe
    data: DataOptions
    measured_on: dict[str, Any]  # empty for runs recorded before mnistkit checked its data
    threads: int | None = None  # torch's intra-op threads it trained with (None: not recorded, before 0.9)
    model_source: Any = None    # modelref.ModelSource as recorded (None before 0.10: a registered name)
    device: str | None = None   # where it started training (cpu, cuda:0, mps); None where not recorded
    teacher: dict[str, Any] | None = None   # the run that taught it (distill.py); None: no teacher


def read_config(run_dir: str | os.PathLike) -> RunConfig:
    """The one reader of config.yaml: bounded, and every field checked for shape and type, so
    that a damaged folder is one clear error instead of a KeyError somewhere later."""
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise RunError(f"{run_dir} is not a run folder (no config.yaml)")
    data, _ = load_yaml_bounded(path, MAX_CONFIG_BYTES, RunError, "a run config")
    if not isinstance(data, dict) or not isinstance(data.get("model"), str) or not isinstance(data.get("recipe"), dict):
        raise RunError(f"{path} is not a mnistkit run config (it needs a model name and a recipe); "
                       "the run folder is damaged")
    try:
        recipe = recorded_recipe(data["recipe"], where=f"{path} recipe")
        options = DataOptions.from_dict(data.get("data") or {}, where=f"{path} data")
    except (UsageError, TypeError) as exc:  # a damaged file, not a bad option (or one of 0.8: that says so)
        old = isinstance(exc, UsageError) and exc.key == "backend" and "0.8 or older" in str(exc)
        raise RunError(str(exc) if old else f"{exc}; the run folder is damaged") from None
    measured_on = data.get("measured_on") or {}

    def wrong(key: str, kind: type) -> bool:
        value = measured_on.get(key)
        return not isinstance(value, kind) or (kind is int and isinstance(value, bool))

    if not isinstance(measured_on, dict) or (measured_on and any(wrong(k, t) for k, t in MEASURED_ON.items())):
        raise RunError(f"{path}: measured_on is not what mnistkit writes; the run folder is damaged")
    threads = data.get("threads")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= 4096):
        raise RunError(f"{path}: threads is {threads!r}, not a number of threads; the run folder is damaged")
    from mnistkit.usermodels.rebuild import read_record

    source = read_record(data["model_source"], str(path)) if data.get("model_source") is not None else None
    device = data.get("device")
    device = device if isinstance(device, str) and 0 < len(device) <= 32 else None   # shown, never used
    return RunConfig(path, data["model"], recipe, options, dict(measured_on), threads, source, device,
                     read_teacher_record(data.get("teacher"), str(path)))


def read_teacher_record(value: Any, where: str) -> dict[str, Any] | None:
    """A run's recorded teacher, every field checked (config.yaml is read as possibly damaged)."""
    if value is None:
        return None
    fields = {"run": str, "model": str, "checkpoint": str, "sha256": str, "epoch": int, "test_acc": float}
    ok = isinstance(value, dict) and all(
        isinstance(value.get(k), t) and not isinstance(value.get(k), bool) for k, t in fields.items())
    ok = ok and all(isinstance(value.get(k), str) and len(value[k]) <= 4096 and not set(value[k]) & {"\0", "\n"}
                    for k in ("run", "model", *(("relpath",) if value.get("relpath") is not None else ()))) and \
        len(value["sha256"]) == 64 and \
        all(c in "0123456789abcdef" for c in value["sha256"]) and value["checkpoint"] == "last.pt" and \
        (value.get("relpath") is None or (isinstance(value["relpath"], str) and len(value["relpath"]) <= 4096))
    if not ok:
        raise RunError(f"{where}: its teacher record is not what mnistkit writes; the run folder is damaged")
    return dict(value)


def read_metrics(run_dir: Path) -> list[EpochMetrics]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for n, line in enumerate(read_text_bounded(path, MAX_METRICS_BYTES, RunError, "a metrics").splitlines(), 1):
        if line.strip():
            try:
                data = strictjson.loads(line, allow_nan=True)   # as before: NaN is read (EpochMetrics checks)
            except ValueError as exc:   # malformed, or nested too deeply to parse (RecursionError)
                raise RunError(f"{path}:{n} is not valid JSON ({exc}); the run folder is damaged") from None
            rows.append(EpochMetrics.from_dict(data, where=f"{path}:{n}"))
    check_epochs(rows, str(path))
    return rows


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an interruption so that a run stops as cleanly as on Ctrl-C."""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While training, SIGTERM (a scheduler, ``kill``) raises ``Terminated`` like Ctrl-C raises
    KeyboardInterrupt; the previous handler is put back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def sigint_deferred() -> Iterator[None]:
    """Hold back Ctrl-C and SIGTERM while an epoch's results are written, so that
    metrics.jsonl, best.pt and last.pt always describe the same epoch; a signal that arrives
    meanwhile is raised right after."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return
    pending: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: pending.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if pending:
        raise Terminated if signal.SIGTERM in pending else KeyboardInterrupt


class RunWriter:
    """The one writer of a run folder, and the one owner of "best".

    ``create`` makes the folder with ``config.yaml`` and an epoch-0 ``last.pt`` (so a folder that
    exists can always be resumed); ``commit`` writes one finished epoch: ``best.pt`` when it is
    the best so far, then ``last.pt``, then ``metrics.jsonl`` (last: whatever it lists, the
    checkpoints already hold), all while Ctrl-C is held back.
    """

    def __init__(self, run_dir: Path, meta: dict[str, Any], metrics: list[EpochMetrics] | None = None,
                 lock: FolderLock | None = None) -> None:
        self.run_dir, self.meta, self.lock = Path(run_dir), meta, lock   # the folder's lock, held while writing
        self.metrics: list[EpochMetrics] = list(metrics or [])
        if lock is not None:   # a writer killed while staging (kill -9) left its hidden temp files: ours to remove
            for stale in self.run_dir.glob(".*.tmp"):
                if stale.name.split(".")[1] in STAGED and stale.is_file() and not stale.is_symlink():
                    stale.unlink(missing_ok=True)

    def abandon(self) -> None:
        """Remove the folder of a run that failed before its first epoch (it holds nothing of use);
        called while the lock is still held."""
        if self.epoch == 0:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def close(self) -> None:
        """Give the folder's lock back (the run ended, however)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    @classmethod
    def create(cls, runs_dir: str | os.PathLike, meta: dict[str, Any], config: dict[str, Any],
               state: dict[str, Any], name: str | None = None, files: dict[str, bytes] | None = None) -> "RunWriter":
        """A new run folder with ``config``, the epoch-0 ``last.pt`` and ``files`` (the copy of
        the model's source, for the record)."""
        lock = None
        try:
            with sigint_deferred():
                run_dir = new_run_dir(runs_dir, meta["model"], name)
                lock = FolderLock.acquire(run_dir)   # a new, empty folder: nobody else holds it
                writer = cls._fill(run_dir, runs_dir, meta, config, state, lock, files or {})
        except BaseException:   # a Ctrl-C held back until the folder was whole: give the lock back
            if lock is not None:
                lock.release()
            raise
        return writer

    @classmethod
    def _fill(cls, run_dir: Path, runs_dir: str | os.PathLike, meta: dict[str, Any], config: dict[str, Any],
              state: dict[str, Any], lock: FolderLock, files: dict[str, bytes]) -> "RunWriter":
        """config.yaml and the epoch-0 last.pt; on a full disk, no folder that cannot be resumed."""
        try:
            for name, raw in files.items():
                atomic_write(run_dir / name, raw)
            write_config(run_dir, config)
            writer = cls(run_dir, meta, lock=lock)
            writer._save_last(0, state)
        except OSError as exc:
            lock.release()
            for name in ("last.pt", "config.yaml", *files, LOCK_NAME):
                with contextlib.suppress(OSError):
                    (run_dir / name).unlink()
            with contextlib.suppress(OSError):
                run_dir.rmdir()
            raise RunError(f"cannot write a run folder in {Path(runs_dir)}: {exc.strerror or exc}; make room or "
                           "choose another runs folder") from None
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
        what resuming needs. Returns whether this epoch is the new best. All or nothing: on a
        full disk the folder keeps the previous epoch whole."""
        with sigint_deferred():
            metrics = self.metrics + [row]
            rows = [r.to_dict() for r in metrics]
            is_best = best_row(metrics) is row
            files = []
            if is_best:
                files.append((self.run_dir / "best.pt", checkpoint_bytes(
                    {**self.meta, "epoch": row.epoch, "metrics": rows, "state_dict": weights})))
            files.append((self.run_dir / "last.pt", checkpoint_bytes(
                {**self.meta, "epoch": row.epoch, "metrics": rows, "state_dict": weights, **state})))
            files.append((self.run_dir / "metrics.jsonl", metrics_text(metrics).encode()))
            try:
                atomic_write_all(files)  # metrics.jsonl last: whatever it lists, the checkpoints hold
            except OSError as exc:
                then = (f"the folder still holds epoch {self.epoch} whole: make room, then resume with: mnistkit "
                        f"train --resume {shlex.quote(str(self.run_dir))}" if self.epoch else
                        "no epoch was kept (a new run's folder is removed): make room, then train again")
                raise RunError(f"cannot write the results of epoch {row.epoch} in {self.run_dir} "
                               f"({exc.strerror or exc}); {then}") from None
            self.metrics = metrics
        return is_best


def find_runs(runs_dir: str | os.PathLike) -> list[Path]:
    """Run folders under ``runs_dir`` and in its sweep folders one level down, oldest first."""
    root = Path(runs_dir)
    if root.exists() and not root.is_dir():
        raise RunError(f"{root} is not a folder; give the runs folder (where run folders are)")
    if not root.is_dir():
        return []
    try:
        runs = []
        for p in root.iterdir():
            if (p / "config.yaml").is_file():
                runs.append(p)
            elif p.is_dir() and not p.is_symlink():  # a sweep's folder: its trials are run folders
                runs += [q for q in p.iterdir() if (q / "config.yaml").is_file()]
        return sorted(runs, key=lambda p: (p.stat().st_mtime, p.name))
    except OSError as exc:
        raise RunError(f"cannot list the runs folder {root}: {exc.strerror or exc}; check its permissions") from None


# --------------------------------------------------------------------------- listing runs

OUTCOME = "outcome.json"  # written when a run ends in a way its other files cannot show (diverged)


def write_outcome(run_dir: Path, state: str, epoch: int, reason: str) -> None:
    atomic_write(Path(run_dir) / OUTCOME, strictjson.dumps({"state": state, "epoch": epoch, "reason": reason}) + "\n")


@dataclass(frozen=True)
class RunSummary:
    """One run folder as ``mnistkit runs`` lists it."""

    run: str
    state: str  # finished, interrupted (resumable), training (a process holds it), diverged, damaged, empty
    model: str | None = None
    dataset: str | None = None
    train_samples: int | None = None
    seed: int | None = None
    epochs_done: int = 0
    epochs_planned: int | None = None
    final_test_acc: float | None = None
    best_test_acc: float | None = None
    best_selected_on: str | None = None
    device: str | None = None     # config.yaml's device: where it started training
    precision: str | None = None  # the precision it trained in (bf16, fp32)
    modified: float = 0.0  # seconds since the epoch
    why: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def summarize_run(run: Path) -> RunSummary:
    try:
        modified = max((p.stat().st_mtime for p in run.iterdir()), default=run.stat().st_mtime)
    except OSError:
        modified = 0.0
    try:
        config = read_config(run)
        metrics = read_metrics(run)
    except RunError as exc:
        return RunSummary(str(run), "damaged", modified=modified, why=str(exc))
    on = config.measured_on
    pid = holder(run)
    base = dict(run=str(run), model=config.model, dataset=config.data.dataset,
                train_samples=on.get("train_samples") or config.data.limit, seed=config.recipe.seed,
                epochs_done=len(metrics), epochs_planned=config.recipe.epochs, modified=modified,
                device=config.device, precision=config.recipe.precision)
    if metrics:
        best = best_row(metrics)
        base.update(final_test_acc=metrics[-1].test_acc, best_test_acc=best.test_acc,
                    best_selected_on=selected_on(metrics))
    outcome = run / OUTCOME
    if outcome.is_file():
        try:
            data = strictjson.loads(read_text_bounded(outcome, 1 << 16, RunError, "an outcome"))
            if isinstance(data, dict) and data.get("state") == "diverged":
                return RunSummary(**base, state="diverged", why=str(data.get("reason", ""))[:300])
        except (RunError, ValueError):
            return RunSummary(**base, state="damaged", why=f"{outcome} is not readable")
    if pid is not None:   # a process holds the folder: it is training now, whatever its files say
        return RunSummary(**base, state="training", why=f"PID {pid}" if pid > 0 else "another process")
    if len(metrics) >= config.recipe.epochs:
        return RunSummary(**base, state="finished")
    if not (run / "last.pt").is_file():
        return RunSummary(**base, state="damaged", why="no last.pt to resume from")
    return RunSummary(**base, state="interrupted")


def list_runs(runs_dir: str | os.PathLike) -> list[RunSummary]:
    """Every run folder under ``runs_dir``, newest first."""
    return sorted((summarize_run(p) for p in find_runs(runs_dir)), key=lambda r: r.modified, reverse=True)
