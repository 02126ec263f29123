"""The change-log report: what each iteration reported beside what the registry and the runs
measure, the deltas between iterations, and the assignment checklist. Pure data: no text is
formatted here; ``render`` draws it as tables and writes it as markdown, CSV or JSON.

Only *comparable* runs stand for an iteration: trained on the official MNIST files, on the
whole training set (no limit, no validation split held out), for all the epochs of the
iteration's recipe from the change-log, with that recipe (the seed aside: several seeds are
aggregated). Every other run is an experiment: reported apart, on request, never a check mark.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from mnistkit.errors import MnistkitError
from mnistkit.experiments import Experiments, Iteration
from mnistkit.recipe import DEFAULT_BUDGET, DEFAULT_RUNS_DIR, Recipe
from mnistkit.metrics import EpochMetrics, best_row, selected_on
from mnistkit.runs import RunConfig, find_runs, read_config, read_metrics

# recipe keys that do not change what is learned (or that a run is allowed to choose): the
# memory layout and the backend (the same network and step up to rounding; the kernel's
# accuracy pairs are in the README's Results). Runs of 0.7/0.8 recorded shards and bn_relu,
# read as backend (runs.read_config)
_IGNORED = {"seed", "test_batch_size", "channels_last", "backend"}
CONSISTENT_EPOCHS = 3  # "the target holds in each of the last 3 epochs"


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
        "why_not": why_not,
        "train_acc": final.train_acc,
        "test_acc": final.test_acc,
        "val_acc": final.val_acc,
        "best_selected_on": selected_on(metrics),
        "best_epoch": best.epoch,
        "best_test_acc": best.test_acc,
        "last_epochs_test_acc": [r.test_acc for r in last],
        "consistent": (threshold is not None and len(metrics) >= CONSISTENT_EPOCHS
                       and all(r.test_acc >= threshold for r in last)),
        "passes": threshold is not None and final.test_acc >= threshold,
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
    from mnistkit.identity import first_difference

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


def stats(values: list[float]) -> dict[str, Any] | None:
    """Mean, sample std (None for one value), min, max and count; None for no values."""
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values), "max": max(values), "n": len(values)}


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Comparable runs over seeds (the newest run of each seed): mean ± std, min, max; how many
    seeds pass, and how many hold the target in each of their last epochs."""
    by_seed: dict[Any, dict[str, Any]] = {}
    for r in runs:
        if r["comparable"]:
            by_seed[r["seed"]] = r  # oldest first: the newest of a seed wins
    if not by_seed:
        return None
    used = [by_seed[s] for s in sorted(by_seed, key=str)]
    curves = [r["test_acc_curve"] for r in used]
    return {
        "seeds": [r["seed"] for r in used],
        "n": len(used),
        "runs": [r["run"] for r in used],
        "test_acc": stats([r["test_acc"] for r in used]),
        "train_acc": stats([r["train_acc"] for r in used]),
        "best_test_acc": stats([r["best_test_acc"] for r in used]),
        "best_selected_on": "test",  # comparable runs hold out no validation split
        "gap": stats([r["gap"] for r in used]),
        "passes": sum(r["passes"] for r in used),
        "consistent": sum(r["consistent"] for r in used),
        "epochs": used[0]["epochs"],
        "lr": used[0]["lr"],
        "scheduler": used[0]["scheduler"],
        "train_samples": used[0]["train_samples"],
        "first_epoch_at_target": [r["first_epoch_at_target"] for r in used],
        # per seed: the final epoch, the last epochs, and the median seconds of an epoch
        # (training plus its evaluations, as metrics.jsonl records them)
        "per_seed": [{"seed": r["seed"], "test_acc": r["test_acc"], "last_epochs_test_acc": r["last_epochs_test_acc"],
                      "consistent": r["consistent"], "seconds_per_epoch": r["seconds_per_epoch"], "run": r["run"]}
                     for r in used],
        "seconds_per_epoch": stats([r["seconds_per_epoch"] for r in used]),
        "test_acc_curve": [statistics.fmean(c[i] for c in curves) for i in range(min(map(len, curves)))],
        # the runs that taught them (distill.py), each once: {run, model, sha256, epoch, test_acc, ...}
        "teachers": list({r["teacher"]["sha256"]: r["teacher"] for r in used if r.get("teacher")}.values()),
    }


