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

from mnistkit.experiments import Experiments
from mnistkit.recipe import DEFAULT_BUDGET, DEFAULT_RUNS_DIR, Recipe
from mnistkit.runs.comparable import CONSISTENT_EPOCHS, iteration_runs, read_runs

__all__ = ["build_report", "aggregate", "stats", "check_passed", "flat_rows", "COLUMNS"]

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
    from mnistkit.usermodels.modelref import build
    from mnistkit.introspect.summary import summarize

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
