"""BatchNorm + ReLU fused into one pass forward and one backward, for training on the CPU.

PyTorch's CPU BatchNorm for channels-last tensors vectorises over channels in groups of 16, and
mnistkit's models have 6 to 32 channels: BN and ReLU took a third of I3's training step. The C
kernel in ``_bnrelu.c`` walks the tensor in periods of lcm(C, 16) values instead (see there).
It is compiled once per machine with the system's C compiler into the user's cache folder and
loaded with ctypes; where there is no compiler, or the compiled library fails its self-test
against PyTorch, training uses PyTorch's BatchNorm and ReLU, and the run records which one it
used (the recipe's ``bn_relu``, resolved from ``auto`` to ``fused`` or ``torch``).

Only the training step uses it: evaluation folds BN into the convolutions (evaluation.py), and
a model's parameters, buffers and state_dict are the same whichever kernel trained it.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["available", "status", "supports", "bn_relu", "use_fused", "ConvBNReLU", "Rendezvous", "shard"]

_SOURCE = Path(__file__).with_name("_bnrelu.c")
_FLAGS = ["-O3", "-ffp-contract=off", "-fPIC", "-shared"]
_MAX_CHANNELS = 64       # the kernel's period lcm(C, 16) must fit its buffers
_lib: Any = None
_reason: str | None = None   # why the kernel is not available (None: not tried yet, or it is)
_tried = False
_loading: int | None = None   # the thread loading the kernel right now (its self-test calls back in)
_load_lock = threading.Lock()


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "mnistkit"


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


def library_path(source: bytes | None = None) -> Path:
    """Where this machine's build of the kernel is cached: named by the source, the flags and
    the CPU's features, so that an edited kernel or another CPU gets its own build."""
    source = _SOURCE.read_bytes() if source is None else source
    key = hashlib.sha256(source + " ".join(_FLAGS).encode() + _cpu_key().encode()).hexdigest()[:16]
    return _cache_dir() / f"bnrelu-{key}.so"


def _build(source: bytes, cc: str, target: Path) -> None:
    """Compile into a temporary file next to ``target``, then rename: never a half-written library."""
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=".bnrelu-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        for arch in (["-march=native"], []):   # some compilers do not know -march=native
            cmd = [cc, *_FLAGS, *arch, str(_SOURCE), "-o", tmp, "-lm"]
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            if result.returncode == 0:
                os.replace(tmp, target)
                return
        raise RuntimeError((result.stderr.strip().splitlines() or ["the compiler failed"])[-1][:200])
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load() -> Any:
    """The kernel's library, built, loaded and self-tested on the first call; None where it is not
    available (``_reason`` says why). Safe from several threads: the first call loads, the others
    wait for its result (the shards of a training step may be the first to ask)."""
    global _loading, _tried
    if _tried and (_loading is None or _loading == threading.get_ident()):
        return _lib   # loaded or given up; or this thread's own self-test, mid-load
    with _load_lock:
        if _tried:
            return _lib
        _loading = threading.get_ident()   # before _tried: another thread never sees a half-made load
        _tried = True
        try:
            return _load_once()
        finally:
            _loading = None


