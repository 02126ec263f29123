"""How a model trains fast: the one seam between the plain PyTorch core and speed machinery.

The trainer calls ``prepare(model, backend, device, channels_last)`` once, before it builds the
optimizer; the rest of mnistkit never imports a backend's module. Backends:

- ``torch``: the model as it is: canonical PyTorch.
- ``fused``: mnistkit's C kernels (CPU; ``_kernels.c``), layer by layer wherever a layer can
  take them: every ``nn.BatchNorm2d`` the kernel trains (channels_last; with the ReLU built in
  where an ``nn.ReLU`` follows it in an ``nn.Sequential``: ``fused.py``) and every
  ``nn.Dropout``, whose mask it draws (``dropout.py``). Parameters, buffers and state_dict keys
  are unchanged, so checkpoints load into the plain model.
- ``auto``: ``fused`` on the CPU where the kernels build and pass their self-test and the model
  has a layer they train, else ``torch``.

A run records the resolved backend, and its start says in one line what the backend did (which
layers, and why the others not). The kernels' Dropout masks are another random stream than
PyTorch's: a run trained with ``fused`` reproduces with ``fused``, and resumes with it.

``choose_layout`` (``backends/layout.py``) decides, before that, whether the model trains
channels_last: where the recipe asks for it and the model runs in it (a ``view`` head does not);
the run records the layout it used.
"""
from __future__ import annotations

from dataclasses import dataclass, field

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
    # what each layer a kernel trains computes with (module path -> "batchnorm+relu", "batchnorm"
    # or "dropout"): the run records it, as it records the resolved backend
    kernels: dict[str, str] = field(default_factory=dict)
    kernels_source: str | None = None   # the SHA-256 of the kernels' C source, where they train a layer


def resolve(backend: str, device: torch.device) -> tuple[str, str | None]:
    """(``torch`` or ``fused``, why ``auto`` could not pick the kernels). ``fused`` where the
    kernels cannot run is an error naming why."""
    from mnistkit.errors import UsageError

    if backend == "torch":
        return "torch", None
    if device.type != "cpu":
        why = "they run on the CPU only"
    else:
        from mnistkit.backends import kernel

        why = None if kernel.available() else kernel.status()
    if why is None:
        return "fused", None
    if backend == "fused":
        raise UsageError(f"backend 'fused' cannot be used here: {why}; use auto or torch", key="backend", detail=why)
    return "torch", why


def _listed(reasons: dict[str, str]) -> str:
    """``reason: layer, layer; reason: layer`` for the layers left to PyTorch."""
    by_reason: dict[str, list[str]] = {}
    for layer, why in reasons.items():
        by_reason.setdefault(why, []).append(layer)
    return "; ".join(f"{why}: {', '.join(sorted(layers))}" for why, layers in sorted(by_reason.items()))


def prepare(model: nn.Module, backend: str, device: torch.device, channels_last: bool) -> Prepared:
    """Make ``model`` ready to train with ``backend`` (in place; call before building the
    optimizer); the model's parameters and state_dict keys stay as they are."""
    resolved, why = resolve(backend, device)
    if resolved == "torch":
        return Prepared(model, "torch", "backend torch: PyTorch's own ops" + (f" (mnistkit's kernels: {why})" if why else ""))
    from mnistkit.backends import dropout
    from mnistkit.backends.fused import fuse
    from mnistkit.backends.layout import called_sequentials

    if channels_last:
        bns, left = fuse(model, called_sequentials(model, device, channels_last))
    else:
        bns, left = {}, {path: "the model trains in PyTorch's default layout, not channels_last"
                         for path, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    drops = dropout.swap(model)
    if not bns and not drops and backend == "auto":   # the kernels would train nothing: record the plain backend
        return Prepared(model, "torch", "backend torch: PyTorch's own ops (no BatchNorm or Dropout layer mnistkit's "
                                        "kernels train" + (f"; {_listed(left)}" if left else "") + ")")
    parts = []
    if bns or left:
        with_relu = sum(bns.values())
        parts.append(f"{len(bns)} of {len(bns) + len(left)} BatchNorm layers"
                     + (f" ({with_relu} with the ReLU after them)" if with_relu else ""))
    if drops:
        parts.append(f"{len(drops)} Dropout layer{'s' if len(drops) > 1 else ''} (their own masks)")
    note = "backend fused: mnistkit's kernels train " + (" and ".join(parts) if parts else "no layer of this model")
    if left:
        note += f"; {len(left)} BatchNorm keep{'s' if len(left) == 1 else ''} PyTorch's ({_listed(left)})"
    kernels = {**{path: "batchnorm+relu" if relu else "batchnorm" for path, relu in bns.items()},
               **{path: "dropout" for path in drops}}
    from mnistkit.backends.kernel import source_digest

    return Prepared(model, "fused", note, dict(sorted(kernels.items())), source_digest() if kernels else None)
