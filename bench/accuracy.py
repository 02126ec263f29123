"""Train every iteration of experiments.yaml with its own recipe on real MNIST and print a
results table (markdown): best and final test accuracy, epoch of best, wall time.

    .venv/bin/python bench/accuracy.py --data-dir ../shared/mnist [--models I1,I3] [--runs-dir runs]

Each run is an ordinary run folder (config.yaml, metrics.jsonl, checkpoints) under --runs-dir,
so `mnistkit evaluate` can check it afterwards.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch

from mnistkit.experiments import load_experiments, resolve_recipe
from mnistkit.training import DataOptions, train


class Lines:
    def on_start(self, info):
        print(f"# {info['model']}: {info['params']:,} params, {info['epochs']} epochs, run {info['run_dir']}",
              flush=True)

    def on_step(self, *args):
        pass

    def on_epoch(self, row):
        print(json.dumps(row), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--models", default="")
    ap.add_argument("--runs-dir", default="runs")
    ap.add_argument("--experiments", default="experiments.yaml")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    exp = load_experiments(args.experiments)
    wanted = [m for m in args.models.split(",") if m] or [it.model for it in exp.iterations]
    results = []
    for it in exp.iterations:
        if it.model not in wanted:
            continue
        recipe = resolve_recipe(it.model, args.experiments)
        t0 = time.perf_counter()
        r = train(it.model, recipe, DataOptions("mnist", args.data_dir), device=args.device,
                  runs_dir=args.runs_dir, callback=Lines())
        results.append((it, r, time.perf_counter() - t0))
    print(f"\nMachine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}\n")
    print("| iteration | params | epochs | best test acc | epoch of best | final test acc | final train acc | wall time |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for it, r, seconds in results:
        d = r.to_dict()
        print(f"| {it.id} | {r.params:,} | {r.epochs} | {d['best_test_acc']:.2f}% | {d['best_epoch']} | "
              f"{d['final_test_acc']:.2f}% | {d['final_train_acc']:.2f}% | {seconds:.0f} s |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