def _load_once() -> Any:
    global _lib, _reason
    if os.environ.get("MNISTKIT_FUSED", "1") == "0":
        _reason = "turned off by MNISTKIT_FUSED=0"
        return None
    if sys.platform == "win32":
        _reason = "not built on Windows"
        return None
    try:
        source = _SOURCE.read_bytes()
        cc = _compiler()
        if cc is None:
            _reason = "no C compiler (cc, gcc or clang) found"
            return None
        target = library_path(source)
        if not target.is_file():
            _build(source, cc, target)
        try:
            lib = ctypes.CDLL(str(target))
        except OSError:   # a damaged or foreign file in the cache: build it again, once
            _build(source, cc, target)
            lib = ctypes.CDLL(str(target))
        vp, i32, i64, fp = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_void_p
        lib.bnr_stats.argtypes = [vp, i32, i64, i32, fp, fp]
        lib.bnr_forward.argtypes = [vp, vp, i32, i64, i32, fp, fp]
        lib.bnr_backward.argtypes = [vp, vp, vp, i32, i64, i32, fp, fp, fp, fp, fp, fp, fp]
        lib.bnr_sums.argtypes = [vp, i32, i64, i32, fp, fp, fp]
        lib.bnr_backward_sums.argtypes = [vp, vp, i32, i64, i32, fp, fp, fp, fp, fp, fp]
        lib.bnr_backward_apply.argtypes = [vp, vp, vp, i32, i64, i32, fp, fp, fp, fp, fp, fp, fp]
        for fn in (lib.bnr_stats, lib.bnr_forward, lib.bnr_backward, lib.bnr_sums, lib.bnr_backward_sums,
                   lib.bnr_backward_apply):
            fn.restype = ctypes.c_int
        _lib = lib
        problem = _self_test()
        if problem:
            _lib, _reason = None, f"the compiled kernel failed its self-test ({problem})"
    except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as exc:
        _lib, _reason = None, f"could not build the kernel: {str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__}"
    return _lib


def available() -> bool:
    """Whether the fused kernel can be used on this machine (builds it on first call)."""
    return _load() is not None


def status() -> str:
    """One line for reports: what trains BN+ReLU here and, if it is PyTorch, why."""
    return "fused C kernel" if available() else f"PyTorch ({_reason})"


def _can_fuse(x: torch.Tensor, bn: nn.Module) -> bool:
    return (isinstance(bn, nn.BatchNorm2d) and bn.training and bn.affine and bn.track_running_stats
            and bn.momentum is not None and bn.running_mean is not None and x.device.type == "cpu" and x.dim() == 4
            and x.dtype in (torch.float32, torch.bfloat16) and x.shape[1] == bn.num_features
            and 1 <= x.shape[1] <= _MAX_CHANNELS and x.numel() > 0
            and x.is_contiguous(memory_format=torch.channels_last) and _load() is not None)


def supports(x: torch.Tensor, bn: nn.Module) -> bool:
    """Whether this input and BatchNorm can take the fused path (else PyTorch's is used)."""
    return (_can_fuse(x, bn) and (x.shape[1] % 16 != 0 or ALL_CHANNELS)
            and x.shape[0] * x.shape[2] * x.shape[3] > 1)


# PyTorch's own channels-last BatchNorm is vectorised (and multi-threaded) where C is a multiple
# of 16, and there it was faster than this single-threaded kernel (C=16: 4.6 vs 5.6 ms forward
# and backward of [256, 16, 28, 28]); such layers keep PyTorch's (ALL_CHANNELS: measure both)
ALL_CHANNELS = False


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def _normalize(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, bn: nn.BatchNorm2d,
               mean: torch.Tensor, var: torch.Tensor, count: int, update: bool) -> torch.Tensor:
    """The forward pass after the statistics: y = relu(x * scale + shift) with the batch's
    ``mean`` and biased ``var`` over ``count`` values per channel; the running statistics
    moved (when ``update``); what the backward pass needs saved on ``ctx``."""
    invstd = (var + bn.eps).rsqrt_()
    weight32, bias32 = weight.detach().float().contiguous(), bias.detach().float().contiguous()
    scale = weight32 * invstd
    shift = bias32 - mean * scale
    y = torch.empty_like(x, memory_format=torch.channels_last)
    n, c, h, w = x.shape
    rc = _lib.bnr_forward(_ptr(x), _ptr(y), int(x.dtype == torch.bfloat16), n * h * w, c, _ptr(scale), _ptr(shift))
    if rc:
        raise RuntimeError(f"fused BatchNorm failed ({rc})")
    if update:
        with torch.no_grad():
            momentum = bn.momentum
            bn.running_mean.mul_(1 - momentum).add_(mean.to(bn.running_mean.dtype), alpha=momentum)
            bn.running_var.mul_(1 - momentum).add_((var * (count / (count - 1))).to(bn.running_var.dtype),
                                                   alpha=momentum)
            bn.num_batches_tracked.add_(1)
    ctx.save_for_backward(x, scale, shift, mean, invstd, weight32)
    return y


