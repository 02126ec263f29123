"""What keeping freed memory for reuse gives the training step: alternating processes with it
(as training does) and without it (MNISTKIT_KEEP_MEMORY=0, glibc's own behaviour).

    .venv/bin/python bench/kept_memory.py --data-dir ../shared/mnist [--model I3] [--pairs 8] [--steps 40]

Each process times ``--steps`` steps of the default step (the precision, memory format and
backend of ``Recipe()``, resolved as training resolves them), after warm-up, with the throughput
benchmark's timed loop, and counts the page faults and system time of those steps
(``getrusage``). Prints each pair, then the medians and the median of the pairs' ratios: the
machine's speed drifts between processes, the ratio of neighbours less.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys


def worker(args: argparse.Namespace) -> None:
    import resource

    import torch
    from throughput import time_mnistkit   # the same timed loop as the throughput benchmark

    from mnistkit import backends
    from mnistkit.backends.memory import keep_freed_memory
    from mnistkit.data.batches import TrainBatches
    from mnistkit.data import load_mnist
    from mnistkit.training.device import resolve_precision
    from mnistkit.models import get_model
    from mnistkit.recipe import Recipe

    status = keep_freed_memory()
    recipe = Recipe()
    cpu = torch.device("cpu")
    bf16 = resolve_precision(recipe.precision, cpu) == "bf16"
    backend = backends.resolve(recipe.backend, cpu)[0]
    train = load_mnist("train", args.data_dir, download=False)
    batches = TrainBatches(train, args.batch_size, cpu, recipe.augment, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    time_mnistkit(get_model(args.model), batches, 5, bf16, recipe.channels_last, backend)   # warm-up
    before = resource.getrusage(resource.RUSAGE_SELF)
    rate = time_mnistkit(get_model(args.model), batches, args.steps, bf16, recipe.channels_last, backend)
    after = resource.getrusage(resource.RUSAGE_SELF)
    steps = args.steps + 1   # time_mnistkit runs one untimed step first
    print(json.dumps({"kept": status, "backend": backend, "ms_per_step": 1e3 * args.batch_size / rate,
                      "faults_per_step": (after.ru_minflt - before.ru_minflt) / steps,
                      "sys_ms_per_step": 1e3 * (after.ru_stime - before.ru_stime) / steps}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--model", default="I3")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    cmd = [sys.executable, __file__, "--worker", "--data-dir", args.data_dir, "--model", args.model,
           "--steps", str(args.steps), "--batch-size", str(args.batch_size)]
    rows = {"0": [], "1": []}
    for i in range(args.pairs):
        for keep in ("0", "1"):
            out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                                 env={**os.environ, "MNISTKIT_KEEP_MEMORY": keep})
            rows[keep].append(json.loads(out.stdout.splitlines()[-1]))
        off, on = rows["0"][-1], rows["1"][-1]
        print(f"pair {i + 1}: glibc's default {off['ms_per_step']:.1f} ms/step ({off['faults_per_step']:,.0f} faults, "
              f"{off['sys_ms_per_step']:.1f} ms system), kept {on['ms_per_step']:.1f} ms/step "
              f"({on['faults_per_step']:,.0f} faults, {on['sys_ms_per_step']:.1f} ms system) [{on['kept']}]")
    med = {k: {f: statistics.median(r[f] for r in v) for f in ("ms_per_step", "faults_per_step", "sys_ms_per_step")}
           for k, v in rows.items()}
    ratios = [a["ms_per_step"] / b["ms_per_step"] for a, b in zip(rows["0"], rows["1"])]
    print(f"\n{args.model}, batch {args.batch_size}, backend {rows['1'][0]['backend']}, medians of {args.pairs} pairs: "
          f"glibc's default {med['0']['ms_per_step']:.1f} ms/step, {med['0']['faults_per_step']:,.0f} faults, "
          f"{med['0']['sys_ms_per_step']:.1f} ms system; kept {med['1']['ms_per_step']:.1f} ms/step, "
          f"{med['1']['faults_per_step']:,.0f} faults, {med['1']['sys_ms_per_step']:.1f} ms system; "
          f"ratio {statistics.median(ratios):.2f}x (kept faster in {sum(r > 1 for r in ratios)} of {len(ratios)})")


if __name__ == "__main__":
    main()
