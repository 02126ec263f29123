"""Where a training step's time goes: torch.profiler over mnistkit's own step, per op and per
layer (ops grouped by input shape, which names the layer), the step's wall time, and the floor
its convolutions and BatchNorm put under it.

    .venv/bin/python bench/profile_step.py --data-dir ../shared/mnist --models I1,I3,bench/models/dropout_blocks.py:Net
        [--steps 20] [--backend auto|torch|fused]

Runs the default mode (the precision, memory format and backend of ``Recipe()``, resolved as
training resolves them, with freed memory kept for reuse as the CLI keeps it) on real batches
with the recipe's augmentation, after warm-up steps. Prints, per model:

- the wall time of a step, unprofiled (median of 5 timings of ``--steps`` steps), and how much
  of it is batch preparation;
- the ops by self CPU time (of the calling thread: PyTorch's profiler does not record the
  intra-op threads); with the fused backend the kernel's passes are inside ``_BNReLU`` and its
  backward;
- the convolution and BatchNorm ops per input shape;
- the floor: each convolution's forward and backward and each BN + ReLU forward and backward
  alone (as the step trains it: the fused kernel where the backend fused that layer, else
  PyTorch's ops), on random data of the step's shapes: the step cannot be faster than their
  sum, even with perfect overlap and nothing else.

Profile on an idle machine: with another process on the cores, self CPU times inflate several
times over.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

from mnistkit import backends
from mnistkit.backends.memory import keep_freed_memory
from mnistkit.data.batches import TrainBatches
from mnistkit.data import load_mnist
from mnistkit.training.device import resolve_precision
from mnistkit.errors import UsageError
from mnistkit.usermodels.modelref import build, resolve
from mnistkit.training.optim import build_optimizer
from mnistkit.recipe import Recipe
from mnistkit.training.loop import train_step


def median_ms(fn: Callable[[], object], repeats: int = 15) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def layer_floor(model: nn.Module, rows: int, bf16: bool, channels_last: bool, repeats: int) -> list[tuple[str, float]]:
    """(layer, ms) for each convolution's forward + backward and, where a BatchNorm follows it in
    its block, the block's BN + ReLU forward + backward, alone, on ``rows`` random images in the
    step's precision and memory format; BN + ReLU through the block's own modules (the fused
    kernel where the backend fused it)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:   # None: the output stays
            shapes.setdefault(name, tuple(inputs[0].shape))
        return hook

    hooks = [m.register_forward_hook(record(name)) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model.eval()(torch.zeros(2, 1, 28, 28))
    model.train()
    for h in hooks:
        h.remove()
    dtype = torch.bfloat16 if bf16 else torch.float32
    layout = torch.channels_last if channels_last else torch.contiguous_format
    modules = dict(model.named_modules())
    out = []
    for i, (name, shape) in enumerate(shapes.items()):
        conv = modules[name]
        x = torch.randn(rows, *shape[1:], dtype=dtype).contiguous(memory_format=layout)
        w = conv.weight.detach().to(dtype)
        b = None if conv.bias is None else conv.bias.detach().to(dtype)
        y = F.conv2d(x, w, b, conv.stride, conv.padding)
        g = torch.randn_like(y)
        mask = [i > 0, True, b is not None]   # the first layer's input needs no gradient

        def conv_fwd_bwd():
            F.conv2d(x, w, b, conv.stride, conv.padding)
            torch.ops.aten.convolution_backward(g, x, w, None if b is None else [w.shape[0]], list(conv.stride),
                                                list(conv.padding), [1, 1], False, [0, 0], 1, mask)

        out.append((f"conv {name} {list(x.shape)}", median_ms(conv_fwd_bwd, repeats)))
        block_name = name.rpartition(".")[0]
        block = modules.get(block_name) if block_name else None
        if not (isinstance(block, nn.Sequential) and "bn" in block._modules):
            continue
        bn, tail = block.bn, block[1:]   # the block after its convolution: bn, relu (Identity where fused)
        h = y.detach().clone().requires_grad_()

        def bn_fwd_bwd():   # gradients returned, not accumulated into .grad (as inside a step)
            torch.autograd.grad(tail(h), [h, bn.weight, bn.bias], g)

        out.append((f"BN + ReLU {block_name} {list(y.shape)}", median_ms(bn_fwd_bwd, repeats)))
    return out


def print_ops(rows: list, total: float, steps: int, label: Callable) -> None:
    for e in rows:
        print(f"| {label(e)} | {e.self_cpu_time_total / 1e3 / steps:.2f} | {100 * e.self_cpu_time_total / total:.1f}% |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--models", default="I1,I3", help="comma-separated model references (a registered name, "
                                                       "FILE.py:Name, ...)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rows", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=None, help="default: the recipe's (256)")
    ap.add_argument("--floor-repeats", type=int, default=15, help="timings per layer for the floor (median)")
    ap.add_argument("--backend", default="auto", choices=backends.BACKENDS,
                    help="what trains the model (default: auto, resolved as training resolves it)")
    args = ap.parse_args()
    print(f"Freed memory kept for reuse, as the CLI does: {keep_freed_memory()}")
    recipe = base = Recipe(backend=args.backend, **({"batch_size": args.batch_size} if args.batch_size else {}))
    device = torch.device("cpu")
    bf16 = resolve_precision(recipe.precision, device) == "bf16"
    try:
        backends.resolve(recipe.backend, device)
    except UsageError as exc:
        raise SystemExit(str(exc)) from None
    train = load_mnist("train", args.data_dir, download=False)
    for name in [m for m in args.models.split(",") if m]:
        model = build(resolve(name), recipe.model_kwargs())[0]   # prepared as the trainer prepares it
        layout = backends.choose_layout(model, device, base.channels_last, bf16).channels_last
        recipe = base.replace(channels_last=layout)   # this model's layout, not the one before's
        if layout:
            model = model.to(memory_format=torch.channels_last)
        prepared = backends.prepare(model, recipe.backend, device, layout)
        model = prepared.model
        opt = build_optimizer(model, recipe)
        batches = TrainBatches(train, recipe.batch_size, device, recipe.augment, torch.Generator().manual_seed(0))
        it, preparing = iter(batches), [0.0]

        def step():
            nonlocal it
            t = time.perf_counter()
            try:
                x, y = next(it)
            except StopIteration:
                it = iter(batches)
                x, y = next(it)
            preparing[0] += time.perf_counter() - t
            train_step(model, x, y, opt, **recipe.replace(precision="bf16" if bf16 else "fp32").step_options)

        def steps():
            for _ in range(args.steps):
                step()

        for _ in range(5):
            step()
        preparing[0], walls = 0.0, []
        for _ in range(5):
            t = time.perf_counter()
            steps()
            walls.append(time.perf_counter() - t)
        wall = 1e3 * statistics.median(walls) / args.steps
        prep = 1e3 * preparing[0] / (5 * args.steps)
        mode = (f"{'bf16' if bf16 else 'fp32'}{' + channels_last' if recipe.channels_last else ''}, "
                f"{torch.get_num_threads()} threads, {prepared.note}")
        print(f"\n## {name}: batch {recipe.batch_size}, {mode}\n\nwall time {wall:.1f} ms per step "
              f"({recipe.batch_size / wall * 1e3:,.0f} img/s; median of 5 timings of {args.steps} steps, unprofiled)\n")
        print(f"| phase (wall, mean of all timed steps) | ms per step |\n|---|---:|\n| batch preparation | {prep:.2f} |\n"
              f"| the step (forward, backward, update) | {wall - prep:.2f} |")
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            steps()
        floor = layer_floor(model, recipe.batch_size, bf16, recipe.channels_last, args.floor_repeats)
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        print(f"\nProfiled: {total / 1e3 / args.steps:.1f} ms of self CPU time per step in the calling thread\n")
        print("| op | ms per step | share |\n|---|---:|---:|")
        print_ops(sorted(events, key=lambda e: -e.self_cpu_time_total)[:args.rows], total, args.steps,
                  lambda e: e.key)
        print("\n| op (shape of its first input: the layer's input, or its output gradient for a backward op) "
              "| ms per step | share |\n|---|---:|---:|")
        keep = ("convolution_backward", "mkldnn_convolution", "native_batch_norm", "native_batch_norm_backward",
                "_BNReLU", "_BNReLUBackward")
        by_shape = [e for e in prof.key_averages(group_by_input_shape=True) if e.key.removeprefix("aten::") in keep]
        print_ops(sorted(by_shape, key=lambda e: -e.self_cpu_time_total)[:args.rows], total, args.steps,
                  lambda e: f"{e.key} {e.input_shapes[0] if e.input_shapes else '?'}")
        conv_ms = sum(ms for k, ms in floor if k.startswith("conv"))
        bn_ms = sum(ms for k, ms in floor if k.startswith("BN"))
        print(f"\nThe floor: each layer alone, forward + backward, {recipe.batch_size} rows, "
              f"{torch.get_num_threads()} thread(s), median of {args.floor_repeats}\n\n| layer | ms |\n|---|---:|")
        for k, ms in floor:
            print(f"| {k} | {ms:.2f} |")
        print(f"| **convolutions** | **{conv_ms:.2f}** |\n| **BN + ReLU** | **{bn_ms:.2f}** |\n"
              f"| **floor of the step** (their sum) | **{conv_ms + bn_ms:.2f}** "
              f"({recipe.batch_size / (conv_ms + bn_ms) * 1e3:,.0f} img/s; the step: {wall:.1f} ms) |")


if __name__ == "__main__":
    main()