class _BNReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
        n, c, h, w = x.shape
        m = n * h * w
        bf = int(x.dtype == torch.bfloat16)
        mean, var = torch.empty(c), torch.empty(c)
        rc = _lib.bnr_stats(_ptr(x), bf, m, c, _ptr(mean), _ptr(var))
        if rc:
            raise RuntimeError(f"fused BatchNorm failed ({rc})")
        return _normalize(ctx, x, weight, bias, bn, mean, var, m, update=True)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple:
        x, scale, shift, mean, invstd, weight32 = ctx.saved_tensors
        n, c, h, w = x.shape
        dy = dy.to(x.dtype).contiguous(memory_format=torch.channels_last)
        dx = torch.empty_like(x, memory_format=torch.channels_last)
        sum_g, sum_gx = torch.empty(c), torch.empty(c)
        rc = _lib.bnr_backward(_ptr(x), _ptr(dy), _ptr(dx), int(x.dtype == torch.bfloat16), n * h * w, c,
                               _ptr(scale), _ptr(shift), _ptr(mean), _ptr(invstd), _ptr(weight32),
                               _ptr(sum_g), _ptr(sum_gx))
        if rc:
            raise RuntimeError(f"fused BatchNorm backward failed ({rc})")
        return dx, sum_gx, sum_g, None


class Rendezvous:
    """Where the shards of one training step (one thread each) meet to add up their BatchNorm
    sums: ``exchange`` hands in this shard's value and returns every shard's, in shard order.

    Two slot sets alternate: a shard can write exchange k+2 only after every shard has reached
    exchange k+1, that is after each has read exchange k. An error in one shard must ``abort``,
    so that the others stop waiting (they get ``threading.BrokenBarrierError``)."""

    def __init__(self, parties: int) -> None:
        self.parties = parties
        self._barrier = threading.Barrier(parties)
        self._slots: list[list[Any]] = [[None] * parties, [None] * parties]
        self._count = [0] * parties

    def reset(self) -> None:
        """Before a step: every shard starts from exchange 0 (between steps, none is waiting)."""
        self._count = [0] * self.parties

    def exchange(self, shard: int, value: Any) -> list[Any]:
        if self.parties == 1:
            return [value]
        k = self._count[shard] & 1
        self._count[shard] += 1
        self._slots[k][shard] = value
        self._barrier.wait()
        return list(self._slots[k])

    def abort(self) -> None:
        self._barrier.abort()


# the shard this thread is running in a sharded training step: ``.sync`` (a Rendezvous) and
# ``.index``; unset outside one (mnistkit.parallel sets and clears them)
shard = threading.local()


