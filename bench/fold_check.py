"""Evaluation folds BatchNorm into the convolutions (``mnistkit.training.evaluation.fold_batchnorm``):
check, on trained checkpoints and the real test set, that this changes no prediction.

    .venv/bin/python bench/fold_check.py --data-dir ../shared/mnist runs-readme [more run folders or runs dirs]

For every run's best.pt: the test set's predictions and logits with and without folding
(fp32, the same batches), the number of predictions that differ and the largest logit
difference.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from mnistkit.data.batches import EvalBatches
from mnistkit.data import load_mnist
from mnistkit.training.evaluation import checkpoint_recipe, fold_batchnorm, load_model
from mnistkit.runs.checkpoint import load_checkpoint
from mnistkit.runs import find_runs


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("paths", nargs="+", help="run folders, or runs folders holding them")
    args = ap.parse_args()
    test = load_mnist("test", args.data_dir, download=False)
    runs = [Path(p) for p in args.paths if (Path(p) / "config.yaml").is_file()]
    runs += [r for p in args.paths if not (Path(p) / "config.yaml").is_file() for r in find_runs(p)]
    print("| run | model | images | predictions that differ | max |logit difference| |\n|---|---|---:|---:|---:|")
    total = changed = 0
    for run in runs:
        ckpt = load_checkpoint(run / "best.pt")
        recipe = checkpoint_recipe(ckpt)
        model = load_model(ckpt, recipe).eval()
        if recipe.channels_last:
            model = model.to(memory_format=torch.channels_last)
        folded = fold_batchnorm(model)
        batches = EvalBatches(test, 256, torch.device("cpu"), recipe.mean, recipe.std, recipe.channels_last)
        diff, worst = 0, 0.0
        for x, _ in batches:
            a, b = model(x), folded(x)
            diff += int((a.argmax(1) != b.argmax(1)).sum())
            worst = max(worst, float((a - b).abs().max()))
        total, changed = total + len(test), changed + diff
        print(f"| {run} | {ckpt['model']} | {len(test):,} | {diff} | {worst:.2e} |")
    print(f"\n{changed} of {total:,} predictions differ over {len(runs)} checkpoints")


if __name__ == "__main__":
    main()
