"""How a model trains fast: the one seam between the plain PyTorch core and speed machinery.

The trainer calls ``prepare(model, backend, device, channels_last)`` once, before it builds the
optimizer; the rest of mnistkit never imports a backend's module. Backends:

- ``torch``: the model as it is: canonical PyTorch.
- ``fused``: BatchNorm2d -> ReLU pairs in ``nn.Sequential``s train with mnistkit's C kernel
  (CPU, channels_last; ``backends/fused.py``). Parameters, buffers and state_dict keys are
  unchanged, so checkpoints load into the plain model.
- ``auto``: ``fused`` on the CPU with channels_last where the kernel builds and passes its
  self-test, else ``torch``. (0.8's benchmark, unsharded, against the usual PyTorch loop: I1
  2.95x with the kernel, 2.41x without; I3 2.87x and 1.78x; on the validation split the
  kernel's accuracy did not differ from PyTorch's beyond noise.)

A run records the resolved backend, and its start says in one line what the backend did.

``choose_layout`` (``backends/layout.py``) decides, before that, whether the model trains
channels_last: where the recipe asks for it and the model runs in it (a ``view`` head does not);
the run records the layout it used.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mnistkit.backends.layout import choose as choose_layout

__all__ = ["BACKENDS", "Prepared", "resolve", "prepare", "choose_layout"]

BACKENDS = ("auto", "torch", "fused")


@dataclass(frozen=True)
class Prepared:
    model: nn.Module
    backend: str   # resolved: torch or fused
    note: str      # one line for the run's start: what was done and why


def _why_no_kernel(device: torch.device, channels_last: bool) -> str | None:
    if device.type != "cpu":
        return "it runs on the CPU only"
    if not channels_last:
        return "it needs channels_last"
    from mnistkit.backends import kernel

    return None if kernel.available() else kernel.status()


def resolve(backend: str, device: torch.device, channels_last: bool) -> tuple[str, str | None]:
    """(``torch`` or ``fused``, why ``auto`` did not pick the kernel). ``fused`` where the kernel
    cannot run is an error naming why."""
    from mnistkit.errors import UsageError

    if backend == "torch":
        return "torch", None
    why = _why_no_kernel(device, channels_last)
    if why is None:
        return "fused", None
    if backend == "fused":
        raise UsageError(f"backend 'fused' cannot be used here: {why}; use auto or torch", key="backend", detail=why)
    return "torch", why


def prepare(model: nn.Module, backend: str, device: torch.device, channels_last: bool,
            all_or_none: bool = False) -> Prepared:
    """Make ``model`` ready to train with ``backend`` (in place; call before building the
    optimizer); the model's parameters and state_dict keys stay as they are. ``all_or_none``
    (a model of the user's own): the kernel only where every BatchNorm of the model can take it."""
    resolved, why = resolve(backend, device, channels_last)
    if resolved == "torch":
        return Prepared(model, "torch", "backend torch: PyTorch's own ops" + (f" (the fused kernel: {why})" if why else ""))
    from mnistkit.backends.fused import fuse

    if all_or_none:
        _, left = fuse(model, apply=False)
        if left:
            reasons = f"{len(left)} cannot ({'; '.join(sorted(set(left.values())))}: {', '.join(sorted(left))})"
            if backend == "fused":
                from mnistkit.errors import UsageError

                raise UsageError(f"backend 'fused' trains a model of your own only when every BatchNorm can be "
                                 f"fused; {reasons}; use auto or torch", key="backend", detail=reasons)
            return Prepared(model, "torch", "backend torch: PyTorch's own ops (the fused kernel takes a model of "
                                            f"your own only when every BatchNorm can be fused; {reasons})")
    fused, left = fuse(model)
    total = fused + len(left)
    if fused == 0 and backend == "auto":   # the kernel would train nothing: record the plain backend
        why_none = "the model has no BatchNorm layer" if total == 0 else "no BatchNorm layer it can fuse"
        return Prepared(model, "torch", f"backend torch: PyTorch's own ops ({why_none} for the fused kernel)")
    if total == 0:
        return Prepared(model, "fused", "backend fused: the model has no BatchNorm layer, nothing to fuse")
    note = f"backend fused: {fused} of {total} BatchNorm layers train with the fused BN+ReLU kernel"
    if left:
        reasons = sorted(set(left.values()))
        note += f"; {len(left)} keep PyTorch's ({'; '.join(reasons)}: {', '.join(sorted(left))})"
    return Prepared(model, "fused", note)