class _SyncBNReLU(torch.autograd.Function):
    """relu(batch_norm(x)) over a batch split into shards, one per thread: each shard computes its
    sums, the shards add them up (``Rendezvous``) in float64 and in shard order, and each
    normalises its own rows with the whole batch's statistics, forward and backward; shard 0
    updates the running statistics. The same BatchNorm as one thread over the whole batch, up to
    rounding."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, bn: nn.BatchNorm2d,
                sync: Rendezvous, index: int) -> torch.Tensor:
        n, c, h, w = x.shape
        m = n * h * w
        bf = int(x.dtype == torch.bfloat16)
        first, s1, s2 = torch.empty(c), torch.empty(c, dtype=torch.float64), torch.empty(c, dtype=torch.float64)
        rc = _lib.bnr_sums(_ptr(x), bf, m, c, _ptr(first), _ptr(s1), _ptr(s2))
        if rc:
            raise RuntimeError(f"fused BatchNorm failed ({rc})")
        parts = sync.exchange(index, (m, first, s1, s2))
        total = sum(p[0] for p in parts)
        if total < 2:
            raise ValueError(f"BatchNorm needs more than 1 value per channel in training, got {total}")
        means = [p[2] / p[0] + p[1].double() for p in parts]
        mean = sum(p[0] * mu for p, mu in zip(parts, means)) / total
        m2 = sum(p[3] - p[2] * p[2] / p[0] + p[0] * (mu - mean) ** 2 for p, mu in zip(parts, means))
        ctx.sync, ctx.index, ctx.total = sync, index, total
        # the batch's statistics; shard 0 alone moves the running statistics
        return _normalize(ctx, x, weight, bias, bn, mean.float(), (m2 / total).clamp_min_(0).float(), total,
                          update=index == 0)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple:
        x, scale, shift, mean, invstd, weight32 = ctx.saved_tensors
        n, c, h, w = x.shape
        bf = int(x.dtype == torch.bfloat16)
        dy = dy.to(x.dtype).contiguous(memory_format=torch.channels_last)
        a, q = torch.empty(c, dtype=torch.float64), torch.empty(c, dtype=torch.float64)
        rc = _lib.bnr_backward_sums(_ptr(x), _ptr(dy), bf, n * h * w, c, _ptr(scale), _ptr(shift), _ptr(mean),
                                    _ptr(invstd), _ptr(a), _ptr(q))
        if rc:
            raise RuntimeError(f"fused BatchNorm backward failed ({rc})")
        parts = ctx.sync.exchange(ctx.index, (a, q))
        mg = (sum(p[0] for p in parts) / ctx.total).float()
        mgx = (sum(p[1] for p in parts) / ctx.total).float()
        k1 = weight32 * invstd
        dx = torch.empty_like(x, memory_format=torch.channels_last)
        rc = _lib.bnr_backward_apply(_ptr(x), _ptr(dy), _ptr(dx), bf, n * h * w, c, _ptr(scale), _ptr(shift),
                                     _ptr(mean), _ptr(invstd), _ptr(k1), _ptr(mg), _ptr(mgx))
        if rc:
            raise RuntimeError(f"fused BatchNorm backward failed ({rc})")
        return dx, q.float(), a.float(), None, None, None


def bn_relu(x: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    """relu(bn(x)) in training mode, fused where ``supports(x, bn)``, else PyTorch's two ops."""
    if supports(x, bn):
        return _BNReLU.apply(x, bn.weight, bn.bias, bn)
    return torch.relu(bn(x))


class ConvBNReLU(nn.Sequential):
    """conv -> bn -> relu, the models' building block: an ``nn.Sequential`` (same names, same
    state_dict, same hooks) whose training forward fuses bn and relu once ``fused`` is set
    (by ``use_fused``; off by default, so that a model built by hand behaves as PyTorch's).
    Inside a sharded training step (``mnistkit.parallel``) it always takes the kernel's
    synchronised path: BatchNorm's statistics are the whole batch's, not the shard's."""

    fused = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = getattr(self, "bn", None)
        if len(self) == 3 and isinstance(bn, nn.BatchNorm2d) and bn.training:
            sync = getattr(shard, "sync", None)
            if sync is not None:
                h = self.conv(x)
                if not _can_fuse(h, bn):
                    raise RuntimeError("a sharded training step needs the fused kernel for every BatchNorm "
                                       f"(channels_last, at most {_MAX_CHANNELS} channels); train with shards 1")
                return _SyncBNReLU.apply(h, bn.weight, bn.bias, bn, sync, shard.index)
            if self.fused:
                h = self.conv(x)
                if supports(h, bn):
                    return _BNReLU.apply(h, bn.weight, bn.bias, bn)
                return self.relu(bn(h))
        return super().forward(x)


