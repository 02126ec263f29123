"""Which runs stand for an iteration of the change-log: the *comparable* ones, trained on the
official MNIST files, on the whole training set (no limit, no validation split held out), for all
the epochs of the iteration's recipe, with that recipe (the seed aside), of the model the
iteration names as it computes now; and, for every other run, why not. ``results.compare``
aggregates them; ``training.distill`` takes an iteration's newest one as a teacher.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from mnistkit.errors import MnistkitError
from mnistkit.experiments import Iteration
from mnistkit.recipe import Recipe
from mnistkit.runs import RunConfig, find_runs, read_config, read_metrics
from mnistkit.runs.metrics import EpochMetrics, best_row, selected_on

# recipe keys that do not change what is learned (or that a run is allowed to choose): the
# memory layout and the backend (the same network and step up to rounding; the kernel's
# accuracy pairs are in the README's Results).
_IGNORED = {"seed", "test_batch_size", "channels_last", "backend"}
CONSISTENT_EPOCHS = 3  # "the target holds in each of the last 3 epochs"


def at_target(metrics: list[EpochMetrics], target: float | None) -> tuple[bool, bool]:
    """The pass/fail rule of a run, the one place it is written: (its final test accuracy reaches
    ``target``, the target holds in each of its last ``CONSISTENT_EPOCHS`` epochs)."""
    if target is None or not metrics:
        return False, False
    last = metrics[-CONSISTENT_EPOCHS:]
    return (metrics[-1].test_acc >= target,
            len(metrics) >= CONSISTENT_EPOCHS and all(r.test_acc >= target for r in last))


def _recipe_differences(run: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    diffs = []
    for key, value in wanted.items():
        if key in _IGNORED or (key == "precision" and value == "auto"):
            continue
        if key.startswith("distill_") and not wanted.get("teacher") and not run.get("teacher"):
            continue   # no teacher: its settings teach nothing
        if key == "augment":
            for k, v in value.items():
                if run.get("augment", {}).get(k) != v:
                    diffs.append(f"augment.{k} {run.get('augment', {}).get(k)!r} (change-log: {v!r})")
        elif run.get(key) != value:
            diffs.append(f"{key} {run.get(key)!r} (change-log: {value!r})")
    return diffs


def run_record(run: Path, config: RunConfig, metrics: list[EpochMetrics], wanted: Recipe,
               threshold: float | None, model_changed: str | None = None) -> dict[str, Any]:
    """One run as compare sees it: provenance, figures, and whether it is comparable (and why not)."""
    recipe = config.recipe.to_dict()
    on = config.measured_on
    final, best = metrics[-1], best_row(metrics)
    planned = recipe.get("epochs")
    why_not = [model_changed] if model_changed else []
    if not on:
        why_not.append("recorded before mnistkit checked its data")
    elif on.get("dataset") != "mnist":
        why_not.append(f"{on.get('dataset')} data")
    elif not on.get("official_mnist"):
        why_not.append("MNIST files that differ from the official release")
    if on and (on.get("val_samples") or not on.get("full_training_set")) and on.get("dataset") == "mnist":
        why_not.append(f"{on.get('train_samples', 0):,} training images, not the whole training set"
                       + (f" ({on['val_samples']:,} held out for validation)" if on.get("val_samples") else ""))
    if final.epoch != planned:
        why_not.append(f"{final.epoch} of {planned} epochs")
    why_not += _recipe_differences(recipe, wanted.to_dict())
    passes, consistent = at_target(metrics, threshold)
    last = metrics[-CONSISTENT_EPOCHS:]
    return {
        "run": str(run),
        "seed": recipe.get("seed"),
        "dataset": on.get("dataset") or config.data.dataset,
        "official_mnist": bool(on.get("official_mnist")),
        "train_samples": on.get("train_samples"),
        "val_samples": on.get("val_samples", 0),
        "test_samples": on.get("test_samples"),
        "epochs": final.epoch,
        "planned_epochs": planned,
        "lr": recipe.get("lr"),
        "scheduler": recipe.get("scheduler"),
        "precision": recipe.get("precision"),
        "comparable": not why_not,
        "model_changed": model_changed is not None,   # trained an earlier version of the model
        "why_not": why_not,
        "train_acc": final.train_acc,
        "test_acc": final.test_acc,
        "val_acc": final.val_acc,
        "best_selected_on": selected_on(metrics),
        "best_epoch": best.epoch,
        "best_test_acc": best.test_acc,
        "last_epochs_test_acc": [r.test_acc for r in last],
        "consistent": consistent,
        "passes": passes,
        "first_epoch_at_target": next((r.epoch for r in metrics if threshold is not None and r.test_acc >= threshold),
                                      None),
        "gap": final.train_acc - final.test_acc,
        "seconds": round(sum(r.seconds for r in metrics), 1),
        "seconds_per_epoch": round(statistics.median(r.seconds for r in metrics), 2),
        "test_acc_curve": [r.test_acc for r in metrics],
        "teacher": config.teacher,   # the run that taught it (distill.py), None: none
    }


def read_runs(runs_dir: str | Path) -> tuple[list[tuple[Path, RunConfig, list[EpochMetrics]]], list[dict[str, str]]]:
    """Every run folder under ``runs_dir`` with at least one finished epoch, oldest first, and
    the damaged ones (with why): one bad folder is reported, and must not hide the rest."""
    good, damaged = [], []
    for run in find_runs(runs_dir):
        try:
            config = read_config(run)
            metrics = read_metrics(run)
        except MnistkitError as exc:
            damaged.append({"run": str(run), "why": str(exc)})
            continue
        if metrics:
            good.append((run, config, metrics))
    return good, damaged


def _model_change(config: RunConfig, source: Any) -> tuple[bool, str | None]:
    """(the run is of this iteration's model, why it no longer trains the same one). A run
    recorded with its architecture counts while the model computes the same (``identity``),
    wherever its file lies and however it reads; one recorded before 0.12, while its file's
    content is the same."""
    from mnistkit.usermodels.identity import first_difference

    rs = config.model_source
    if rs is None:   # recorded before 0.10: a registered name
        return source.kind == "registered" and config.model.lower() == source.name.lower(), None
    mine = rs.name.lower() == source.name.lower() or rs.reference == source.reference or \
        (rs.kind != "registered" and (rs.kind, rs.path, rs.module, rs.attr) == (source.kind, source.path,
                                                                                  source.module, source.attr))
    if not mine or rs.same_model(source):
        return mine, None
    if rs.fingerprint and source.fingerprint:
        if rs.fingerprint != source.fingerprint and rs.layers != source.layers:
            return True, f"the model changed since this run: {first_difference(list(rs.layers), list(source.layers))}"
        return True, f"model_args {rs.kwargs} (change-log: {source.kwargs})"
    if rs.kind != source.kind or (rs.path, rs.module, rs.attr) != (source.path, source.module, source.attr):
        return True, f"trained {rs.reference}, the change-log's model is now {source.reference}"
    if rs.sha256 != source.sha256:
        return True, "model source changed since this run"
    return True, f"model_args {rs.kwargs} (change-log: {source.kwargs})"


def earlier_version(row: dict[str, Any]) -> str:
    """Where an iteration's runs trained an earlier version of its model: which layer changed."""
    changed = [w for r in row["other_runs"] for w in r["why_not"] if "changed since this run" in w]
    return (f" ({len(changed)} run(s) of {row['id']} trained an earlier version: {changed[0]})" if changed else "")


def iteration_runs(runs: list[tuple[Path, RunConfig, list[EpochMetrics]]], it: Iteration, wanted: Recipe,
                   threshold: float | None, source: Any) -> list[dict[str, Any]]:
    """The runs of the iteration's model; those of an older version of it (its source or its
    arguments since changed) are never comparable."""
    out = []
    for run, config, metrics in runs:
        mine, changed = _model_change(config, source)
        if mine:
            out.append(run_record(run, config, metrics, wanted, threshold, changed))
    return out
