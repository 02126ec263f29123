"""The change-log report: what each iteration reported beside what the registry and the runs
measure, the deltas between iterations, and the assignment checklist. Pure data; ``render``
draws it and the exporters below write it."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from mnistkit.experiments import Experiments
from mnistkit.runs import best_row, find_runs, read_config, read_metrics

SPARKS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float], low: float | None = None, high: float | None = None) -> str:
    if not values:
        return ""
    lo = min(values) if low is None else low
    hi = max(values) if high is None else high
    span = hi - lo
    return "".join(SPARKS[min(len(SPARKS) - 1, max(0, int((v - lo) / span * (len(SPARKS) - 1) + 0.5)))]
                   if span > 0 else SPARKS[-1] for v in values)


def newest_run(runs_dir: str | Path, model: str) -> tuple[Path, list[dict[str, Any]]] | None:
    """The newest run folder of ``model`` that finished at least one epoch, with its metrics."""
    for run in reversed(find_runs(runs_dir, model)):
        metrics = read_metrics(run)
        if metrics:
            return run, metrics
    return None


def _measured(run: Path, metrics: list[dict[str, Any]], threshold: float | None) -> dict[str, Any]:
    config = read_config(run)
    recipe = config["recipe"]
    final = metrics[-1]
    best = best_row(metrics)
    first = next((r["epoch"] for r in metrics if threshold is not None and r["test_acc"] >= threshold), None)
    scheduler = {"onecycle": "OneCycleLR", "step": "StepLR", "none": "constant"}.get(recipe["scheduler"],
                                                                                 recipe["scheduler"])
    return {
        "run": str(run),
        "dataset": config.get("data", {}).get("dataset"),
        "epochs": final["epoch"],
        "planned_epochs": recipe["epochs"],
        "complete": final["epoch"] >= recipe["epochs"],
        "train_acc": final["train_acc"],
        "test_acc": final["test_acc"],
        "best_test_acc": best["test_acc"],
        "best_epoch": best["epoch"],
        "first_epoch_at_target": first,
        "gap": final["train_acc"] - final["test_acc"],
        "lr_scheduler": f"{recipe['lr']:g}/{scheduler}",
        "seconds": round(sum(r["seconds"] for r in metrics), 1),
        "test_acc_curve": [r["test_acc"] for r in metrics],
    }


def build_report(experiments: Experiments, runs_dir: str | Path = "runs") -> dict[str, Any]:
    from mnistkit.inspect import summarize
    from mnistkit.models import get_model

    c = experiments.constraints
    target = c.get("min_test_acc")
    rows: list[dict[str, Any]] = []
    previous: dict[str, Any] | None = None
    for it in experiments.iterations:
        s = summarize(get_model(it.model), name=it.model, budget=c.get("max_params", 20_000))
        found = newest_run(runs_dir, it.model)
        measured = _measured(*found, target) if found else None
        reported = it.reported
        row: dict[str, Any] = {
            "id": it.id,
            "model": it.model,
            "changes": it.changes,
            "reported": reported,
            "params": s.trainable_params,
            "params_match": reported.get("params") in (None, s.trainable_params),
            "uses": {"batchnorm": s.has_batchnorm, "dropout": s.has_dropout, "gap_head": s.gap_head,
                     "fc_head": s.fc_head},
            "measured": measured,
        }
        if previous is not None:
            row["delta_params"] = s.trainable_params - previous["params"]
            pm, m = previous["measured"], measured
            row["delta_test_acc"] = m["test_acc"] - pm["test_acc"] if m and pm else None
            rp, r = previous["reported"].get("test_acc"), reported.get("test_acc")
            row["delta_test_acc_reported"] = r - rp if r is not None and rp is not None else None
        else:
            row["delta_params"] = row["delta_test_acc"] = row["delta_test_acc_reported"] = None
        row["checks"] = _checks(c, s, measured)
        rows.append(row)
        previous = row
    return {"experiments": str(experiments.path), "runs_dir": str(runs_dir), "constraints": c, "iterations": rows}


def _checks(c: dict[str, Any], s: Any, measured: dict[str, Any] | None) -> dict[str, bool | None]:
    """Each assignment constraint: True (met), False (not met), None (no run to judge it by)."""
    checks: dict[str, bool | None] = {}
    if "max_params" in c:
        checks["params"] = s.trainable_params < c["max_params"]
    if c.get("batchnorm"):
        checks["batchnorm"] = s.has_batchnorm
    if c.get("dropout"):
        checks["dropout"] = s.has_dropout
    if c.get("gap_head"):
        checks["gap_head"] = s.gap_head
    if "max_epochs" in c:
        checks["epochs"] = None if measured is None else measured["epochs"] < c["max_epochs"]
    if "min_test_acc" in c:
        checks["test_acc"] = None if measured is None else measured["test_acc"] >= c["min_test_acc"]
    return checks


CHECK_LABELS = {
    "params": lambda c: f"params < {c['max_params']:,}",
    "batchnorm": lambda c: "BatchNorm",
    "dropout": lambda c: "Dropout",
    "gap_head": lambda c: "GAP head",
    "epochs": lambda c: f"epochs < {c['max_epochs']}",
    "test_acc": lambda c: f"test acc >= {c['min_test_acc']}%",
}


# --------------------------------------------------------------------------- flat rows and exports

COLUMNS = [
    "id", "changes", "params_reported", "params_measured", "params_match", "train_acc_reported",
    "train_acc_measured", "test_acc_reported", "test_acc_measured", "best_test_acc", "best_epoch",
    "first_epoch_at_target", "gap", "epochs_reported", "epochs_measured", "lr_scheduler_reported",
    "lr_scheduler_measured", "delta_test_acc", "delta_params", "run",
]


def flat_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for row in report["iterations"]:
        m, r = row["measured"] or {}, row["reported"]
        out.append({
            "id": row["id"], "changes": row["changes"],
            "params_reported": r.get("params"), "params_measured": row["params"], "params_match": row["params_match"],
            "train_acc_reported": r.get("train_acc"), "train_acc_measured": m.get("train_acc"),
            "test_acc_reported": r.get("test_acc"), "test_acc_measured": m.get("test_acc"),
            "best_test_acc": m.get("best_test_acc"), "best_epoch": m.get("best_epoch"),
            "first_epoch_at_target": m.get("first_epoch_at_target"), "gap": m.get("gap"),
            "epochs_reported": r.get("epochs"), "epochs_measured": m.get("epochs"),
            "lr_scheduler_reported": r.get("lr_scheduler"), "lr_scheduler_measured": m.get("lr_scheduler"),
            "delta_test_acc": row["delta_test_acc"], "delta_params": row["delta_params"], "run": m.get("run"),
        })
    return out


NOT_RUN = "not run"


def row_cells(row: dict[str, Any]) -> dict[str, str]:
    """The text of one iteration's cells, shared by the markdown export and the Rich table."""
    rep, m = row["reported"], row["measured"]

    def pair(key: str) -> str:
        reported = f"{rep[key]:.2f}%" if key in rep else "-"
        return f"{reported} / {m[key]:.2f}%" if m else f"{reported} / {NOT_RUN}"

    lr_rep = rep.get("lr_scheduler", "-")
    epochs = f"{rep.get('epochs', '-')} / "
    if m:
        epochs += str(m["epochs"]) + ("" if m["complete"] else f" of {m['planned_epochs']}!")
    else:
        epochs += NOT_RUN
    return {
        "id": row["id"],
        "changes": row["changes"],
        "params": (f"{rep['params']:,}" if "params" in rep else "-") + f" / {row['params']:,}",
        "train_acc": pair("train_acc"),
        "test_acc": pair("test_acc"),
        "best": f"{m['best_test_acc']:.2f}% ({m['best_epoch']})" if m else NOT_RUN,
        "first_at_target": (str(m["first_epoch_at_target"] or "never")) if m else NOT_RUN,
        "gap": f"{m['gap']:+.2f}" if m else NOT_RUN,
        "epochs": epochs,
        "lr_scheduler": lr_rep if not m or m["lr_scheduler"] == lr_rep else f"{lr_rep} / {m['lr_scheduler']}",
        "delta_test_acc": f"{row['delta_test_acc']:+.2f}" if row["delta_test_acc"] is not None else "",
        "delta_params": f"{row['delta_params']:+,}" if row["delta_params"] is not None else "",
    }


