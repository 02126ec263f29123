"""Training throughput: mnistkit's pipeline against the usual PyTorch one, alternating.

    .venv/bin/python bench/throughput.py --data-dir ../shared/mnist [--models I1,I3,bench/models/relu_before_bn.py:Net]
        [--steps 60] [--repeats 5] [--whole-process I1,bench/models/dropout_blocks.py:Net]
        [--baseline DIR]   # also an older mnistkit (a source tree, e.g. `git archive v0.12`)

Models are any model reference `mnistkit train` takes: a registered name, FILE.py:Name,
package.module:Name, FILE.yaml (``bench/models/`` holds two student-style shapes).

reference: torchvision.datasets.MNIST + DataLoader(batch_size=256, shuffle=True, num_workers=2)
           + Compose([RandomAffine(10, translate=(0.05, 0.05), scale=(0.98, 1.02)), ToTensor(),
           Normalize((0.1307,), (0.3081,))]) + a plain SGD/OneCycleLR loop with loss.item() per step.
mnistkit:  the dataset held as one tensor, batched augmentation, mnistkit.training.loop.train_step with
           the default backend (and the other one beside it, where the fused kernel runs).
baseline:  with --baseline DIR, the default step of the mnistkit in DIR, timed by its own
           bench/throughput.py in a process of its own (so "before" and "after" share one run;
           registered models only), and its `mnistkit train MODEL --epochs 1` as a whole process.

The two are timed alternately (same model, same steps, same batch size, same augmentation),
and the figure for each is the median images/s over the repeats. mnistkit's pipelines run in
this process, which keeps freed memory for reuse as the `mnistkit` command does; the reference
runs in a process of its own (started once), with the C library's malloc as a user's script has
it, and so does a baseline (with its own version's memory setting). It also measures this
machine's fp32 matrix-multiply rate, the achieved training GFLOP/s (6 x the model's counted
mult-adds per image: forward, and twice that backward), evaluation images/s, and the start-up
time of `mnistkit --help` and `mnistkit summary I3` as whole processes.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from mnistkit import backends
from mnistkit.backends.memory import keep_freed_memory
from mnistkit.data.batches import EvalBatches, TrainBatches
from mnistkit.data import Augment, load_mnist
from mnistkit.training.device import resolve_precision
from mnistkit.training.evaluation import evaluate
from mnistkit.usermodels.modelref import build, resolve
from mnistkit.training.optim import build_optimizer
from mnistkit.recipe import Recipe
from mnistkit.introspect.summary import summarize
from mnistkit.training.loop import train_step

IDX = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


def make_model(reference: str) -> torch.nn.Module:
    """A fresh model of ``reference`` (a registered name or any model reference), as ``train`` builds it."""
    return build(resolve(reference))[0]


def torchvision_root(data_dir: Path, work: Path) -> Path:
    """torchvision's MNIST wants ``root/MNIST/raw/<name>`` (uncompressed): make that layout."""
    raw = work / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in IDX:
        src = next((p for p in (data_dir / name, data_dir / (name + ".gz"), data_dir / "MNIST" / "raw" / name)
                    if p.exists()))
        data = gzip.decompress(src.read_bytes()) if src.suffix == ".gz" else src.read_bytes()
        (raw / name).write_bytes(data)
    return work


def reference_loader(root: Path, batch_size: int, workers: int, limit: int | None):
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets, transforms

    tf = transforms.Compose([
        transforms.RandomAffine(10, translate=(0.05, 0.05), scale=(0.98, 1.02)),
        transforms.ToTensor(),
        transforms.Normalize((0.1307,), (0.3081,)),
    ])
    ds = datasets.MNIST(str(root), train=True, download=False, transform=tf)
    if limit:
        ds = Subset(ds, range(limit))
    return DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True)


