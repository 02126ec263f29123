"""Why mnistkit shards its training step: one process with two intra-op threads against two
processes of one thread each, running at the same time (the same model, step and batch).

    .venv/bin/python bench/threads.py --data-dir ../shared/mnist [--model I3] [--steps 40] [--rounds 3]

Prints, per round: images/s of one process with 2 threads, and of each of two 1-thread
processes started together (their sum is what the two cores can do with these tiny ops), then
the medians. Each process trains with the fused BatchNorm + ReLU kernel where it is available
(as a sharded step does), in the default precision and memory format.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from throughput import time_mnistkit   # the same timed loop as the throughput benchmark

    from mnistkit import fused
    from mnistkit.data import TrainBatches, load_mnist
    from mnistkit.device import keep_freed_memory, resolve_precision
    from mnistkit.models import get_model
    from mnistkit.recipe import Recipe

    keep_freed_memory()   # as training does
    recipe = Recipe()
    bf16 = resolve_precision(recipe.precision, torch.device("cpu")) == "bf16"
    train = load_mnist("train", args.data_dir, download=False)
    batches = TrainBatches(train, args.batch_size, torch.device("cpu"), recipe.augment, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    print(time_mnistkit(get_model(args.model), batches, args.steps, bf16, True, fused.available()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--model", default="I3")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)   # set: run as a worker
    args = ap.parse_args()
    if args.threads:
        worker(args)
        return
    base = [sys.executable, __file__, "--data-dir", args.data_dir, "--model", args.model, "--steps", str(args.steps),
            "--batch-size", str(args.batch_size)]
    one, pairs = [], []
    for r in range(args.rounds):
        one.append(float(subprocess.run([*base, "--threads", "2"], capture_output=True, text=True,
                                        check=True).stdout))
        procs = [subprocess.Popen([*base, "--threads", "1"], stdout=subprocess.PIPE, text=True) for _ in range(2)]
        rates = [float(p.communicate()[0]) for p in procs]
        pairs.append(sum(rates))
        print(f"round {r + 1}: one process, 2 threads: {one[-1]:,.0f} img/s; two 1-thread processes together: "
              f"{rates[0]:,.0f} + {rates[1]:,.0f} = {pairs[-1]:,.0f} img/s")
    print(f"\n{args.model}, batch {args.batch_size}, medians of {args.rounds} rounds: one process with 2 threads "
          f"{statistics.median(one):,.0f} img/s, two processes of 1 thread {statistics.median(pairs):,.0f} img/s "
          f"({statistics.median(pairs) / statistics.median(one):.2f}x)")


if __name__ == "__main__":
    main()
