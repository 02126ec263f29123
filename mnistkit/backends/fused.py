"""The ``fused`` backend's BatchNorm: every BatchNorm2d the kernel can train runs one C pass
forward and one backward (``kernel.py``), with the ReLU after it built in where an ``nn.ReLU``
directly follows it in an ``nn.Sequential``.

PyTorch's CPU BatchNorm for channels-last tensors vectorises over channels in groups of 16, and
tiny CNNs have 6 to 32 channels: BN and ReLU took a third of I3's training step. ``fuse`` swaps
each such BatchNorm, wherever it is in the model (a custom ``forward`` included), for a
``FusedBatchNorm`` (a ``BatchNorm2d`` with the same parameters and buffers); a BatchNorm followed
by an ``nn.ReLU`` in a plain ``nn.Sequential`` becomes a ``FusedBatchNormReLU`` and an
``nn.Identity`` takes the ReLU's place, so the state_dict keys do not change and a checkpoint
loads into the plain model. Layer by layer: a BatchNorm the kernel cannot train (not affine, no
running statistics, more than 64 channels) keeps PyTorch's ops, and so does one with a multiple
of 16 channels, where PyTorch's own kernel is vectorised and was faster (C=16: 4.6 vs 5.6 ms
forward and backward of [256, 16, 28, 28]); the other layers of the model still take the kernel.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from mnistkit.backends import kernel

__all__ = ["FusedBatchNorm", "FusedBatchNormReLU", "fuse", "why_not", "check", "reference", "self_test"]


class _BNReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, bn: nn.BatchNorm2d,
                relu: bool) -> torch.Tensor:
        n, c, h, w = x.shape
        count = n * h * w
        mean, var = torch.empty(c), torch.empty(c)
        kernel.stats(x, mean, var)
        invstd = (var + bn.eps).rsqrt_()
        weight32, bias32 = weight.detach().float().contiguous(), bias.detach().float().contiguous()
        scale = weight32 * invstd
        shift = bias32 - mean * scale
        y = torch.empty_like(x, memory_format=torch.channels_last)
        kernel.forward(x, y, scale, shift, relu)
        with torch.no_grad():   # as nn.BatchNorm2d: unbiased variance into the running estimate
            momentum = bn.momentum
            bn.running_mean.mul_(1 - momentum).add_(mean.to(bn.running_mean.dtype), alpha=momentum)
            bn.running_var.mul_(1 - momentum).add_((var * (count / (count - 1))).to(bn.running_var.dtype),
                                                   alpha=momentum)
            bn.num_batches_tracked.add_(1)
        ctx.save_for_backward(x, scale, shift, mean, invstd, weight32)
        ctx.relu = relu
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: torch.Tensor) -> tuple:
        x, scale, shift, mean, invstd, weight32 = ctx.saved_tensors
        c = x.shape[1]
        dy = dy.to(x.dtype).contiguous(memory_format=torch.channels_last)
        dx = torch.empty_like(x, memory_format=torch.channels_last)
        sum_g, sum_gx = torch.empty(c), torch.empty(c)
        kernel.backward(x, dy, dx, scale, shift, mean, invstd, weight32, sum_g, sum_gx, ctx.relu)
        return dx, sum_gx, sum_g, None, None


def _supported_input(x: torch.Tensor, bn: nn.BatchNorm2d) -> bool:
    return (x.device.type == "cpu" and x.dim() == 4 and x.dtype in (torch.float32, torch.bfloat16)
            and x.shape[1] == bn.num_features and 1 <= x.shape[1] <= kernel.MAX_CHANNELS
            and x.shape[0] * x.shape[2] * x.shape[3] > 1
            and x.is_contiguous(memory_format=torch.channels_last) and kernel.available())


class FusedBatchNorm(nn.BatchNorm2d):
    """``batch_norm(x)`` (``FusedBatchNormReLU``: ``relu(batch_norm(x))``): the kernel's pass in
    training on a supported input, PyTorch's ops otherwise (evaluation, another device or
    layout). Evaluation folds it into the convolution before it like any BatchNorm, and keeps
    its ReLU (``includes_relu``)."""

    includes_relu = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and _supported_input(x, self):
            return _BNReLU.apply(x, self.weight, self.bias, self, self.includes_relu)
        y = super().forward(x)
        return torch.relu(y) if self.includes_relu else y

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d) -> "FusedBatchNorm":
        """The same parameters and buffers (the same tensors, not copies) in the fused module."""
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        new.weight, new.bias = bn.weight, bn.bias
        new.running_mean, new.running_var, new.num_batches_tracked = (bn.running_mean, bn.running_var,
                                                                       bn.num_batches_tracked)
        return new.train(bn.training)


class FusedBatchNormReLU(FusedBatchNorm):
    includes_relu = True


def why_not(bn: nn.Module) -> str | None:
    """Why the kernel would not train this BatchNorm (None: it would)."""
    if type(bn) is not nn.BatchNorm2d:
        return f"a {type(bn).__name__}, not an nn.BatchNorm2d"
    if not (bn.affine and bn.track_running_stats and bn.momentum is not None):
        return "not affine, or without running statistics or momentum"
    if bn.num_features > kernel.MAX_CHANNELS:
        return f"more than {kernel.MAX_CHANNELS} channels"
    if bn.num_features % 16 == 0:
        return "a multiple of 16 channels, where PyTorch's own kernel is faster"
    return None


def fuse(model: nn.Module, called: set[str] | None = None, apply: bool = True) -> tuple[dict[str, bool], dict[str, str]]:
    """Swap every BatchNorm of ``model`` the kernel can train for a ``FusedBatchNorm``, in place:
    a ``FusedBatchNormReLU`` (and an ``nn.Identity`` for the ReLU) where, at every place the
    BatchNorm is registered, an ``nn.ReLU`` directly follows it in a plain ``nn.Sequential`` whose
    own forward runs (``called``: those Sequentials' module paths; None: every one). Returns the
    swapped (``apply=False``: swappable) layers by module path, True where the ReLU came in; and
    for every other BatchNorm why not."""
    places: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for path, parent in model.named_modules(remove_duplicate=False):
        for name, child in parent._modules.items():
            if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, FusedBatchNorm):
                places.setdefault(id(child), []).append((path, parent, name))

    def relu_follows(path: str, parent: nn.Module, name: str) -> bool:
        names = list(parent._modules)
        i = names.index(name)
        return (type(parent) is nn.Sequential and (called is None or path in called) and i + 1 < len(names)
                and type(parent._modules[names[i + 1]]) is nn.ReLU)

    fused: dict[str, bool] = {}
    left: dict[str, str] = {}
    for where in places.values():
        path, parent, name = where[0]
        bn = parent._modules[name]
        first = f"{path}.{name}" if path else name
        why = why_not(bn)
        if why:
            left[first] = why
            continue
        relu = all(relu_follows(*place) for place in where)
        fused[first] = relu
        if apply:
            new = (FusedBatchNormReLU if relu else FusedBatchNorm).from_batchnorm(bn)
            for _, parent, name in where:
                parent._modules[name] = new
                if relu:
                    names = list(parent._modules)
                    parent._modules[names[names.index(name) + 1]] = nn.Identity()
    return fused, left


# --------------------------------------------------------------------------- checking the kernel


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
    (y * grad.double()).sum().backward()
    m = x.numel() // x.shape[1]
    return (y.detach(), x.grad, w.grad, b.grad, mean.flatten().detach(), var.flatten().detach() * m / (m - 1),
            pre.detach())


def check(x: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
          relu: bool = True) -> dict[str, float]:
    """Run the kernel (``relu=False``: its pass without the ReLU) on ``x`` (channels_last) with
    upstream gradient ``grad``; the largest error
    of each result against ``reference``, relative to that result's largest magnitude, and
    "mask flips": where the kernel's ReLU and the float64 one disagree on a pre-activation
    farther from 0 than fp32 rounding explains (1e-4 of its largest magnitude). Where they
    disagree closer to 0 (a rounding, not an error) the reference follows the kernel's mask.
    A NaN anywhere is an error of infinity."""
    bn = nn.BatchNorm2d(x.shape[1], momentum=1.0).train()   # momentum 1: the running stats are the batch's
    with torch.no_grad():
        bn.weight.copy_(weight)
        bn.bias.copy_(bias)
    xi = x.detach().clone().requires_grad_(True)
    y = _BNReLU.apply(xi, bn.weight, bn.bias, bn, relu)
    (y * grad).sum().backward()
    got = (y, xi.grad, bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_var)
    names = ("output", "input grad", "weight grad", "bias grad", "running mean", "running var")
    mask = (y > 0).double() if relu else torch.ones(y.shape, dtype=torch.double)
    pre = reference(x, weight, bias, grad, bn.eps)[-1]
    flips = (mask != (pre > 0).double()) & (pre.abs() > 1e-4 * pre.abs().max()) if relu else torch.zeros(())
    errors = {n: ((g.double() - r).abs().max() / r.abs().max().clamp_min(1e-12)).nan_to_num(float("inf")).item()
              for n, g, r in zip(names, got, reference(x, weight, bias, grad, bn.eps, mask=mask))}
    return {**errors, "mask flips": float(flips.sum().item())}


def self_test() -> str | None:
    """The kernel against the float64 formula on small inputs of a few channel counts (with and
    without a partial last period), both precisions, with and without the ReLU; returns what
    differs, or None."""
    gen = torch.Generator().manual_seed(0)
    for c, dtype, tol, relu in ((10, torch.float32, 1e-4, True), (7, torch.float32, 1e-4, True),
                                (26, torch.bfloat16, 2e-2, True), (10, torch.float32, 1e-4, False),
                                (26, torch.bfloat16, 2e-2, False)):
        shape = (3, c, 5, 7)
        x = (torch.randn(shape, generator=gen) * 2 + 1).to(dtype).contiguous(memory_format=torch.channels_last)
        g = torch.randn(shape, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last)
        errors = check(x, g, torch.linspace(0.5, 1.5, c), torch.linspace(-0.2, 0.2, c), relu)
        worst = max(errors, key=errors.get)
        if not errors[worst] <= (0 if worst == "mask flips" else tol):
            return f"{worst} off by {errors[worst]:.1e} for {c} channels, {dtype}{'' if relu else ', without ReLU'}"
    return None
