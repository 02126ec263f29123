"""Where and how a run computes: the device, the precision of the training step, seeding, and
the versions recorded with every run."""

from __future__ import annotations

import ctypes
import os
import platform
import random

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


def resolve_bn_relu(choice: str, device: torch.device, channels_last: bool) -> str:
    """``auto`` -> ``fused`` where mnistkit's BN+ReLU kernel runs (CPU, channels_last, a C compiler
    that built it and a passed self-test), else ``torch``; ``fused`` where it cannot run is an error."""
    if choice == "torch":
        return "torch"
    from mnistkit import fused

    why = ("it runs on the CPU only" if device.type != "cpu" else
           "it needs channels_last" if not channels_last else
           None if fused.available() else fused.status().removeprefix("PyTorch (").removesuffix(")"))
    if why is None:
        return "fused"
    if choice == "fused":
        raise UsageError(f"bn_relu 'fused' cannot be used here: {why}; use auto or torch", key="bn_relu")
    return "torch"


def why_not_sharded(device: torch.device, channels_last: bool) -> str | None:
    """Why a sharded step cannot run here (None: it can)."""
    from mnistkit import fused

    return ("it runs on the CPU only" if device.type != "cpu" else
            "it needs channels_last" if not channels_last else
            None if fused.available() else
            f"it needs the fused BatchNorm kernel, which is not available here: "
            f"{fused.status().removeprefix('PyTorch (').removesuffix(')')}")


def resolve_shards(shards: int | str, device: torch.device, channels_last: bool) -> int:
    """The number of shards a training step is split into (``mnistkit.parallel``). ``auto`` -> 2
    where that runs and the process has 2 or more threads, else 1. A number above 1 where it
    cannot run is one line saying why, and that shards 1 works: a sharded step runs on the CPU,
    in channels_last, with the fused kernel training every BatchNorm."""
    if shards == 1:
        return 1
    why = why_not_sharded(device, channels_last)
    if shards == "auto":
        return 2 if why is None and torch.get_num_threads() >= 2 else 1
    if why is not None:
        raise UsageError(f"shards {shards} cannot be used here: {why}; use shards 1", key="shards")
    return int(shards)


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


# glibc's malloc gives a freed block of 128 KiB or more back to the system (munmap, or trimming
# the heap), so every training step's activations (a few MiB each) came back as fresh pages: up
# to 6,200 page faults and 15 ms of system time per step of I1 or I3 on 2 cores. Keeping freed
# memory for reuse (what jemalloc and tcmalloc do, which PyTorch's CPU tuning guide suggests
# preloading) removes them. The blocks a process holds stay at its peak until ``release_memory``.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_MAX = 32 * 1024 * 1024        # glibc's largest mmap threshold on 64-bit systems
_TRIM_NEVER = 1 << 30
_ALLOCATOR_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")
_kept = None


def keep_freed_memory() -> str:
    """Ask glibc's malloc to keep freed memory for reuse instead of returning it to the system
    (once per process; what training does first). Returns what was done, for reports: not on
    glibc, or where the user set glibc's malloc variables or MNISTKIT_KEEP_MEMORY=0, nothing."""
    global _kept
    if _kept is None:
        _kept = _keep_freed_memory()
    return _kept


def _keep_freed_memory() -> str:
    if os.environ.get("MNISTKIT_KEEP_MEMORY", "1") == "0":
        return "off (MNISTKIT_KEEP_MEMORY=0)"
    given = [name for name in _ALLOCATOR_ENV if name in os.environ]
    if given:
        return f"off (the allocator is set by {given[0]})"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "off (not glibc)"
    try:
        libc = ctypes.CDLL(None)
        ok = libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_MAX) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_NEVER) == 1
    except (OSError, AttributeError):
        ok = False
    return "on" if ok else "off (mallopt refused)"


def release_memory() -> None:
    """Give the freed memory that ``keep_freed_memory`` kept back to the system (after training)."""
    if _kept == "on":
        try:
            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):
            pass