class ReferenceProcess:
    """The reference pipeline timed in a process of its own, as a user's script runs: with the C
    library's malloc as it comes. (mnistkit's training keeps freed memory for reuse, process-wide;
    timed in mnistkit's process, the reference would get that too.) One process for the whole
    benchmark, started once; each call times one model and returns images/s."""

    def __init__(self, root: Path, batch_size: int, workers: int, limit: int | None,
                 cmd: list[str] | None = None) -> None:
        cmd = cmd or [sys.executable, __file__, "--reference-worker", str(root), "--batch-size", str(batch_size),
                      "--workers", str(workers), *(["--limit", str(limit)] if limit else [])]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def time(self, name: str, steps: int) -> float:
        self.proc.stdin.write(f"{name} {steps}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the worker process ended (exit code {self.proc.wait()})")
        return float(line)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def reference_worker(root: str, batch_size: int, workers: int, limit: int | None) -> None:
    """The other end of ``ReferenceProcess``: one line ``MODEL STEPS`` in, images/s out."""
    loader = reference_loader(Path(root), batch_size, workers, limit)
    for line in sys.stdin:
        name, steps = line.split()
        torch.manual_seed(0)
        print(time_reference(make_model(name), loader, int(steps)), flush=True)


def make_opt(model, steps: int):
    recipe = Recipe()
    opt = build_optimizer(model, recipe)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=steps + 10,
                                                pct_start=recipe.pct_start)
    return opt, sched


