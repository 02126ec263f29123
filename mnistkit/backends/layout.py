"""Which memory layout a model trains in: channels_last where the model runs in it, else
PyTorch's default (contiguous) layout.

channels_last is faster for these small convolutions on the CPU, but a model may not run in
it: the course notebooks' FC head, ``x.view(x.size(0), -1)`` after a convolution, cannot view a
channels_last activation ("view size is not compatible with input tensor's size and stride").
``choose`` finds out before the first step with one forward and backward pass of a batch of two
in train mode, on a copy of the model (its weights, BatchNorm statistics and every random
generator are left as they were), and falls back to the default layout only where the model
then runs in it: an error of the model's own is left for training to report as ever.
"""

from __future__ import annotations

import contextlib
import copy
import random
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

__all__ = ["Layout", "choose", "called_sequentials"]

PROBE_SHAPE = (2, 1, 28, 28)   # two images: BatchNorm in train mode needs more than one value per channel


@dataclass(frozen=True)
class Layout:
    channels_last: bool
    note: str | None = None    # one line for the run's start, where the layout was changed


@contextlib.contextmanager
def _rng_kept(device: torch.device) -> Iterator[None]:
    """Every random generator the model's code may draw from, as it was before (torch's on the
    CPU and ``device``, Python's, NumPy's where it is loaded)."""
    python = random.getstate()
    np = sys.modules.get("numpy")
    np_state = np.random.get_state() if np is not None else None
    devices = [device] if device.type in ("cuda", "mps", "xpu") else []
    try:
        with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
            yield
    finally:
        random.setstate(python)
        if np is not None:
            np.random.set_state(np_state)


def _probe_input(device: torch.device, fmt: torch.memory_format) -> torch.Tensor:
    """The probes' batch: two fixed images of PROBE_SHAPE in ``fmt``."""
    x = torch.linspace(-1, 1, PROBE_SHAPE[0] * PROBE_SHAPE[2] * PROBE_SHAPE[3], device=device)
    return x.view(PROBE_SHAPE).contiguous(memory_format=fmt)


def _step(model: nn.Module, device: torch.device, channels_last: bool, bf16: bool) -> None:
    """One forward and backward pass of a copy of ``model`` as ``train_step`` runs it; raises
    what the model raises."""
    net = copy.deepcopy(model).train()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(memory_format=fmt)
    x = _probe_input(device, fmt)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        out = net(x)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"the model returned {type(out).__name__}")
    out.float().sum().backward()


def _reason(exc: BaseException, path: str | None) -> str:
    detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    detail = detail.split(" (at least one dimension")[0]   # PyTorch's view message, shortened
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if path and f.filename == path]
    where = f" at {Path(frames[-1].filename).name}, line {frames[-1].lineno}" if frames else ""
    return f"{detail[:120]}{where}"


def choose(model: nn.Module, device: torch.device, channels_last: bool, bf16: bool = False,
           path: str | None = None) -> Layout:
    """The layout ``model`` trains in when the recipe asks for ``channels_last``: that one
    where one training step of the model runs in it, else the default layout where the step
    runs there, else (the model fails either way) the recipe's, for training to report the
    error. ``path``: the model's file, named in the note. ``model`` is not changed."""
    if not channels_last:
        return Layout(False)
    try:
        with _rng_kept(device):
            _step(model, device, True, bf16)
        return Layout(True)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - anything the model raises
        failed = exc
    try:
        with _rng_kept(device):
            _step(model, device, False, bf16)
    except KeyboardInterrupt:
        raise
    except BaseException:  # noqa: BLE001 - the model's own error: training reports it
        return Layout(True)
    hint = ("; x.flatten(1) or x.reshape(...) instead of x.view(...) runs in both"
            if "view size is not compatible" in str(failed) else "")
    return Layout(False, f"layout: PyTorch's default, not channels_last: the model fails in channels_last "
                         f"({_reason(failed, path)}){hint}")


def called_sequentials(model: nn.Module, device: torch.device, channels_last: bool) -> set[str]:
    """The module paths of the plain ``nn.Sequential``s whose own ``forward`` runs when the model
    does (one forward pass of a batch of two, on a copy, every random generator kept): a
    ``forward`` that walks or indexes a Sequential's children itself (a skip connection between
    them) does not call it, and the backend must not move a ReLU into the BatchNorm before it
    there. Empty where the pass fails."""
    net = copy.deepcopy(model).train()
    seen: set[str] = set()
    for path, m in net.named_modules():
        if type(m) is nn.Sequential:
            m.register_forward_pre_hook(lambda mod, args, path=path: seen.add(path))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    try:
        with _rng_kept(device), torch.no_grad():
            net.to(memory_format=fmt)(_probe_input(device, fmt))
    except KeyboardInterrupt:
        raise
    except BaseException:  # noqa: BLE001 - the model's own error: no Sequential is known to run whole
        return set()
    return seen
