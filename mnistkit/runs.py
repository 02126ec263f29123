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
from mnistkit.errors import RunError, UsageError
from mnistkit.recipe import DataOptions, Recipe
from mnistkit.safeio import load_yaml_bounded, read_text_bounded

CHECKPOINT_FORMAT = "mnistkit-checkpoint"
CHECKPOINT_VERSION = 1


def _umask_mode() -> int:
    """The mode an ordinary ``open(path, "w")`` gives a new file under the current umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


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


def check_output(path: str | os.PathLike) -> None:
    """Refuse, before anything is written, an output path that cannot be written: a folder, a
    missing parent folder, a symlink loop. (A command writing two outputs checks both first.)"""
    path = Path(path)
    try:
        if path.is_dir():
            raise RunError(f"cannot write {path}: it is a folder; give a file name")
        parent = Path(os.path.realpath(path)).parent
        if not parent.is_dir():
            raise RunError(f"cannot write {path}: the folder {parent} does not exist; create it or choose another path")
    except OSError as exc:
        raise RunError(f"cannot write {path}: {exc.strerror or exc}; choose another output path") from None


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
        # runs recorded before 0.4 lack bn_relu: they trained with PyTorch's BatchNorm and ReLU;
        # runs recorded before 0.7 lack shards: one thread trained each whole batch
        recipe = Recipe.from_dict({"bn_relu": "torch", "shards": 1, **data["recipe"]}, where=f"{path} recipe")
        options = DataOptions.from_dict(data.get("data") or {}, where=f"{path} data")
    except (UsageError, TypeError) as exc:  # a damaged file, not a bad option
        raise RunError(f"{exc}; the run folder is damaged") from None
    measured_on = data.get("measured_on") or {}

    def wrong(key: str, kind: type) -> bool:
        value = measured_on.get(key)
        return not isinstance(value, kind) or (kind is int and isinstance(value, bool))

    if not isinstance(measured_on, dict) or (measured_on and any(wrong(k, t) for k, t in MEASURED_ON.items())):
        raise RunError(f"{path}: measured_on is not what mnistkit writes; the run folder is damaged")
    return RunConfig(path, data["model"], recipe, options, dict(measured_on))


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


def metrics_text(rows: list[EpochMetrics]) -> str:
    """metrics.jsonl: one strict-JSON line per epoch."""
    return "".join(strictjson.dumps(r.to_dict()) + "\n" for r in rows)


def write_metrics(run_dir: Path, rows: list[EpochMetrics]) -> None:
    atomic_write(run_dir / "metrics.jsonl", metrics_text(rows))


def read_metrics(run_dir: Path) -> list[EpochMetrics]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for n, line in enumerate(read_text_bounded(path, MAX_METRICS_BYTES, RunError, "a metrics").splitlines(), 1):
        if line.strip():
            try:
                data = json.loads(line)
            except json.JSONDecodeError:
                raise RunError(f"{path}:{n} is not valid JSON; the run folder is damaged") from None
            rows.append(EpochMetrics.from_dict(data, where=f"{path}:{n}"))
    check_epochs(rows, str(path))
    return rows


def check_epochs(rows: list[EpochMetrics], where: str) -> None:
    if [r.epoch for r in rows] != list(range(1, len(rows) + 1)):
        raise RunError(f"{where} lists epochs {[r.epoch for r in rows][:10]}, not 1, 2, 3, ...; the run folder "
                       "is damaged")


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

    def __init__(self, run_dir: Path, meta: dict[str, Any], metrics: list[EpochMetrics] | None = None) -> None:
        self.run_dir, self.meta = Path(run_dir), meta
        self.metrics: list[EpochMetrics] = list(metrics or [])

    @classmethod
    def create(cls, runs_dir: str | os.PathLike, meta: dict[str, Any], config: dict[str, Any],
               state: dict[str, Any], name: str | None = None) -> "RunWriter":
        with sigint_deferred():
            run_dir = new_run_dir(runs_dir, meta["model"], name)
            try:
                write_config(run_dir, config)
                writer = cls(run_dir, meta)
                writer._save_last(0, state)
            except OSError as exc:  # a full disk: leave no folder that cannot be resumed
                for name in ("last.pt", "config.yaml"):
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
            atomic_write_all(files)  # metrics.jsonl last: whatever it lists, the checkpoints hold
            self.metrics = metrics
        return is_best


def checkpoint_bytes(payload: dict[str, Any]) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, **payload}, buffer)
    return buffer.getvalue()


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    atomic_write(path, checkpoint_bytes(payload))


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
        # torch's weights-only unpickler refused the file: whatever its payload (a call to exec,
        # os.system, an old pickle protocol's opcodes), it is not a plain weights file
        named = re.search(r"GLOBAL (\S+)", str(exc))
        call = named.group(1) if named else (_foreign_call(path) if "Weights only load failed" in str(exc) else None)
        if call:
            raise RunError(f"{path} was refused as unsafe: it asks to call {call} while loading, which could run "
                           "code; a mnistkit checkpoint holds only tensors and plain values") from None
        raise RunError(f"{path} is truncated or corrupt (not a readable checkpoint); use another checkpoint "
                       "or re-run training") from None
    except PermissionError:
        raise RunError(f"cannot read {path}: permission denied; check its permissions") from None
    except Exception as exc:  # any other failure to parse an untrusted file means the same to a user
        raise RunError(f"{path} is truncated or corrupt ({type(exc).__name__}); use another checkpoint "
                       "or re-run training") from None
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise RunError(f"{path} is not a mnistkit checkpoint (a foreign file?)")
    version = data.get("format_version")
    if not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise RunError(f"{path} has checkpoint format version {version}, newer than this mnistkit "
                       f"understands ({CHECKPOINT_VERSION}); upgrade mnistkit")
    _check_checkpoint(data, path)
    return data


_SAFE_MODULES = ("torch", "collections", "_codecs", "numpy")


def _foreign_call(path: Path) -> str | None:
    """The first callable outside torch's own that a pickle asks for, found by parsing its
    opcodes (never by running them): every pickle protocol, raw or inside a torch zip file."""
    import pickletools
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                name = next((n for n in zf.namelist() if n.endswith("data.pkl")), None)
                raw = zf.read(name)[: 64 << 20] if name else b""
        else:
            with open(path, "rb") as fh:
                raw = fh.read(64 << 20)
    except (OSError, zipfile.BadZipFile, KeyError):
        return None
    strings: list[str] = []
    start = 0
    while start < len(raw):  # torch's legacy format is several pickles one after another
        try:
            end = start
            for op, arg, pos in pickletools.genops(raw[start:]):
                end = start + pos
                if isinstance(arg, str):
                    strings.append(arg)
                name = None
                if op.name in ("GLOBAL", "INST"):
                    name = str(arg).replace(" ", ".")
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    name = f"{strings[-2]}.{strings[-1]}"
                if name and not name.startswith(_SAFE_MODULES):
                    return name
        except Exception:  # not (or no longer) a pickle
            return None
        start = end + 1
    return None


def _check_checkpoint(data: dict[str, Any], path: Path) -> None:
    """Shape and types of what every mnistkit checkpoint holds; a damaged one is one error."""
    import torch

    def bad(what: str) -> RunError:
        return RunError(f"{path} is damaged: {what}; use another checkpoint or re-run training")

    if not isinstance(data.get("model"), str):
        raise bad("it names no model")
    epoch = data.get("epoch")
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
        raise bad(f"its epoch is {epoch!r}")
    state = data.get("state_dict")
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise bad("its weights are not a mapping of names to tensors")
    metrics = data.get("metrics")
    if not isinstance(metrics, list):
        raise bad("it holds no metrics")
    rows = [EpochMetrics.from_dict(r, where=f"{path} metrics") for r in metrics]
    check_epochs(rows, f"{path} metrics")
    if len(rows) < epoch:
        raise bad(f"it is at epoch {epoch} but lists {len(rows)} epochs of metrics")


def check_resumable(data: dict[str, Any], path: Path) -> None:
    """What ``last.pt`` needs beyond the weights to resume exactly: optimizer, scheduler, RNG."""
    import torch

    rng = data.get("rng")
    ok = (isinstance(data.get("optimizer"), dict) and (data.get("scheduler") is None or isinstance(data["scheduler"], dict))
          and isinstance(rng, dict) and isinstance(rng.get("python"), (tuple, list))
          and isinstance(rng.get("torch"), torch.Tensor) and isinstance(rng.get("data"), torch.Tensor)
          and len(data.get("metrics") or []) == data.get("epoch"))
    if not ok:
        raise RunError(f"{path} cannot be resumed: its optimizer, scheduler or random-number state is missing or "
                       "damaged; start a new run")


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
    state: str  # finished, interrupted (resumable), diverged, damaged, empty
    model: str | None = None
    dataset: str | None = None
    train_samples: int | None = None
    seed: int | None = None
    epochs_done: int = 0
    epochs_planned: int | None = None
    final_test_acc: float | None = None
    best_test_acc: float | None = None
    best_selected_on: str | None = None
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
    base = dict(run=str(run), model=config.model, dataset=config.data.dataset,
                train_samples=on.get("train_samples") or config.data.limit, seed=config.recipe.seed,
                epochs_done=len(metrics), epochs_planned=config.recipe.epochs, modified=modified)
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
    if len(metrics) >= config.recipe.epochs:
        return RunSummary(**base, state="finished")
    if not (run / "last.pt").is_file():
        return RunSummary(**base, state="damaged", why="no last.pt to resume from")
    return RunSummary(**base, state="interrupted")


def list_runs(runs_dir: str | os.PathLike) -> list[RunSummary]:
    """Every run folder under ``runs_dir``, newest first."""
    return sorted((summarize_run(p) for p in find_runs(runs_dir)), key=lambda r: r.modified, reverse=True)