def check_keys(report: dict[str, Any]) -> list[str]:
    """The checklist columns: the constraints that some iteration is checked against."""
    return [k for k in CHECK_LABELS if any(k in row["checks"] for row in report["iterations"])]


def to_markdown(report: dict[str, Any]) -> str:
    c = report["constraints"]
    lines = [
        "| Iter | Key changes | Params (reported / measured) | Train acc (reported / measured) | "
        "Test acc (reported / measured) | Best (epoch) | First epoch >= target | Gap | Epochs | LR/Scheduler | "
        "Δ test acc | Δ params |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["iterations"]:
        cells = row_cells(row)
        if not row["params_match"]:
            cells["params"] += " **MISMATCH**"
        lines.append("| " + " | ".join(cells.values()) + " |")
    keys = check_keys(report)
    lines += ["", "| Iter | " + " | ".join(CHECK_LABELS[k](c) for k in keys) + " |",
              "|---|" + "---|" * len(keys)]
    marks = {True: "✅", False: "❌", None: NOT_RUN}
    for row in report["iterations"]:
        lines.append(f"| {row['id']} | " + " | ".join(marks[row["checks"].get(k)] for k in keys) + " |")
    return "\n".join(lines) + "\n"


def to_csv(report: dict[str, Any]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in flat_rows(report):
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return buffer.getvalue()


def to_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2) + "\n"


def plot(report: dict[str, Any], path: str | Path) -> None:
    """Every iteration's test-accuracy curve on one chart (needs matplotlib)."""
    from mnistkit.errors import MnistkitError

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MnistkitError("--plot needs matplotlib, which is not installed; install it with "
                            "pip install 'mnistkit[plot]' (or pip install matplotlib)") from None
    from mnistkit.runs import atomic_write

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    drawn = 0
    for row in report["iterations"]:
        m = row["measured"]
        if m:
            curve = m["test_acc_curve"]
            ax.plot(range(1, len(curve) + 1), curve, marker="o", markersize=3, label=f"{row['id']} ({row['params']:,} params)")
            drawn += 1
    target = report["constraints"].get("min_test_acc")
    if target is not None:
        ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target}%")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Test accuracy per epoch" + ("" if drawn else " (no runs yet)"))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(fig)
    atomic_write(path, buffer.getvalue())
