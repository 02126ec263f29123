"""Where and how a run computes: the device, the precision of the training step, seeding, and
the versions recorded with every run."""

from __future__ import annotations

import contextlib
import platform
import random
from typing import Iterator

import torch

from mnistkit import __version__
from mnistkit.errors import UsageError

DEVICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; asking for an absent device is an error."""
    name = str(name or "auto").lower()
    mps = getattr(torch.backends, "mps", None)
    has_mps = bool(mps and mps.is_available())
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit()):
        if not torch.cuda.is_available():
            raise UsageError(f"device {name!r} was asked for but no CUDA GPU is available; use 'cpu' or 'auto'",
                             key="device")
        return torch.device(name)
    if name == "mps":
        if not has_mps:
            raise UsageError("device 'mps' was asked for but Apple's MPS is not available; use 'cpu' or 'auto'",
                             key="device")
        return torch.device("mps")
    raise UsageError(f"unknown device {name!r}; choose one of: {', '.join(DEVICES)} (or cuda:N)", key="device")


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` where the device computes bf16 natively, else ``fp32``."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        try:
            return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
        except (AttributeError, RuntimeError):
            return "fp32"
    return "fp32"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # numpy is optional
        pass
    torch.manual_seed(seed)


def versions() -> dict[str, str]:
    """Recorded with every run. torchvision's version comes from its installed metadata:
    importing torchvision only to read it cost every training process about a second."""
    from importlib import metadata

    try:
        vision = metadata.version("torchvision")
    except metadata.PackageNotFoundError:
        vision = "not installed"
    return {"mnistkit": __version__, "torch": str(torch.__version__), "torchvision": vision,
            "python": platform.python_version()}


@contextlib.contextmanager
def threads(n: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` for the block (when given), then put back."""
    before = torch.get_num_threads()
    if n is not None and n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
