"""The fused BatchNorm + ReLU kernel against PyTorch's: time per layer, and gradient error.

1. Forward + backward of BN + ReLU alone, for the activation shapes of the models (batch 256,
   bf16, channels_last), PyTorch's ops against the kernel, alternating; medians.
2. One training step (fp32, no dropout, batch 64 by default) of each model, the gradients of every
   parameter against the same step in float64: the largest error relative to each
   parameter's largest gradient, for PyTorch's channels_last ops, PyTorch's NCHW ops and the
   fused backend (channels_last; a BatchNorm it does not fuse keeps PyTorch's ops). Parameters
   whose true gradient is 0 (I1's conv biases before BN) are left out.
3. With ``--trained RUN --data-dir DIR``: layer by layer in bf16 on a trained model's own
   activations (one batch of training images, the default step's precision and layout), the
   output, input gradient, weight gradient and bias gradient of PyTorch's BN + ReLU and of the
   kernel, each against the float64 formula on the same bf16 input (relative L2 error).

    .venv/bin/python bench/bn_check.py
    .venv/bin/python bench/bn_check.py --trained runs-readme/readme/I3-seed1 --data-dir ../shared/mnist
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from mnistkit import backends, get_model
from mnistkit.backends import fused, kernel

CPU = torch.device("cpu")


def time_layer(shape: tuple[int, ...], use_fused: bool, reps: int) -> float:
    c = shape[1]
    bn = nn.BatchNorm2d(c).train()
    x = torch.randn(shape).bfloat16().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    g = torch.randn(shape).bfloat16().contiguous(memory_format=torch.channels_last)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        y = fused._BNReLU.apply(x, bn.weight, bn.bias, bn, True) if use_fused else torch.relu(bn(x))
        (y * g).sum().backward()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def grad_errors(name: str, batch: int) -> dict[str, float]:
    torch.manual_seed(0)
    base = get_model(name, dropout=0.0).train()
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))

    def grads(dtype: torch.dtype, channels_last: bool, backend: str) -> dict[str, torch.Tensor]:
        model = copy.deepcopy(base).to(dtype)
        xx = x.to(dtype)
        if channels_last:
            model, xx = model.to(memory_format=torch.channels_last), xx.contiguous(memory_format=torch.channels_last)
        model = backends.prepare(model, backend, CPU, channels_last).model
        F.cross_entropy(model(xx), y).backward()
        return {k: p.grad.double() for k, p in model.named_parameters()}

    ref = grads(torch.float64, False, "torch")
    top = max(g.abs().max() for g in ref.values())
    keep = [k for k, g in ref.items() if g.abs().max() > 1e-6 * top]

    def err(g: dict[str, torch.Tensor]) -> float:
        return max(((g[k] - ref[k]).abs().max() / ref[k].abs().max()).item() for k in keep)

    return {"torch channels_last": err(grads(torch.float32, True, "torch")),
            "torch NCHW": err(grads(torch.float32, False, "torch")),
            "fused channels_last": err(grads(torch.float32, True, "fused"))}


def trained_layers(run: str, data_dir: str, batch: int) -> None:
    from mnistkit.data import load_mnist
    from mnistkit.runs.checkpoint import load_checkpoint
    from mnistkit.runs import read_config

    config = read_config(run)
    model = get_model(config.model, dropout=0.0)
    model.load_state_dict(load_checkpoint(run)["state_dict"])
    model.train().to(memory_format=torch.channels_last)
    train = load_mnist("train", data_dir, download=False)
    idx = torch.randperm(len(train.labels), generator=torch.Generator().manual_seed(0))[:batch]
    x = ((train.images[idx].float() / 255 - config.recipe.mean) / config.recipe.std).unsqueeze(1)
    x, y = x.contiguous(memory_format=torch.channels_last), train.labels[idx].long()
    seen = []   # (block, conv output, ReLU output) of every conv/bn/relu block, in order
    for block in (m for m in model.modules() if isinstance(m, nn.Sequential) and "bn" in m._modules):
        def keep(mod, inp, out, block=block):
            out.retain_grad()
            seen.append([block, out])
        block.conv.register_forward_hook(keep)
        def keep_relu(mod, inp, out):
            out.retain_grad()
            seen[-1].append(out)
        block.relu.register_forward_hook(keep_relu)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    F.cross_entropy(out.float(), y).backward()

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a.double() - b).norm() / b.norm()).item()

    print(f"\n{config.model} ({run}), bf16 layer by layer, batch {batch}: relative L2 error against float64\n")
    print("| layer input | PyTorch: out / dx / dw / db | fused: out / dx / dw / db |\n|---|---|---|")
    for block, h, r in seen:
        hb, g, bn = h.detach(), r.grad.detach(), block.bn
        ref = fused.reference(hb, bn.weight, bn.bias, g, bn.eps)
        cells = []
        for use in (False, True):
            b2 = copy.deepcopy(bn)
            xi = hb.clone().requires_grad_(True)
            yy = fused._BNReLU.apply(xi, b2.weight, b2.bias, b2, True) if use else torch.relu(b2(xi))
            yy.backward(g)
            cells.append(" / ".join(f"{rel(a, b):.1e}" for a, b in
                                    ((yy, ref[0]), (xi.grad, ref[1]), (b2.weight.grad, ref[2]), (b2.bias.grad, ref[3]))))
        print(f"| {list(hb.shape)} | {cells[0]} | {cells[1]} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--grad-batch", type=int, default=64)
    ap.add_argument("--trained", metavar="RUN", help="also check a trained run's layers in bf16 (needs --data-dir)")
    ap.add_argument("--data-dir")
    ap.add_argument("--batch", type=int, default=256)
    args = ap.parse_args()
    if args.trained and not args.data_dir:
        ap.error("--trained needs --data-dir")
    if not kernel.available():
        raise SystemExit(f"the fused kernel is not available here: {kernel.status()}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; kernel: {kernel.status()}\n")
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
    if args.trained:
        trained_layers(args.trained, args.data_dir, args.batch)


if __name__ == "__main__":
    main()
