"""Where a training step's time goes: torch.profiler over mnistkit's own step, per op and per
layer (ops grouped by input shape, which names the layer), the step's wall time by phase, and
the floor its convolutions and BatchNorm put under it.

    .venv/bin/python bench/profile_step.py --data-dir ../shared/mnist --models I1,I3 [--steps 20] [--shards auto|N]

Runs the default mode (the precision, memory format, BatchNorm kernel and shards of ``Recipe()``,
resolved as training resolves them, with freed memory kept for reuse as training keeps it) on
real batches with the recipe's augmentation, after warm-up steps. Prints, per model:

- the wall time of a step, unprofiled (median of 5 timings of ``--steps`` steps);
- a sharded step's phases (batch preparation, each shard's forward + backward, the time each
  shard waits for the others inside the BatchNorm exchange, what runs after the shards);
- the ops by self CPU time: of the calling thread, which in a sharded step is shard 0 (PyTorch's
  profiler does not record the pool's threads); the exchange's waits are inside ``_SyncBNReLU``
  and its backward there;
- the convolution and BatchNorm ops per input shape;
- the floor: each convolution's forward and backward and each BN + ReLU forward and backward
  alone, on random data of the shapes one shard (or the whole step) sees, with the threads it
  has: the step cannot be faster than their sum, even with perfect overlap and nothing else.

Profile on an idle machine: with another process on the cores, self CPU times inflate several
times over.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

from mnistkit import fused
from mnistkit.data import TrainBatches, load_mnist
from mnistkit.device import keep_freed_memory, resolve_bn_relu, resolve_precision, resolve_shards
from mnistkit.fused import use_fused
from mnistkit.models import get_model
from mnistkit.parallel import ShardedStep, step_threads
from mnistkit.recipe import Recipe
from mnistkit.training import build_optimizer, train_step


def median_ms(fn: Callable[[], object], repeats: int = 15) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def layer_floor(model: nn.Module, rows: int, bf16: bool, bn_relu: str, repeats: int) -> list[tuple[str, float]]:
    """(layer, ms) for each convolution's forward + backward and each BN + ReLU forward + backward,
    alone, on ``rows`` random images, in the step's precision and channels_last; BN + ReLU as the
    step trains it (``bn_relu``: sharded, fused or torch)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            shapes.setdefault(name, tuple(inputs[0].shape))
        return hook

    hooks = [m.register_forward_hook(record(name)) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model.eval()(torch.zeros(2, 1, 28, 28))
    model.train()
    for h in hooks:
        h.remove()
    dtype = torch.bfloat16 if bf16 else torch.float32
    rows_out = []
    first = True
    modules = dict(model.named_modules())
    for name, shape in shapes.items():
        conv = modules[name]
        x = torch.randn(rows, *shape[1:], dtype=dtype).contiguous(memory_format=torch.channels_last)
        w = conv.weight.detach().to(dtype)
        b = None if conv.bias is None else conv.bias.detach().to(dtype)
        y = F.conv2d(x, w, b, conv.stride, conv.padding)
        g = torch.randn_like(y)
        mask = [not first, True, b is not None]   # the first layer's input needs no gradient

        def fwd_bwd():
            F.conv2d(x, w, b, conv.stride, conv.padding)
            torch.ops.aten.convolution_backward(g, x, w, None if b is None else [w.shape[0]], list(conv.stride),
                                                list(conv.padding), [1, 1], False, [0, 0], 1, mask)

        rows_out.append((f"conv {name} {list(x.shape)}", median_ms(fwd_bwd, repeats)))
        first = False
        parent = modules.get(name.rsplit(".", 1)[0]) if "." in name else None
        bn = getattr(parent, "bn", None) if isinstance(parent, fused.ConvBNReLU) else None
        if bn is not None:
            h = y.detach().clone().requires_grad_()
            gh = torch.randn_like(y)
            if bn_relu == "sharded":
                one = fused.Rendezvous(1)

                def bn_fwd_bwd():   # gradients returned, not accumulated into .grad (as inside a step)
                    torch.autograd.grad(fused._SyncBNReLU.apply(h, bn.weight, bn.bias, bn, one, 0),
                                        [h, bn.weight, bn.bias], gh)
            elif bn_relu == "fused":
                def bn_fwd_bwd():
                    torch.autograd.grad(fused.bn_relu(h, bn), [h, bn.weight, bn.bias], gh)
            else:
                def bn_fwd_bwd():
                    torch.autograd.grad(torch.relu(bn(h)), [h, bn.weight, bn.bias], gh)

            rows_out.append((f"BN + ReLU {name.rsplit('.', 1)[0]} {list(y.shape)}", median_ms(bn_fwd_bwd, repeats)))
    return rows_out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--models", default="I1,I3")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rows", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=None, help="default: the recipe's (256)")
    ap.add_argument("--floor-repeats", type=int, default=15, help="timings per layer for the floor (median)")
    ap.add_argument("--bn-relu", default=None, choices=["auto", "fused", "torch"],
                    help="what trains BatchNorm + ReLU in an unsharded step (default: the recipe's, as "
                         "training does)")
    ap.add_argument("--shards", default="auto", help="auto (as training does) or N (1: the unsharded step)")
    args = ap.parse_args()
    print(f"Freed memory kept for reuse, as training does: {keep_freed_memory()}")
    recipe = Recipe(shards=args.shards if args.shards == "auto" else int(args.shards),
                    **({"batch_size": args.batch_size} if args.batch_size else {}),
                    **({"bn_relu": args.bn_relu} if args.bn_relu else {}))
    device = torch.device("cpu")
    bf16 = resolve_precision(recipe.precision, device) == "bf16"
    bn_relu = resolve_bn_relu(recipe.bn_relu, device, recipe.channels_last)
    shards = resolve_shards(recipe.shards, device, recipe.channels_last)
    threads = max(1, torch.get_num_threads() // shards)
    train = load_mnist("train", args.data_dir, download=False)
    for name in [m for m in args.models.split(",") if m]:
        model = get_model(name, dropout=recipe.dropout)
        if recipe.channels_last:
            model = model.to(memory_format=torch.channels_last)
        use_fused(model, bn_relu == "fused")
        opt = build_optimizer(model, recipe)
        batches = TrainBatches(train, recipe.batch_size, device, recipe.augment, torch.Generator().manual_seed(0))
        sharded = ShardedStep(model, shards, 0, threads) if shards > 1 else None
        phases = {"batch preparation": 0.0}
        if sharded:   # timers on this instance's methods (the step looks them up on the instance)
            run, exchange = sharded._run, sharded._sync.exchange
            for i in range(shards):
                phases[f"shard {i}: forward + backward"] = phases[f"shard {i}: of which waiting in the exchange"] = 0.0

            def timed_run(index, *a):
                t = time.perf_counter()
                try:
                    return run(index, *a)
                finally:
                    phases[f"shard {index}: forward + backward"] += time.perf_counter() - t

            def timed_exchange(index, value):
                t = time.perf_counter()
                try:
                    return exchange(index, value)
                finally:
                    phases[f"shard {index}: of which waiting in the exchange"] += time.perf_counter() - t

            sharded._run, sharded._sync.exchange = timed_run, timed_exchange
        step_fn = sharded or functools.partial(train_step, model)   # as the trainer does
        it = iter(batches)

        def step():
            nonlocal it
            t = time.perf_counter()
            try:
                x, y = next(it)
            except StopIteration:
                it = iter(batches)
                x, y = next(it)
            phases["batch preparation"] += time.perf_counter() - t
            step_fn(x, y, opt, None, recipe.label_smoothing, bf16, recipe.channels_last, recipe.grad_clip)

        def steps():
            for _ in range(args.steps):
                step()

        mode = (f"{'bf16' if bf16 else 'fp32'}{' + channels_last' if recipe.channels_last else ''}, "
                + (f"{shards} shards of {recipe.batch_size // shards} rows, {threads} thread(s) each, BN+ReLU: fused"
                   if sharded else f"unsharded, {torch.get_num_threads()} threads, BN+ReLU: {bn_relu}"))
        with step_threads(threads) if sharded else contextlib.nullcontext():
            for _ in range(5):
                step()
            for k in phases:
                phases[k] = 0.0
            walls = []
            for _ in range(5):
                t = time.perf_counter()
                steps()
                walls.append(time.perf_counter() - t)
            wall = 1e3 * statistics.median(walls) / args.steps
            measured = 5 * args.steps
            print(f"\n## {name}: batch {recipe.batch_size}, {mode}\n\nwall time {wall:.1f} ms per step "
                  f"({recipe.batch_size / wall * 1e3:,.0f} img/s; median of 5 timings of {args.steps} steps, unprofiled)\n")
            print("| phase (wall, mean of all timed steps) | ms per step |\n|---|---:|")
            for k, v in phases.items():
                print(f"| {k} | {1e3 * v / measured:.2f} |")
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                steps()
            floor = layer_floor(model, recipe.batch_size // shards, bf16, "sharded" if sharded else bn_relu,
                                args.floor_repeats)
        if sharded:
            sharded.close()
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        who = "shard 0's thread (the calling thread)" if sharded else "the calling thread"
        print(f"\nProfiled: {total / 1e3 / args.steps:.1f} ms of self CPU time per step in {who}\n")
        print("| op | ms per step | share |\n|---|---:|---:|")
        for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:args.rows]:
            print(f"| {e.key} | {e.self_cpu_time_total / 1e3 / args.steps:.2f} | "
                  f"{100 * e.self_cpu_time_total / total:.1f}% |")
        print("\n| op (shape of its first input: the layer's input, or its output gradient for a backward op) "
              "| ms per step | share |\n|---|---:|---:|")
        by_shape = prof.key_averages(group_by_input_shape=True)
        keep = ("convolution_backward", "mkldnn_convolution", "native_batch_norm", "native_batch_norm_backward")
        for e in sorted((e for e in by_shape if e.key.removeprefix("aten::") in keep),
                        key=lambda e: -e.self_cpu_time_total)[:args.rows]:
            shape = e.input_shapes[0] if e.input_shapes else "?"
            print(f"| {e.key} {shape} | {e.self_cpu_time_total / 1e3 / args.steps:.2f} | "
                  f"{100 * e.self_cpu_time_total / total:.1f}% |")
        conv_ms = sum(ms for k, ms in floor if k.startswith("conv"))
        bn_ms = sum(ms for k, ms in floor if k.startswith("BN"))
        print(f"\nThe floor: each layer alone, forward + backward, {recipe.batch_size // shards} rows, "
              f"{threads} thread(s), median of {args.floor_repeats}\n\n| layer | ms |\n|---|---:|")
        for k, ms in floor:
            print(f"| {k} | {ms:.2f} |")
        print(f"| **convolutions** | **{conv_ms:.2f}** |\n| **BN + ReLU** | **{bn_ms:.2f}** |\n"
              f"| **floor of the step** (their sum{'; the shards run at once' if sharded else ''}) | "
              f"**{conv_ms + bn_ms:.2f}** "
              f"({recipe.batch_size / (conv_ms + bn_ms) * 1e3:,.0f} img/s; the step: {wall:.1f} ms) |")


if __name__ == "__main__":
    main()
