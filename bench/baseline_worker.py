"""The other end of ``throughput.py --baseline DIR``: the default training step of the mnistkit
source tree in DIR, timed by DIR's own ``bench/throughput.py``, in this process of its own.
One line ``MODEL STEPS`` in, images/s out.

    bench/baseline_worker.py DIR DATA_DIR [--batch-size 256] [--limit N]

The tree's ``throughput.default_rate`` (0.9 on) is asked for it, after the version's own kept
memory, as its own benchmark does. (0.8's sharded step is gone with its option.)
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
    if not hasattr(tp, "default_rate"):
        raise SystemExit(f"{tree} is mnistkit {mnistkit.__version__}: a baseline tree is 0.9 or later")
    from mnistkit.data import load_mnist
    from mnistkit.models import get_model
    from mnistkit.recipe import Augment
    try:
        from mnistkit.data.batches import TrainBatches   # 0.12 on: sub-packages
    except ImportError:
        from mnistkit.batches import TrainBatches        # 0.9 to 0.11
    from mnistkit.backends.memory import keep_freed_memory   # as the version's own benchmark does

    train = load_mnist("train", Path(args.data_dir), download=False)
    if args.limit:
        train = train.head(args.limit)
    batches = TrainBatches(train, args.batch_size, torch.device("cpu"), Augment(), torch.Generator().manual_seed(0))
    keep_freed_memory()
    rate = tp.default_rate

    print(f"{mnistkit.__version__}", file=sys.stderr)
    for line in sys.stdin:
        name, steps = line.split()
        torch.manual_seed(0)
        print(rate(name, batches, int(steps)), flush=True)


if __name__ == "__main__":
    main()
