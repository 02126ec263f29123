"""Where a training step's time goes: torch.profiler over mnistkit's own step, per op and per
layer (ops grouped by input shape, which names the layer).

    .venv/bin/python bench/profile_step.py --data-dir ../shared/mnist --models I1,I3 [--steps 20]

Runs the default mode (the precision and memory format of ``Recipe()``) on real batches with
the recipe's augmentation, after warm-up steps; prints the ops by self CPU time, then the
convolution and BatchNorm ops per input shape.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from mnistkit.data import TrainBatches, load_mnist
from mnistkit.device import resolve_bn_relu, resolve_precision
from mnistkit.fused import use_fused
from mnistkit.models import get_model
from mnistkit.recipe import Recipe
from mnistkit.training import build_optimizer, train_step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--models", default="I1,I3")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rows", type=int, default=15)
    ap.add_argument("--bn-relu", default="auto", choices=["auto", "fused", "torch"],
                    help="what trains BatchNorm + ReLU (default: as training does)")
    args = ap.parse_args()
    recipe = Recipe(bn_relu=args.bn_relu)
    device = torch.device("cpu")
    bf16 = resolve_precision(recipe.precision, device) == "bf16"
    bn_relu = resolve_bn_relu(recipe.bn_relu, device, recipe.channels_last)
    train = load_mnist("train", args.data_dir, download=False)
    for name in [m for m in args.models.split(",") if m]:
        model = get_model(name, dropout=recipe.dropout)
        if recipe.channels_last:
            model = model.to(memory_format=torch.channels_last)
        use_fused(model, bn_relu == "fused")
        opt = build_optimizer(model, recipe)
        batches = TrainBatches(train, recipe.batch_size, device, recipe.augment, torch.Generator().manual_seed(0))
        it = iter(batches)

        def step():
            x, y = next(it)
            train_step(model, x, y, opt, None, recipe.label_smoothing, bf16, recipe.channels_last, recipe.grad_clip)

        for _ in range(5):
            step()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(args.steps):
                step()
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        print(f"\n## {name}: {args.steps} steps of batch {recipe.batch_size}, {'bf16' if bf16 else 'fp32'}"
              f"{' + channels_last' if recipe.channels_last else ''}, BN+ReLU: {bn_relu}; {total / 1e3 / args.steps:.1f} ms of "
              "self CPU time per step (profiled)\n")
        print("| op | ms per step | share |\n|---|---:|---:|")
        for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:args.rows]:
            print(f"| {e.key} | {e.self_cpu_time_total / 1e3 / args.steps:.2f} | "
                  f"{100 * e.self_cpu_time_total / total:.1f}% |")
        print("\n| op (shape of its first input: the layer's input, or its output gradient for a backward op) | ms per step | share |\n|---|---:|---:|")
        by_shape = prof.key_averages(group_by_input_shape=True)
        keep = ("convolution_backward", "mkldnn_convolution", "native_batch_norm", "native_batch_norm_backward")
        for e in sorted((e for e in by_shape if e.key.removeprefix("aten::") in keep),
                        key=lambda e: -e.self_cpu_time_total)[:args.rows]:
            shape = e.input_shapes[0] if e.input_shapes else "?"
            print(f"| {e.key} {shape} | {e.self_cpu_time_total / 1e3 / args.steps:.2f} | "
                  f"{100 * e.self_cpu_time_total / total:.1f}% |")


if __name__ == "__main__":
    main()