def use_fused(model: nn.Module, on: bool = True) -> int:
    """Set every ConvBNReLU block of ``model`` to train with the fused kernel (or not); returns
    how many blocks there are. Where the kernel is not available, they use PyTorch's ops."""
    blocks = [m for m in model.modules() if isinstance(m, ConvBNReLU)]
    for m in blocks:
        m.fused = on
    return len(blocks)


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, grad: torch.Tensor,
              eps: float = 1e-5, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """relu(batch_norm(x)) and its gradients in float64, from the formula: (output, input grad,
    weight grad, bias grad, batch mean, unbiased batch variance, pre-activation). What the kernel
    is checked against; ``mask`` (where the ReLU passes) replaces the ReLU's own when given."""
    x = x.detach().double().requires_grad_(True)
    w = weight.detach().double().requires_grad_(True)
    b = bias.detach().double().requires_grad_(True)
    mean = x.mean((0, 2, 3), keepdim=True)
    var = x.var((0, 2, 3), unbiased=False, keepdim=True)
    pre = (x - mean) / torch.sqrt(var + eps) * w.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)
    y = torch.relu(pre) if mask is None else pre * mask
    (y * grad.double()).sum().backward()  # a scalar's backward: backward(grad) costs a 0.5 s import
    m = x.numel() // x.shape[1]
    return (y.detach(), x.grad, w.grad, b.grad, mean.flatten().detach(), var.flatten().detach() * m / (m - 1),
            pre.detach())


def check(x: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> dict[str, float]:
    """Run the kernel on ``x`` (channels_last) with upstream gradient ``grad``; the largest error
    of each result against ``reference``, relative to that result's largest magnitude, and
    "mask flips": where the kernel's ReLU and the float64 one disagree on a pre-activation
    farther from 0 than fp32 rounding explains (1e-4 of its largest magnitude). Where they
    disagree closer to 0 (a rounding, not an error) the reference follows the kernel's mask."""
    c = x.shape[1]
    bn = nn.BatchNorm2d(c, momentum=1.0).train()   # momentum 1: the running stats are the batch's
    with torch.no_grad():
        bn.weight.copy_(weight)
        bn.bias.copy_(bias)
    xi = x.detach().clone().requires_grad_(True)
    y = _BNReLU.apply(xi, bn.weight, bn.bias, bn)
    (y * grad).sum().backward()  # the gradient reaching y is exactly ``grad``
    got = (y, xi.grad, bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_var)
    names = ("output", "input grad", "weight grad", "bias grad", "running mean", "running var")
    mask = (y > 0).double()
    pre = reference(x, weight, bias, grad, bn.eps)[-1]
    flips = (mask != (pre > 0).double()) & (pre.abs() > 1e-4 * pre.abs().max())
    errors = {n: ((g.double() - r).abs().max() / r.abs().max().clamp_min(1e-12)).item()
              for n, g, r in zip(names, got, reference(x, weight, bias, grad, bn.eps, mask=mask))}
    return {**errors, "mask flips": float(flips.sum().item())}


def _self_test() -> str | None:
    """The kernel against the float64 formula on small inputs of a few channel counts (with and
    without a partial last period), both precisions; returns what differs, or None."""
    gen = torch.Generator().manual_seed(0)
    for c, dtype, tol in ((10, torch.float32, 1e-4), (7, torch.float32, 1e-4), (26, torch.bfloat16, 2e-2)):
        shape = (3, c, 5, 7)
        x = (torch.randn(shape, generator=gen) * 2 + 1).to(dtype).contiguous(memory_format=torch.channels_last)
        g = torch.randn(shape, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last)
        errors = check(x, g, torch.linspace(0.5, 1.5, c), torch.linspace(-0.2, 0.2, c))
        worst = max(errors, key=errors.get)
        if not errors[worst] <= tol:
            return f"{worst} off by {errors[worst]:.1e} for {c} channels, {dtype}"
    return None
