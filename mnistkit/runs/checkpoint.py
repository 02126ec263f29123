"""The checkpoint format: what a ``.pt`` file of a run holds, how it is written, and the one
safe, validating reader (``weights_only=True``: loading a checkpoint never runs code)."""

from __future__ import annotations

import io
import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

from mnistkit.errors import RunError
from mnistkit.runs.metrics import EpochMetrics, check_epochs
from mnistkit.files.outputs import atomic_write

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "checkpoint_bytes", "save_checkpoint", "resolve_checkpoint",
           "load_checkpoint", "check_resumable"]

CHECKPOINT_FORMAT = "mnistkit-checkpoint"
CHECKPOINT_VERSION = 1


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
    from mnistkit.files.safeio import open_regular

    open_regular(path, RunError, "a checkpoint").close()   # a named pipe would block torch.load forever
    return path


def load_checkpoint(target: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a mnistkit checkpoint safely (``weights_only=True``: no code can run)."""
    import torch

    path = resolve_checkpoint(target)
    try:
        with warnings.catch_warnings():   # torch's warnings about a hostile file (pickle protocol, sparse
            warnings.simplefilter("ignore")   # tensors) would come before the one line that refuses it
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
    _check_against_its_run(data, path)
    return data


def _check_against_its_run(data: dict[str, Any], path: Path) -> None:
    """A checkpoint inside a run folder must be of the model that folder trained: a best.pt
    swapped for another run's is refused, not evaluated or exported as this run's."""
    if not (path.parent / "config.yaml").is_file():
        return   # a checkpoint on its own
    from mnistkit.runs import read_config   # runs imports this module

    try:
        config = read_config(path.parent)
    except RunError:
        return   # a damaged config: the commands that read it say so
    if str(data["model"]).lower() != config.model.lower():
        raise RunError(f"{path} holds model {data['model']!r}, but its run folder {path.parent} trained "
                       f"{config.model!r}: the file was replaced; use the run's own checkpoint or re-run training")
    mine = (data.get("model_source") or {}).get("sha256")
    theirs = config.model_source.sha256 if config.model_source is not None else None
    if mine != theirs:
        raise RunError(f"{path} holds a model whose source has SHA-256 {mine}, but its run folder {path.parent} "
                       f"trained {theirs}: the file was replaced; use the run's own checkpoint or re-run training")


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
    if data.get("model_source") is not None:
        from mnistkit.usermodels.rebuild import read_record

        recorded = read_record(data["model_source"], str(path)).name
        if recorded.lower() != data["model"].lower():
            raise bad(f"it names model {data['model']!r} but its model_source is {recorded!r}")
        if data.get("model_text") is not None and not isinstance(data["model_text"], str):
            raise bad("its model architecture is not text")
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
