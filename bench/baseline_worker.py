"""The other end of ``throughput.py --baseline DIR``: the default training step of the mnistkit
source tree in DIR, timed by DIR's own ``bench/throughput.py``, in this process of its own.
One line ``MODEL STEPS`` in, images/s out.

    bench/baseline_worker.py DIR DATA_DIR [--batch-size 256] [--limit N]

A tree that has ``throughput.default_rate`` (0.9 on) is asked for it; 0.8's (which has no such
function) is timed as 0.8 trained by default: its kept memory, its sharded step (``shards:
auto``) with the fused kernel, in the default precision and channels_last.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("tree")
    ap.add_argument("data_dir")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--limit", type=int, default=None)
    args = ap.parse_args()
    tree = Path(args.tree).resolve()
    sys.path[:0] = [str(tree), str(tree / "bench")]   # the baseline's mnistkit and its benchmark first
    import torch
    import throughput as tp

    import mnistkit

    if not str(Path(mnistkit.__file__).resolve()).startswith(str(tree)):
        raise SystemExit(f"{tree} is not a mnistkit source tree (imported {mnistkit.__file__})")
    from mnistkit.data import Augment, load_mnist
    try:
        from mnistkit.data.batches import TrainBatches
    except ImportError:   # before 0.9
        from mnistkit.data import TrainBatches
    from mnistkit.models import get_model

    train = load_mnist("train", Path(args.data_dir), download=False)
    if args.limit:
        train = train.head(args.limit)
    batches = TrainBatches(train, args.batch_size, torch.device("cpu"), Augment(), torch.Generator().manual_seed(0))
    if hasattr(tp, "default_rate"):
        from mnistkit.backends.memory import keep_freed_memory   # as the version's own benchmark does

        keep_freed_memory()
        rate = tp.default_rate
    else:   # mnistkit 0.8
        from mnistkit.training.device import keep_freed_memory, resolve_bn_relu, resolve_precision, resolve_shards
        from mnistkit.recipe import Recipe

        keep_freed_memory()
        recipe, cpu = Recipe(), torch.device("cpu")
        shards = resolve_shards(recipe.shards, cpu, recipe.channels_last)
        kernel = shards > 1 or resolve_bn_relu(recipe.bn_relu, cpu, recipe.channels_last) == "fused"
        bf16 = resolve_precision(recipe.precision, cpu) == "bf16"

        def rate(name: str, batches: TrainBatches, steps: int) -> float:
            return tp.time_mnistkit(get_model(name), batches, steps, bf16, recipe.channels_last, kernel, shards)

    print(f"{mnistkit.__version__}", file=sys.stderr)
    for line in sys.stdin:
        name, steps = line.split()
        torch.manual_seed(0)
        print(rate(name, batches, int(steps)), flush=True)


if __name__ == "__main__":
    main()
