"""Training curves of chosen runs, whatever they were (a 2-epoch try on 5,000 images as well as a
comparable run): each run's per-epoch figures and the step losses it recorded, with a label
that says what it was. Overlaid runs are labelled by what differs between them (the model, a
recipe key, the data, the epochs, the seed: computed from the recipes the runs recorded), and
what they share is said once (``shared``). ``render.curves_png`` draws them; ``mnistkit plot``
and ``mnistkit report`` use it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mnistkit.errors import RunError, UsageError
from mnistkit.runs.metrics import EpochMetrics
from mnistkit.runs import RunConfig, find_runs, read_config, read_metrics

__all__ = ["RunCurve", "run_curve", "run_curves", "label_by_differences", "shared_facts"]

MAX_RUNS = 50  # one picture stays readable
# how a step computes, not what it learns (compare ignores them too): never a label's difference
_HOW = {"test_batch_size", "channels_last", "backend"}
_LAST = ("data", "epochs", "seed")   # said after the recipe keys, in this order


@dataclass(frozen=True)
class RunCurve:
    run: str
    label: str     # what differs from the other runs drawn with it (alone: model, epochs, data, seed)
    group: str     # what runs of one colour share: the run itself in a plot, an iteration in the report
    metrics: tuple[EpochMetrics, ...]
    facts: dict[str, str] = field(default_factory=dict)   # model, every recipe key, data, epochs, seed

    @property
    def described(self) -> str:
        """The run on its own: model, epochs, data, seed."""
        f = self.facts
        return f"{f['model']}, {f['epochs']}, {f['data']}, seed {f['seed']}" if f else self.label


def _value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def run_facts(config: RunConfig, metrics: list[EpochMetrics]) -> dict[str, str]:
    """What a run was, key by key, as text: its model, every key of its recorded recipe
    (``augment.degrees``...) but those that change how a step computes and not what it learns
    (test_batch_size, channels_last, backend), its data, the epochs it ran and its seed."""
    on = config.measured_on
    images = on.get("train_samples") or config.data.limit
    data = f"{config.data.dataset}" + (f" {images:,} images" if images else "")
    if on.get("val_samples"):
        data += f", {on['val_samples']:,} held out"
    planned = config.recipe.epochs
    epochs = f"{len(metrics)}/{planned} epochs" if len(metrics) < planned \
        else f"{len(metrics)} epoch{'s' * (len(metrics) != 1)}"
    facts = {"model": config.model}
    for key, value in config.recipe.to_dict().items():
        if key in ("epochs", "seed") or key in _HOW:
            continue
        if isinstance(value, dict):
            facts.update({f"{key}.{k}": _value(v) for k, v in value.items()})
        else:
            facts[key] = _value(value)
    facts.update({"data": data, "epochs": epochs, "seed": str(config.recipe.seed)})
    return facts


def _fact_text(key: str, value: str) -> str:
    if key in ("model", "data", "epochs"):
        return value
    return f"{key} {value}"


def label_by_differences(curves: list[RunCurve]) -> list[RunCurve]:
    """Each run labelled by the facts that differ between the runs (model first, then recipe
    keys, then data, epochs, seed); runs alike in every fact also by their folder's name."""
    if len(curves) < 2:
        return [dataclasses.replace(c, label=c.described) for c in curves]
    keys: list[str] = []
    for c in curves:
        keys += [k for k in c.facts if k not in keys]
    order = [k for k in keys if k not in _LAST] + [k for k in _LAST if k in keys]
    differ = [k for k in order if len({c.facts.get(k, "-") for c in curves}) > 1]
    labels = [", ".join(_fact_text(k, c.facts.get(k, "-")) for k in differ) for c in curves]
    seen = {label: labels.count(label) for label in labels}
    labels = [(f"{label} ({Path(c.run).name})" if label else Path(c.run).name) if seen[label] > 1 else label
              for label, c in zip(labels, curves)]
    return [dataclasses.replace(c, label=label) for c, label in zip(curves, labels)]


def shared_facts(curves: list[RunCurve]) -> str:
    """What every run drawn shares of model, data, epochs and seed, in one line ('' when nothing)."""
    if not curves:
        return ""
    parts = []
    for key in ("model", "data", "epochs", "seed"):
        values = {c.facts.get(key) for c in curves}
        if len(values) == 1 and None not in values:
            parts.append(_fact_text(key, values.pop()))
    return ", ".join(parts)


def run_curve(run: str | Path, group: str | None = None) -> RunCurve:
    config, metrics = read_config(run), read_metrics(Path(run))
    if not metrics:
        raise RunError(f"{run} has no finished epoch yet: nothing to plot")
    facts = run_facts(config, metrics)
    curve = RunCurve(str(run), "", group or config.model, tuple(metrics), facts)
    return dataclasses.replace(curve, label=curve.described)


def run_curves(targets: list[str]) -> list[RunCurve]:
    """The runs named: run folders, or folders of runs (every run folder in them), each labelled
    by what differs between them and coloured on its own."""
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
    curves = [run_curve(p, group=str(p)) for p in folders]
    return label_by_differences(curves)