def time_reference(model, loader, steps: int) -> float:
    """Images/s of the notebook-style loop over ``steps`` steps (after one warm-up batch)."""
    opt, sched = make_opt(model, steps + 1)
    criterion = torch.nn.CrossEntropyLoss()
    model.train()
    it = iter(loader)

    def batch():
        nonlocal it
        try:
            return next(it)
        except StopIteration:
            it = iter(loader)
            return next(it)

    x, y = batch()  # warm-up: workers started, first batches prefetched
    t0 = None
    seen = 0
    running = 0.0
    for step in range(steps + 1):
        if step == 1:
            t0, seen = time.perf_counter(), 0
        x, y = batch()
        out = model(x)
        loss = criterion(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        running += loss.item()  # what a notebook's progress bar does each step
        seen += len(y)
    elapsed = time.perf_counter() - t0
    del it  # stop the workers now, so their prefetching cannot slow the next pipeline's timing
    return seen / elapsed


def time_mnistkit(model, batches: TrainBatches, steps: int, bf16: bool, channels_last: bool,
                  backend: str = "torch") -> float:
    """Images/s of mnistkit's training step with ``backend`` (prepared as the trainer does: in
    channels_last where the model runs in it)."""
    channels_last = backends.choose_layout(model, torch.device("cpu"), channels_last, bf16).channels_last
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = backends.prepare(model, backend, torch.device("cpu"), channels_last).model
    opt, sched = make_opt(model, steps + 1)
    model.train()
    it = iter(batches)
    t0 = None
    seen = 0
    loss_sum = torch.zeros(())
    for step in range(steps + 1):
        if step == 1:
            t0, seen = time.perf_counter(), 0
        try:
            x, y = next(it)
        except StopIteration:
            it = iter(batches)
            x, y = next(it)
        loss, _ = train_step(model, x, y, opt, scheduler=sched, bf16=bf16, channels_last=channels_last)
        loss_sum += loss
        seen += len(y)
    float(loss_sum)  # one sync at the end, as the trainer syncs only every SYNC_SECONDS
    return seen / (time.perf_counter() - t0)


def default_rate(name: str, batches: TrainBatches, steps: int) -> float:
    """Images/s of ``name``'s default training step (default recipe's precision, layout and
    backend): what a baseline worker calls on this version (see baseline_worker.py)."""
    recipe, cpu = Recipe(), torch.device("cpu")
    bf16 = resolve_precision(recipe.precision, cpu) == "bf16"
    return time_mnistkit(make_model(name), batches, steps, bf16, recipe.channels_last, recipe.backend)


def full_reference_run(name: str, root: Path, data_dir: Path, workers: int, experiments: str) -> dict:
    """Train ``name`` for its whole recipe (epochs, LR, OneCycleLR, batch 256) with the reference
    pipeline, evaluating on the test set after every epoch: the accuracy to set beside mnistkit's.
    It runs in this process, so its seconds are with freed memory kept (the speed comparison is
    the timed repeats, where the reference has a process of its own)."""
    from mnistkit.experiments import resolve_recipe

    recipe = resolve_recipe(name, experiments)
    torch.manual_seed(recipe.seed)
    loader = reference_loader(root, recipe.batch_size, workers, None)
    model = build(resolve(name), recipe.model_kwargs())[0]
    opt = build_optimizer(model, recipe)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, epochs=recipe.epochs,
                                                steps_per_epoch=len(loader), pct_start=recipe.pct_start,
                                                div_factor=recipe.div_factor, final_div_factor=recipe.final_div_factor)
    test = EvalBatches(load_mnist("test", data_dir, download=False), recipe.test_batch_size, torch.device("cpu"))
    criterion = torch.nn.CrossEntropyLoss()
    curve, t0 = [], time.perf_counter()
    for _ in range(recipe.epochs):
        model.train()
        for x, y in loader:
            loss = criterion(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            loss.item()
        curve.append(round(evaluate(model, test).acc, 2))
    return {"model": name, "epochs": recipe.epochs, "final_test_acc": curve[-1], "best_test_acc": max(curve),
            "best_epoch": curve.index(max(curve)) + 1, "seconds": round(time.perf_counter() - t0, 1),
            "test_acc_curve": curve}


def matmul_gflops(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of an ``n`` x ``n`` matrix multiply in ``dtype`` with this process's threads:
    the median of ``repeats`` timed products after one warm-up."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times) / 1e9


class Ceilings:
    """The matmul rate in each precision, sampled next to every training measurement (the
    rate of this machine drifts by 2x between minutes), summarised as the median of all samples."""

    def __init__(self) -> None:
        self.samples: dict[str, list[float]] = {"fp32": [], "bf16": []}

    def sample(self) -> None:
        self.samples["fp32"].append(matmul_gflops(torch.float32, repeats=3))
        if resolve_precision("auto", torch.device("cpu")) == "bf16":
            self.samples["bf16"].append(matmul_gflops(torch.bfloat16, repeats=3))

    def rate(self, precision: str) -> float | None:
        values = self.samples.get(precision) or []
        return statistics.median(values) if values else None


def fraction(gflops: float, ceiling: float | None) -> float | None:
    """Training GFLOP/s over the matmul ceiling of the same precision; ``None`` when there is
    no ceiling, or when the ratio exceeds 1 (then the ceiling measurement was disturbed and no
    fraction is reported rather than an impossible one)."""
    if not ceiling:
        return None
    value = gflops / ceiling
    return round(value, 3) if value <= 1 else None


def time_process(args: list[str], repeats: int = 5) -> float:
    exe = shutil.which("mnistkit") or str(Path(sys.executable).parent / "mnistkit")
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([exe, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _absolute(reference: str) -> str:
    """A file reference with its file's absolute path (the baseline runs in its own folder)."""
    target, sep, attr = reference.rpartition(":") if ".py:" in reference else (reference, "", "")
    path = Path(target)
    return f"{path.resolve()}{sep}{attr}" if target.endswith((".py", ".yaml", ".yml")) and path.exists() else reference


def whole_process(model: str, root: Path, data_dir: Path, workers: int, repeats: int,
                  limit: int | None = None, baseline: str | None = None, with_torch: bool = False) -> dict:
    """Seconds from process start to exit for one epoch of ``model`` with its test evaluation:
    ``python -m mnistkit train MODEL --epochs 1`` against ``bench/reference_epoch.py`` (and the
    mnistkit in ``baseline``, run in that folder: ``python -m`` puts the current folder first on
    the path, before PYTHONPATH; and, ``with_torch``, this version with ``--backend torch``),
    alternating, medians of ``repeats``."""
    runs = Path(tempfile.mkdtemp(prefix="mnistkit-bench-runs-"))
    extra = ["--limit", str(limit)] if limit else []
    model = _absolute(model)
    train = [sys.executable, "-m", "mnistkit", "train", model, "--epochs", "1", "--data-dir",
             str(Path(data_dir).resolve()), "--runs-dir", str(runs), "--quiet", *extra]
    here = Path(__file__).resolve().parent.parent
    commands = {"mnistkit": (train, here),
                "reference": ([sys.executable, str(Path(__file__).resolve().with_name("reference_epoch.py")),
                               str(Path(root).resolve()), model, "--workers", str(workers), *extra], here)}
    if with_torch:
        commands["torch"] = ([*train, "--backend", "torch"], here)
    skipped = None
    if baseline:
        tree = Path(baseline).resolve()
        found = subprocess.run([sys.executable, "-c", "import mnistkit; print(mnistkit.__file__)"], cwd=tree,
                               capture_output=True, text=True).stdout.strip()
        if not found or not Path(found).resolve().is_relative_to(tree):   # else the installed one would be timed
            raise SystemExit(f"--baseline {baseline}: python -m mnistkit there imports {found or 'nothing'}, "
                             "not a mnistkit of that folder")
        commands["baseline"] = (train, tree)
    try:
        for key, (cmd, cwd) in list(commands.items()):   # untimed: each version's kernel built into its cache
            if key != "reference":
                done = subprocess.run([*cmd, "--limit", "256"] if not limit else cmd, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True, cwd=cwd)
                if done.returncode and key == "baseline":   # e.g. an older mnistkit that cannot build this model
                    skipped = (done.stderr.strip().splitlines() or ["failed"])[-1][:200]
                    del commands[key]
                elif done.returncode:
                    raise SystemExit(f"{' '.join(cmd)} failed: {done.stderr.strip()[-400:]}")
        times: dict[str, list[float]] = {k: [] for k in commands}
        for _ in range(repeats):
            for key, (cmd, cwd) in commands.items():
                t0 = time.perf_counter()
                subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, cwd=cwd)
                times[key].append(time.perf_counter() - t0)
    finally:
        shutil.rmtree(runs, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {"model": model, "epochs": 1}
    for key in commands:
        out[f"{key}_seconds"] = round(med[key], 2)
        out[f"{key}_runs"] = [round(v, 2) for v in times[key]]
    out["speedup"] = round(med["reference"] / med["mnistkit"], 2)
    if "baseline" in med:
        out["baseline_speedup"] = round(med["reference"] / med["baseline"], 2)
    if skipped:
        out["baseline_skipped"] = skipped
    if with_torch:
        out["torch_speedup"] = round(med["reference"] / med["torch"], 2)
        out["fused_over_torch"] = round(med["torch"] / med["mnistkit"], 2)
    return out


def print_report(results: dict) -> None:
    """The results as markdown (what the README quotes)."""
    m, mm = results["machine"], results["matmul_gflops"]
    ceil = ", ".join(f"{k} {v:,.0f} GFLOP/s" for k, v in mm.items() if v)
    print(f"Machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads, torch {m['torch']}")
    if m.get("reference_process") == "own":   # runs from 0.8 on
        print(f"Freed memory kept for reuse in mnistkit's process, as its training does: {m['kept_memory']}; "
              "the reference timed in a process of its own (malloc as it comes), alternating")
    print(f"Matmul ceilings (2048x2048, {m['torch_threads']} threads, median of {len(results['matmul_samples']['fp32'])} "
          f"samples taken between the training repeats): {ceil}")
    st = results['settings']
    print(f"{st['repeats']} alternating repeats of {st['steps']} steps, batch {st['batch_size']}; medians\n")

    def pct(v):
        return "n/a" if v is None else f"{100 * v:.0f}%"

    if results["models"]:   # none where only whole processes were timed
        print("| model | reference img/s | mnistkit fp32 img/s (speed-up) | mnistkit default step img/s "
              "(speed-up) | train GFLOP/s fp32 / default precision | of fp32 ceiling (fp32 step) | of its precision's "
              "ceiling | eval img/s |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in results["models"].items():
        mode = r["mnistkit_precision"] + (" + channels_last" if r["mnistkit_channels_last"] else "")
        mode += f" + backend {r['mnistkit_backend']}"
        print(f"| {name} | {r['reference_images_per_s']:,.0f} | {r['mnistkit_fp32_images_per_s']:,.0f} "
              f"({r['speedup_fp32']:.2f}x) | {r['mnistkit_images_per_s']:,.0f} ({r['speedup']:.2f}x, {mode}) | "
              f"{r['train_gflops_fp32']:.1f} / {r['train_gflops']:.1f} | {pct(r['fraction_of_matmul_fp32'])} | "
              f"{pct(r['fraction_of_matmul'])} of {r['ceiling']} | {r['eval_images_per_s']:,.0f} |")
    others = {n: r for n, r in results["models"].items() if r.get("mnistkit_other_images_per_s")}
    for n, r in others.items():
        alt, default = r["mnistkit_other_images_per_s"], r["mnistkit_images_per_s"]
        fused_ips, torch_ips = (alt, default) if r["mnistkit_other_backend"] == "fused" else (default, alt)
        print(f"\n{n}, the step with --backend {r['mnistkit_other_backend']} (same repeats): {alt:,.0f} img/s "
              f"({alt / r['reference_images_per_s']:.2f}x the reference); the fused kernel gains "
              f"{fused_ips / torch_ips:.2f}x", end="")
    if others:
        print()
    based = {n: r for n, r in results["models"].items() if r.get("baseline_images_per_s")}
    if based:
        print(f"\n| model | baseline ({results['settings']['baseline']}) default step img/s | vs reference | "
              "this version's default step img/s | vs reference | this / baseline |\n|---|---:|---:|---:|---:|---:|")
        for n, r in based.items():
            print(f"| {n} | {r['baseline_images_per_s']:,.0f} | {r['baseline_speedup']:.2f}x | "
                  f"{r['mnistkit_images_per_s']:,.0f} | {r['speedup']:.2f}x | {r['vs_baseline']:.2f}x |")
    whole = results.get("whole_process") or []
    for w in [whole] if isinstance(whole, dict) else whole:
        print(f"\nWhole process, one epoch of {w['model']} with its test evaluation (median of "
              f"{len(w['mnistkit_runs'])} alternating): `mnistkit train {w['model']} --epochs 1` "
              f"{w['mnistkit_seconds']:.1f} s, reference {w['reference_seconds']:.1f} s ({w['speedup']:.2f}x)", end="")
        if w.get("baseline_seconds"):
            print(f"; baseline {w['baseline_seconds']:.1f} s ({w['baseline_speedup']:.2f}x)", end="")
        if w.get("torch_seconds"):
            print(f"; `--backend torch` {w['torch_seconds']:.1f} s ({w['torch_speedup']:.2f}x; the kernels "
                  f"{w['fused_over_torch']:.2f}x)", end="")
    for name, r in results.get("reference_full_runs", {}).items():
        print(f"\nreference pipeline, full run of {name} ({r['epochs']} epochs): final test acc "
              f"{r['final_test_acc']:.2f}%, best {r['best_test_acc']:.2f}% (epoch {r['best_epoch']}), "
              f"{r['seconds']:.0f} s", end="")
    for cmd, sec in results.get("cli_seconds", {}).items():
        print(f"\n`{cmd}`: {sec:.3f} s (median of {results['settings'].get('cli_repeats', '?')} processes)", end="")
    print()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", help="folder with the MNIST IDX files (required unless --from-json)")
    ap.add_argument("--models", default="I1,I3", help="comma-separated model references (a registered name, "
                                                       "FILE.py:Name, ...)")
    ap.add_argument("--steps", type=int, default=60, help="timed steps per repeat and pipeline")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers of the reference")
    ap.add_argument("--limit", type=int, default=None, help="use only N training images (tests)")
    ap.add_argument("--cli-repeats", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--full-run", default="", help="also train these models (comma-separated) for their whole "
                                                   "recipe with the reference pipeline and report test accuracy")
    ap.add_argument("--experiments", default="experiments.yaml")
    ap.add_argument("--whole-process", default="", metavar="MODELS",
                    help="also time one epoch of each of MODELS (comma-separated registered names or FILE.py:Name, "
                         "what bench/reference_epoch.py builds) as whole processes: `mnistkit train MODEL --epochs 1` "
                         "against bench/reference_epoch.py")
    ap.add_argument("--whole-repeats", type=int, default=3)
    ap.add_argument("--whole-torch", action="store_true",
                    help="also time the whole process with --backend torch: what mnistkit's kernels give a whole run")
    ap.add_argument("--baseline", default=None, metavar="DIR",
                    help="also time the default step (and --whole-process epoch) of the mnistkit source tree in DIR")
    ap.add_argument("--from-json", default=None, metavar="FILE",
                    help="print the report of an earlier --json run instead of measuring")
    ap.add_argument("--reference-worker", default=None, metavar="ROOT", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.reference_worker:
        reference_worker(args.reference_worker, args.batch_size, args.workers, args.limit)
        return {}
    if args.from_json:
        results = json.loads(Path(args.from_json).read_text())
        print_report(results)
        return results
    if not args.data_dir:
        ap.error("--data-dir is required to measure")

    # as the mnistkit command does: freed memory kept for reuse (process-wide: the reference and a
    # baseline run in processes of their own)
    allocator = keep_freed_memory()
    data_dir = Path(args.data_dir)
    train = load_mnist("train", data_dir, download=False)
    test = load_mnist("test", data_dir, download=False)
    if args.limit:
        train, test = train.head(args.limit), test.head(args.limit)
    device = torch.device("cpu")
    work = Path(tempfile.mkdtemp(prefix="mnistkit-bench-"))
    results: dict = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "torch": str(torch.__version__),
                    "kept_memory": allocator, "reference_process": "own"},
        "settings": {"steps": args.steps, "repeats": args.repeats, "batch_size": args.batch_size,
                     "workers": args.workers, "cli_repeats": args.cli_repeats, "baseline": args.baseline},
        "models": {},
    }
    reference = baseline = None
    try:
        root = torchvision_root(data_dir, work)
        reference = ReferenceProcess(root, args.batch_size, args.workers, args.limit)
        if args.baseline:
            baseline = ReferenceProcess(root, args.batch_size, args.workers, args.limit, cmd=[
                sys.executable, str(Path(__file__).with_name("baseline_worker.py")), args.baseline, str(data_dir),
                "--batch-size", str(args.batch_size), *(["--limit", str(args.limit)] if args.limit else [])])
        ceilings = Ceilings()
        for name in [m for m in args.models.split(",") if m]:
            macs = summarize(make_model(name)).mult_adds
            registered = resolve(name).kind == "registered"   # what a baseline tree's worker can build
            ref, mk, mk32, mk_other, base = [], [], [], [], []
            gen = torch.Generator().manual_seed(0)
            batches = TrainBatches(train, args.batch_size, device, Augment(), gen)
            default = Recipe()
            bf16 = resolve_precision(default.precision, device) == "bf16"
            backend = backends.resolve(default.backend, device)[0]
            # the other backend beside the default, where the kernels run here
            other = ("torch" if backend == "fused" else "fused" if backends.resolve("auto", device)[0] == "fused"
                     else None)
            for _ in range(args.repeats):  # alternate, so drift hits all alike
                ceilings.sample()
                ref.append(reference.time(name, args.steps))
                torch.manual_seed(0)
                mk.append(time_mnistkit(make_model(name), batches, args.steps, bf16, default.channels_last, backend))
                if other:  # the same step with the other BatchNorm + ReLU: what the kernel gains
                    torch.manual_seed(0)
                    mk_other.append(time_mnistkit(make_model(name), batches, args.steps, bf16,
                                                  default.channels_last, other))
                if baseline and registered:
                    base.append(baseline.time(name, args.steps))
                torch.manual_seed(0)
                mk32.append(time_mnistkit(make_model(name), batches, args.steps, False, False))
            model = make_model(name)
            layout = backends.choose_layout(model, device, default.channels_last, bf16).channels_last
            if layout:
                model = model.to(memory_format=torch.channels_last)
            eval_batches = EvalBatches(test, default.test_batch_size, device, channels_last=layout)
            evaluate(model, eval_batches)
            ev = []
            for _ in range(3):
                t0 = time.perf_counter()
                evaluate(model, eval_batches)
                ev.append(len(test) / (time.perf_counter() - t0))
            ceilings.sample()
            ref_ips, mk_ips, mk32_ips = statistics.median(ref), statistics.median(mk), statistics.median(mk32)
            gflops, gflops32 = mk_ips * 6 * macs / 1e9, mk32_ips * 6 * macs / 1e9
            precision = "bf16" if bf16 else "fp32"
            results["models"][name] = {
                "mult_adds": macs, "reference_images_per_s": round(ref_ips, 1),
                "mnistkit_precision": "bf16" if bf16 else "fp32", "mnistkit_channels_last": default.channels_last,
                "mnistkit_images_per_s": round(mk_ips, 1), "speedup": round(mk_ips / ref_ips, 2),
                "mnistkit_fp32_images_per_s": round(mk32_ips, 1), "speedup_fp32": round(mk32_ips / ref_ips, 2),
                "reference_runs": [round(v, 1) for v in ref], "mnistkit_runs": [round(v, 1) for v in mk],
                "mnistkit_fp32_runs": [round(v, 1) for v in mk32],
                "mnistkit_backend": backend, "mnistkit_other_backend": other,
                "mnistkit_other_images_per_s": round(statistics.median(mk_other), 1) if mk_other else None,
                "mnistkit_other_runs": [round(v, 1) for v in mk_other],
                "train_gflops": round(gflops, 2), "train_gflops_fp32": round(gflops32, 2),
                "ceiling": precision, "fraction_of_matmul": fraction(gflops, ceilings.rate(precision)),
                "fraction_of_matmul_fp32": fraction(gflops32, ceilings.rate("fp32")),
                "eval_images_per_s": round(statistics.median(ev), 1),
            }
            if base:
                base_ips = statistics.median(base)
                results["models"][name].update({
                    "baseline_images_per_s": round(base_ips, 1), "baseline_speedup": round(base_ips / ref_ips, 2),
                    "baseline_runs": [round(v, 1) for v in base], "vs_baseline": round(mk_ips / base_ips, 2)})
        for r in results["models"].values():   # against the ceilings of the whole run, as reported
            r["fraction_of_matmul"] = fraction(r["train_gflops"], ceilings.rate(r["ceiling"]))
            r["fraction_of_matmul_fp32"] = fraction(r["train_gflops_fp32"], ceilings.rate("fp32"))
        results["matmul_gflops"] = {k: round(v, 1) if v else None for k in ("fp32", "bf16")
                                    for v in [ceilings.rate(k)]}
        results["matmul_samples"] = {k: [round(v, 1) for v in vs] for k, vs in ceilings.samples.items()}
        results["whole_process"] = [whole_process(name, root, data_dir, args.workers, args.whole_repeats, args.limit,
                                                  args.baseline, args.whole_torch)
                                    for name in args.whole_process.split(",") if name]
        for name in [m for m in args.full_run.split(",") if m]:
            results.setdefault("reference_full_runs", {})[name] = full_reference_run(
                name, root, data_dir, args.workers, args.experiments)
    finally:
        for worker in (reference, baseline):
            if worker is not None:
                worker.close()
        shutil.rmtree(work, ignore_errors=True)
    if args.cli_repeats:
        results["cli_seconds"] = {"mnistkit --help": round(time_process(["--help"], args.cli_repeats), 3),
                                  "mnistkit summary I3": round(time_process(["summary", "I3"], args.cli_repeats), 3)}
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print_report(results)
    return results


if __name__ == "__main__":
    main()
