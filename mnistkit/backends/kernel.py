"""The C kernels behind the ``fused`` backend (``_kernels.c``): BatchNorm in training mode, alone
or with the ReLU after it, in one pass forward and one backward for channels-last tensors on the
CPU; and Dropout's mask from a counter-based generator, with its scaling.

It is compiled once per machine with the system's C compiler into the user's cache folder and
loaded with ctypes after a self-test against the float64 formula. Where there is no compiler,
the cache is not private to the user, or the self-test fails, ``available()`` is False and
``status()`` says why; nothing else in mnistkit needs it.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch

__all__ = ["available", "status", "library_path", "source_digest", "stats", "forward", "backward", "drop_forward", "drop_backward",
           "MAX_CHANNELS"]

_SOURCE = Path(__file__).with_name("_kernels.c")
_FLAGS = ["-O3", "-ffp-contract=off", "-fPIC", "-shared"]
MAX_CHANNELS = 64        # the kernel's period lcm(C, 16) must fit its buffers
_lib: Any = None
_reason: str | None = None   # why the kernel is not available (None: not tried yet, or it is)
_tried = False
_lock = threading.Lock()


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "mnistkit" / "kernel"   # its own folder, private (the data folder is its parent)


def _cpu_key() -> str:
    """What -march=native depends on: a library built on one CPU may not run on another."""
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = line
                    break
    except OSError:
        pass
    return platform.machine() + flags


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def source_digest() -> str:
    """The kernels' source, as a run records it: which code drew its masks and normalised its batches."""
    return "sha256:" + hashlib.sha256(_SOURCE.read_bytes()).hexdigest()[:16]


def library_path(source: bytes | None = None) -> Path:
    """Where this machine's build is cached: named by the source, the flags and the CPU's
    features, so that an edited kernel or another CPU gets its own build."""
    source = _SOURCE.read_bytes() if source is None else source
    key = hashlib.sha256(source + " ".join(_FLAGS).encode() + _cpu_key().encode()).hexdigest()[:16]
    return _cache_dir() / f"kernels-{key}.so"


