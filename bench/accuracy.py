"""Train iterations of the change-log with their own recipes on real MNIST, over several seeds,
and print a results table (markdown): final and best test accuracy per seed, mean ± std.

    .venv/bin/python bench/accuracy.py --data-dir ../shared/mnist [--models I1,I3] [--seeds 1,2,3]
                                       [--val 10000] [--runs-dir runs]

Each run is an ordinary run folder (config.yaml, metrics.jsonl, checkpoints) under --runs-dir,
so `mnistkit evaluate` and `mnistkit compare` read it afterwards.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch

from mnistkit.experiments import find_experiments, resolve_recipe
from mnistkit.recipe import DataOptions
from mnistkit.training.loop import train


class Lines:
    def on_start(self, start):
        print(f"# {start.model}: {start.params:,} params, seed {start.recipe.seed}, {start.epochs} epochs, "
              f"run {start.run_dir}", flush=True)

    def on_step(self, step):
        pass

    def on_epoch(self, row, best):
        print(json.dumps(row.to_dict()), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--models", default="")
    ap.add_argument("--seeds", default="42")
    ap.add_argument("--val", type=int, default=0)
    ap.add_argument("--runs-dir", default="runs")
    ap.add_argument("--experiments", default=None)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    exp = find_experiments(args.experiments)
    wanted = [m for m in args.models.split(",") if m] or [it.model for it in exp.iterations]
    seeds = [int(s) for s in args.seeds.split(",")]
    results = []
    for it in exp.iterations:
        if it.model not in wanted:
            continue
        for seed in seeds:
            recipe = resolve_recipe(it.model, exp, seed=seed)
            t0 = time.perf_counter()
            r = train(it.model, recipe, DataOptions("mnist", args.data_dir, val=args.val), device=args.device,
                      runs_dir=args.runs_dir, callback=Lines())
            results.append((it, seed, r, time.perf_counter() - t0))
    print(f"\nMachine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}; best epoch chosen on {'validation' if args.val else 'test'}\n")
    print("| iteration | params | seed | epochs | final test acc | best test acc (epoch) | val acc (final) | "
          "last 3 test acc | wall time |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---:|")
    for it, seed, r, seconds in results:
        d = r.to_dict()
        val = f"{d['final_val_acc']:.2f}%" if d["final_val_acc"] is not None else "-"
        last3 = ", ".join(f"{a:.2f}" for a in d["last3_test_acc"])
        print(f"| {it.id} | {r.params:,} | {seed} | {r.epochs} | {d['final_test_acc']:.2f}% | "
              f"{d['best_test_acc']:.2f}% ({d['best_epoch']}) | {val} | {last3} | {seconds:.0f} s |")
    print()
    for it in exp.iterations:
        finals = [r.to_dict()["final_test_acc"] for i, _, r, _ in results if i is it]
        if len(finals) > 1:
            print(f"{it.id}: final test accuracy mean {statistics.fmean(finals):.2f}% ± {statistics.stdev(finals):.2f} "
                  f"(min {min(finals):.2f}%, {len(finals)} seeds)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