def build_report(experiments: Experiments, runs_dir: str | Path = DEFAULT_RUNS_DIR, *,
                 static: bool = False, models: dict[str, Any] | None = None) -> dict[str, Any]:
    """The report; ``static``: what needs no training only (no runs read, no accuracy checks);
    ``models``, when given, receives each iteration's built model and summary by id (for the
    write-up, so that nothing is built twice)."""
    from mnistkit.modelref import build
    from mnistkit.summary import summarize

    c = experiments.constraints
    target = c.get("min_test_acc")
    all_runs, damaged = ([], []) if static else read_runs(runs_dir)
    rows: list[dict[str, Any]] = []
    previous: dict[str, Any] | None = None
    final = experiments.final
    for it in experiments.iterations:
        source = experiments.model_source(it)
        wanted = Recipe.from_dict(experiments.recipe_for(it), where=f"{experiments.path} ({it.id})")
        model, _ = build(source, wanted.model_kwargs())
        s = summarize(model, name=source.name, budget=c.get("max_params", DEFAULT_BUDGET))
        source = source.with_architecture(model, s)
        if models is not None:
            models[it.id] = (model, s)
        runs = iteration_runs(all_runs, it, wanted, target, source)
        measured = aggregate(runs)
        reported = it.reported
        row: dict[str, Any] = {
            "id": it.id,
            "final": it is final,   # the iteration handed in: the one check gates (experiments.final)
            "model": it.model,
            "changes": it.changes,
            "target": it.target,
            "analysis": it.analysis,
            "source": source.to_record(),
            "reported": reported,
            "recipe": {"epochs": wanted.epochs, "lr": wanted.lr, "scheduler": wanted.scheduler},
            "params": s.trainable_params,
            "params_match": reported.get("params") in (None, s.trainable_params),
            "uses": {"batchnorm": s.has_batchnorm, "dropout": s.has_dropout, "gap_head": s.gap_head,
                     "fc_head": s.fc_head},
            "measured": measured,
            "other_runs": [r for r in runs if not r["comparable"]],
        }
        row["delta_params"] = s.trainable_params - previous["params"] if previous else None
        pm = previous["measured"] if previous else None
        row["delta_test_acc"] = (measured["test_acc"]["mean"] - pm["test_acc"]["mean"]) if measured and pm else None
        rp, r = (previous["reported"].get("test_acc") if previous else None), reported.get("test_acc")
        row["delta_test_acc_reported"] = r - rp if r is not None and rp is not None else None
        row["checks"] = _checks(c, s, wanted, measured, static)
        rows.append(row)
        previous = row
    return {"experiments": str(experiments.path), "experiments_source": experiments.source,
            "runs_dir": str(runs_dir), "constraints": c, "consistent_epochs": CONSISTENT_EPOCHS,
            "final": final.id if final else None, "final_marked": experiments.final_marked,
            "damaged_runs": damaged,
            "comparable_means": "official MNIST files, the whole training set (no limit, no validation split), "
                                "all the epochs of the iteration's change-log recipe, that recipe (any seed)",
            "iterations": rows}


def _checks(c: dict[str, Any], s: Any, recipe: Recipe, measured: dict[str, Any] | None,
            static: bool = False) -> dict[str, Any]:
    """Each assignment constraint. Properties of the model and of the recipe are True/False;
    accuracy checks count seeds, ``{"passed": k, "of": n}``, or are None with no comparable run."""
    checks: dict[str, Any] = {}
    if "max_params" in c:
        checks["params"] = s.trainable_params < c["max_params"]
    if c.get("batchnorm"):
        checks["batchnorm"] = s.has_batchnorm
    if c.get("dropout"):
        checks["dropout"] = s.has_dropout
    if c.get("gap_head"):
        checks["gap_head"] = s.gap_head
    if "max_epochs" in c:
        checks["epochs"] = recipe.epochs < c["max_epochs"]
    if "min_test_acc" in c and not static:
        n = measured["n"] if measured else 0
        checks["test_acc"] = {"passed": measured["passes"], "of": n} if measured else None
        checks["consistent"] = {"passed": measured["consistent"], "of": n} if measured else None
    return checks


def check_passed(value: Any) -> bool | None:
    """True (met; every seed for the per-seed checks), False, or None (nothing to judge by)."""
    if isinstance(value, dict):
        return value["of"] > 0 and value["passed"] == value["of"]
    return value


# --------------------------------------------------------------------------- flat rows (CSV)

COLUMNS = [
    "id", "changes", "params_reported", "params_measured", "params_match", "train_acc_reported",
    "train_acc_mean", "test_acc_reported", "test_acc_mean", "test_acc_std", "test_acc_min", "seeds",
    "seeds_passing", "seeds_consistent", "best_test_acc_mean", "gap_mean", "epochs_reported", "epochs_measured",
    "train_samples", "lr_scheduler_reported", "lr_measured", "scheduler_measured", "delta_test_acc",
    "delta_params", "other_runs", "final",
]


def flat_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat record per iteration (the CSV export's rows)."""
    out = []
    for row in report["iterations"]:
        m, r = row["measured"], row["reported"]
        stat = (lambda key, field: m[key][field]) if m else (lambda key, field: None)
        out.append({
            "id": row["id"], "changes": row["changes"],
            "params_reported": r.get("params"), "params_measured": row["params"], "params_match": row["params_match"],
            "train_acc_reported": r.get("train_acc"), "train_acc_mean": stat("train_acc", "mean"),
            "test_acc_reported": r.get("test_acc"), "test_acc_mean": stat("test_acc", "mean"),
            "test_acc_std": stat("test_acc", "std"), "test_acc_min": stat("test_acc", "min"),
            "seeds": " ".join(map(str, m["seeds"])) if m else None,
            "seeds_passing": m["passes"] if m else None, "seeds_consistent": m["consistent"] if m else None,
            "best_test_acc_mean": stat("best_test_acc", "mean"), "gap_mean": stat("gap", "mean"),
            "epochs_reported": r.get("epochs"), "epochs_measured": m["epochs"] if m else None,
            "train_samples": m["train_samples"] if m else None,
            "lr_scheduler_reported": r.get("lr_scheduler"), "lr_measured": m["lr"] if m else None,
            "scheduler_measured": m["scheduler"] if m else None,
            "delta_test_acc": row["delta_test_acc"], "delta_params": row["delta_params"],
            "other_runs": len(row["other_runs"]),
            "final": row.get("final", False),   # last: older readers keep their columns
        })
    return out
