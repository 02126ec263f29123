"""The fused BatchNorm + ReLU kernel against PyTorch's: time per layer, and gradient error.

1. Forward + backward of BN + ReLU alone, for the activation shapes of the models (batch 256,
   bf16, channels_last), PyTorch's ops against the kernel, alternating; medians.
2. One training step (fp32, no dropout, batch 64 by default) of each model, the gradients of every
   parameter against the same step in float64: the largest error relative to each
   parameter's largest gradient, for PyTorch's channels_last ops, PyTorch's NCHW ops and the
   kernel (channels_last). Parameters whose true gradient is 0 (I1's conv biases before BN)
   are left out.

    .venv/bin/python bench/bn_check.py
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from mnistkit import fused, get_model


def time_layer(shape: tuple[int, ...], use_fused: bool, reps: int) -> float:
    c = shape[1]
    bn = nn.BatchNorm2d(c).train()
    x = torch.randn(shape).bfloat16().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    g = torch.randn(shape).bfloat16().contiguous(memory_format=torch.channels_last)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        y = fused._BNReLU.apply(x, bn.weight, bn.bias, bn) if use_fused else torch.relu(bn(x))
        (y * g).sum().backward()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def grad_errors(name: str, batch: int) -> dict[str, float]:
    torch.manual_seed(0)
    base = get_model(name, dropout=0.0).train()
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))

    def grads(dtype: torch.dtype, channels_last: bool, on: bool) -> dict[str, torch.Tensor]:
        model = copy.deepcopy(base).to(dtype)
        xx = x.to(dtype)
        if channels_last:
            model, xx = model.to(memory_format=torch.channels_last), xx.contiguous(memory_format=torch.channels_last)
        fused.use_fused(model, on)
        F.cross_entropy(model(xx), y).backward()
        return {k: p.grad.double() for k, p in model.named_parameters()}

    ref = grads(torch.float64, False, False)
    top = max(g.abs().max() for g in ref.values())
    keep = [k for k, g in ref.items() if g.abs().max() > 1e-6 * top]

    def err(g: dict[str, torch.Tensor]) -> float:
        return max(((g[k] - ref[k]).abs().max() / ref[k].abs().max()).item() for k in keep)

    return {"torch channels_last": err(grads(torch.float32, True, False)),
            "torch NCHW": err(grads(torch.float32, False, False)),
            "fused channels_last": err(grads(torch.float32, True, True))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--grad-batch", type=int, default=64)
    args = ap.parse_args()
    if not fused.available():
        raise SystemExit(f"the fused kernel is not available here: {fused.status()}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; kernel: {fused.status()}\n")
    print("| BN + ReLU, bf16 channels_last, fwd + bwd | PyTorch ms | fused ms | speed-up |\n|---|---:|---:|---:|")
    for shape in [(256, 10, 26, 26), (256, 26, 24, 24), (256, 18, 10, 10), (256, 20, 6, 6), (256, 6, 26, 26),
                  (256, 12, 24, 24), (256, 24, 14, 14), (256, 16, 28, 28)]:
        a, b = [], []
        for _ in range(args.rounds):  # alternate, so drift hits both alike
            a.append(time_layer(shape, False, args.reps))
            b.append(time_layer(shape, True, args.reps))
        ta, tb = statistics.median(a), statistics.median(b)
        print(f"| {list(shape)} | {ta:.2f} | {tb:.2f} | {ta / tb:.2f}x |")
    print("\n| one fp32 step, max relative gradient error vs float64 | PyTorch channels_last | PyTorch NCHW | "
          "fused channels_last |\n|---|---:|---:|---:|")
    for name in ("I1", "I2", "I3", "I4"):
        e = grad_errors(name, args.grad_batch)
        print(f"| {name} | {e['torch channels_last']:.1e} | {e['torch NCHW']:.1e} | {e['fused channels_last']:.1e} |")


if __name__ == "__main__":
    main()
