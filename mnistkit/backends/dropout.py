"""Dropout with mnistkit's mask kernel: ``nn.Dropout`` with the same ``p`` and no parameters,
whose training-mode mask is drawn by ``_kernels.c`` (SplitMix64 over a counter, 0.65 ms for the
2 million values of a [256, 10, 28, 28] activation, 0.3 ms back) instead of PyTorch's ``bernoulli_`` (8-12 ms
on one thread off Intel CPUs: a third of a student model's step, with Dropout after every layer).

Each call takes its seed from torch's default generator, so ``torch.manual_seed`` (and a resumed
run's saved generator state) reproduces every mask; the masks are another random stream than
PyTorch's, so a run records that it used them (the backend ``fused``). An element is kept with
probability ``keep / 2^32`` (``keep`` = round((1 - p) 2^32): 1 - p within 2^-33 for p from 2^-32
to 1 - 2^-32) and scaled by
1 / (1 - p) in float32 (PyTorch scales a bfloat16 activation by 1 / (1 - p) rounded to bfloat16).
Evaluation, another device, a dtype other than float32 and bfloat16, or an activation that is
not dense runs PyTorch's own Dropout. ``inplace=True`` is not honoured (the output is a new
tensor), and a forward hook on the swapped ``nn.Dropout`` does not come along.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from mnistkit.backends import kernel

__all__ = ["KernelDropout", "swap", "self_test"]


def _dense(x: torch.Tensor) -> bool:
    return x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, p: float, seed: int | None = None) -> torch.Tensor:
        if seed is None:
            seed = int(torch.empty((), dtype=torch.int64).random_())   # from torch's default generator
        keep = min(round((1 - p) * 2 ** 32), 2 ** 32 - 1)
        y = torch.empty_like(x)
        mask = torch.empty_like(x, dtype=torch.uint8)
        kernel.drop_forward(x, y, mask, seed, keep, 1 / (1 - p))
        ctx.save_for_backward(mask)
        ctx.scale = 1 / (1 - p)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: torch.Tensor) -> tuple:
        (mask,) = ctx.saved_tensors
        if dy.dtype not in (torch.float32, torch.bfloat16) or dy.stride() != mask.stride():
            dy = torch.empty_like(mask, dtype=dy.dtype if dy.dtype == torch.bfloat16 else torch.float32).copy_(dy)
        dx = torch.empty_like(dy)
        kernel.drop_backward(dy, dx, mask, ctx.scale)
        return dx, None, None


class KernelDropout(nn.Dropout):
    """``nn.Dropout`` whose training-mode mask comes from mnistkit's kernel (see the module)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.training and 0 < self.p < 1 and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
                and x.numel() > 0 and _dense(x) and kernel.available()):
            return _Dropout.apply(x, self.p)
        return super().forward(x)

    @classmethod
    def from_dropout(cls, drop: nn.Dropout) -> "KernelDropout":
        return cls(drop.p, drop.inplace).train(drop.training)


def swap(model: nn.Module) -> list[str]:
    """Swap every ``nn.Dropout`` of ``model`` (by exact type: not Dropout2d or a subclass) for a
    ``KernelDropout``, in place; returns their module paths."""
    swapped: dict[int, KernelDropout] = {}
    paths = []
    for path, parent in list(model.named_modules(remove_duplicate=False)):
        for name, child in list(parent._modules.items()):
            if type(child) is nn.Dropout:
                if id(child) not in swapped:
                    swapped[id(child)] = KernelDropout.from_dropout(child)
                    paths.append(f"{path}.{name}" if path else name)
                parent._modules[name] = swapped[id(child)]
    return paths


def self_test() -> str | None:
    """The kernel's Dropout on a small input: every output is 0 or the input times 1 / (1 - p),
    about 1 - p of them kept, the gradient masked and scaled alike, and the same mask again
    from the same seed; returns what differs, or None. Draws nothing from torch's generators."""
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.arange(1, 4001, dtype=torch.float32) / 100).to(dtype).view(4, 10, 10, 10)
        xi = x.clone().requires_grad_(True)
        y = _Dropout.apply(xi, 0.25, 12345)
        y.backward(torch.ones_like(y))
        kept, scale = y != 0, torch.tensor(1 / 0.75, dtype=torch.float32)
        if not torch.equal(y[kept], (x[kept].float() * scale).to(dtype)):
            return f"kept values not scaled by 1 / (1 - p) ({dtype})"
        if not torch.equal(xi.grad, torch.where(kept, scale.to(dtype), torch.zeros((), dtype=dtype))):
            return f"the gradient does not follow the mask ({dtype})"
        if not 0.70 < kept.float().mean().item() < 0.80:
            return f"kept {kept.float().mean().item():.3f} of the values, not about 0.75 ({dtype})"
        if not torch.equal(_Dropout.apply(x, 0.25, 12345), y.detach()):
            return f"the same seed drew another mask ({dtype})"
    return None
