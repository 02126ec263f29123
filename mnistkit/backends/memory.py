"""Kept memory: glibc's malloc asked to keep freed memory for reuse during training. A process
setting, so only the CLI asks for it (``mnistkit train`` and ``sweep`` and their workers); the
library never changes the allocator of a process it is imported into.
"""
from __future__ import annotations

import ctypes
import os
import platform

__all__ = ["keep_freed_memory", "release_memory"]

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
