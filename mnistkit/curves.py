"""Training curves of chosen runs, whatever they were (a 2-epoch try on 5,000 images as well as a
comparable run): each run's per-epoch figures with a label that says what it was (model, epochs,
data, seed). ``render.curves_png`` draws them; ``mnistkit plot`` and ``mnistkit report`` use it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mnistkit.errors import RunError, UsageError
from mnistkit.metrics import EpochMetrics
from mnistkit.runs import find_runs, read_config, read_metrics

__all__ = ["RunCurve", "run_curve", "run_curves"]

MAX_RUNS = 50  # one picture stays readable


@dataclass(frozen=True)
class RunCurve:
    run: str
    label: str     # model, epochs done/planned, data, seed
    group: str     # what runs of one kind share (the model), for colours
    metrics: tuple[EpochMetrics, ...]


def run_curve(run: str | Path, group: str | None = None) -> RunCurve:
    config, metrics = read_config(run), read_metrics(Path(run))
    if not metrics:
        raise RunError(f"{run} has no finished epoch yet: nothing to plot")
    on = config.measured_on
    images = on.get("train_samples") or config.data.limit
    data = f"{config.data.dataset}" + (f" {images:,} images" if images else "")
    if on.get("val_samples"):
        data += f", {on['val_samples']:,} held out"
    epochs = f"{len(metrics)}/{config.recipe.epochs} epochs" if len(metrics) < config.recipe.epochs \
        else f"{len(metrics)} epoch{'s' * (len(metrics) != 1)}"
    label = f"{config.model}, {epochs}, {data}, seed {config.recipe.seed}"
    return RunCurve(str(run), label, group or config.model, tuple(metrics))


def run_curves(targets: list[str]) -> list[RunCurve]:
    """The runs named: run folders, or folders of runs (every run folder in them)."""
    folders: list[Path] = []
    for target in targets:
        path = Path(target)
        if (path / "config.yaml").is_file():
            folders.append(path)
        elif path.is_dir():
            found = find_runs(path)
            if not found:
                raise UsageError(f"{target} is neither a run folder nor a folder of runs")
            folders += found
        else:
            why = "a file, not a folder" if path.exists() else "no such folder"
            raise UsageError(f"{target} is not a run folder ({why})")
    folders = list(dict.fromkeys(folders))
    if len(folders) > MAX_RUNS:
        raise UsageError(f"{len(folders)} runs in one picture is too many to read; name at most {MAX_RUNS}")
    return [run_curve(p) for p in folders]