def _private(path: Path) -> bool:
    """Owned by this user and writable by no one else (so nobody else could have planted it)."""
    st = path.lstat()
    return (not stat.S_ISLNK(st.st_mode) and st.st_uid == os.getuid()
            and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def _build(cc: str, target: Path) -> None:
    """Compile into a temporary file next to ``target``, then rename: never a half-written library."""
    if not target.parent.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(target.parent, 0o700)   # mkdir's mode is cut by the umask
    fd, tmp = tempfile.mkstemp(prefix=".kernels-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        for arch in (["-march=native"], []):   # some compilers do not know -march=native
            cmd = [cc, *_FLAGS, *arch, str(_SOURCE), "-o", tmp, "-lm"]
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            if result.returncode == 0:
                os.chmod(tmp, 0o600)
                os.replace(tmp, target)
                return
        raise RuntimeError((result.stderr.strip().splitlines() or ["the compiler failed"])[-1][:200])
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load() -> Any:
    """The library, built, loaded and self-tested on the first call (under a lock: one thread
    loads, the others wait); None where it is not available (``_reason`` says why).
    ``MNISTKIT_FUSED=0`` turns it off, read at every call."""
    global _tried
    if os.environ.get("MNISTKIT_FUSED", "1") == "0":
        return None
    if _tried:
        return _lib
    with _lock:
        if not _tried:
            _load_once()
            _tried = True
    return _lib


def _load_once() -> None:
    global _lib, _reason
    if sys.platform == "win32" or not hasattr(os, "getuid"):
        _reason = "not built on this platform"
        return
    cc = _compiler()
    if cc is None:
        _reason = "no C compiler (cc, gcc or clang) found"
        return
    try:
        target = library_path()
        if target.parent.exists() and not _private(target.parent):
            _reason = f"the cache folder {target.parent} is not private to this user (owner or permissions)"
            return
        if not target.exists():
            _build(cc, target)
        if not _private(target):
            _reason = f"{target} is not private to this user (owner or permissions); remove it to rebuild"
            return
        try:
            lib = ctypes.CDLL(str(target))
        except OSError:   # a damaged file of our own in the cache: build it again, once
            _build(cc, target)
            lib = ctypes.CDLL(str(target))
        vp, i32, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
        lib.bnr_stats.argtypes = [vp, i32, i64, i32, vp, vp]
        lib.bnr_forward.argtypes = [vp, vp, i32, i32, i64, i32, vp, vp]
        lib.bnr_backward.argtypes = [vp, vp, vp, i32, i32, i64, i32, vp, vp, vp, vp, vp, vp, vp]
        lib.drop_forward.argtypes = [vp, vp, vp, i32, i64, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_float]
        lib.drop_backward.argtypes = [vp, vp, vp, i32, i64, ctypes.c_float]
        for fn in (lib.bnr_stats, lib.bnr_forward, lib.bnr_backward, lib.drop_forward, lib.drop_backward):
            fn.restype = ctypes.c_int
    except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as exc:
        _reason = f"could not build the kernel: {str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__}"
        return
    from mnistkit.backends import dropout, fused   # the self-tests run the kernels through their autograd ops

    _lib = lib
    try:
        problem = fused.self_test() or dropout.self_test()
    except Exception as exc:  # noqa: BLE001 - whatever went wrong, the kernel is not used
        problem = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
    if problem:
        _lib, _reason = None, f"the compiled kernel failed its self-test ({problem})"


def available() -> bool:
    """Whether the kernel can be used on this machine (builds it on the first call)."""
    return _load() is not None


def status() -> str:
    """One line: ``available``, or why not."""
    if os.environ.get("MNISTKIT_FUSED", "1") == "0":
        return "turned off by MNISTKIT_FUSED=0"
    return "available" if available() else str(_reason)


def _call(fn: Any, *args: Any) -> None:
    rc = fn(*(a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args))
    if rc:
        raise RuntimeError(f"mnistkit's kernel {getattr(fn, '__name__', '')} failed ({rc})")


def stats(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> None:
    """Per-channel batch mean and biased variance of channels-last ``x`` into ``mean``, ``var``."""
    n, c, h, w = x.shape
    _call(_lib.bnr_stats, x, int(x.dtype == torch.bfloat16), n * h * w, c, mean, var)


def forward(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, relu: bool = True) -> None:
    """``y = relu(x * scale + shift)`` per channel (``relu=False``: without the ReLU)."""
    n, c, h, w = x.shape
    _call(_lib.bnr_forward, x, y, int(x.dtype == torch.bfloat16), int(relu), n * h * w, c, scale, shift)


def backward(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
             mean: torch.Tensor, invstd: torch.Tensor, weight: torch.Tensor, sum_g: torch.Tensor,
             sum_gx: torch.Tensor, relu: bool = True) -> None:
    """``dx`` from ``dy`` through relu(batch_norm(x)) (``relu=False``: batch_norm(x)); the sums
    that make the bias and weight gradients into ``sum_g`` and ``sum_gx``."""
    n, c, h, w = x.shape
    _call(_lib.bnr_backward, x, dy, dx, int(x.dtype == torch.bfloat16), int(relu), n * h * w, c, scale, shift, mean,
          invstd, weight, sum_g, sum_gx)


def drop_forward(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, seed: int, keep: int, scale: float) -> None:
    """Dropout: ``mask`` (uint8) 1 where the element's draw from ``seed`` is below ``keep``
    (of 2^32), ``y = x * mask * scale``; the three tensors dense, with the same strides."""
    _call(_lib.drop_forward, x, y, mask, int(x.dtype == torch.bfloat16), x.numel(), seed, keep, scale)


def drop_backward(dy: torch.Tensor, dx: torch.Tensor, mask: torch.Tensor, scale: float) -> None:
    """``dx = dy * mask * scale``."""
    _call(_lib.drop_backward, dy, dx, mask, int(dy.dtype == torch.bfloat16), dy.numel(), scale)
