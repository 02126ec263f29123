"""`compare`: the change-log beside measured runs as tables, Markdown, CSV and a plot."""

from __future__ import annotations

import csv
import io
import os
from typing import Any, Callable

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from mnistkit.render.common import clean, csv_cell, fit, fmt_int, fmt_pct, md_cell, mean_std, png_bytes, pyplot, spec_table


SPARKS = "▁▂▃▄▅▆▇█"
NO_RUN = "no run"


def sparkline(values: list[float], low: float | None = None, high: float | None = None) -> str:
    if not values:
        return ""
    lo = min(values) if low is None else low
    hi = max(values) if high is None else high
    span = hi - lo
    return "".join(SPARKS[min(len(SPARKS) - 1, max(0, int((v - lo) / span * (len(SPARKS) - 1) + 0.5)))]
                   if span > 0 else SPARKS[-1] for v in values)


SCHEDULER_NAMES = {"onecycle": "OneCycleLR", "step": "StepLR", "none": "constant"}


def lr_scheduler(lr: float | None, scheduler: str | None) -> str:
    return f"{lr:g}/{SCHEDULER_NAMES.get(scheduler, scheduler)}" if lr is not None else "-"


def check_labels(c: dict[str, Any], consistent_epochs: int) -> dict[str, str]:
    return {
        "params": f"params < {c.get('max_params', 0):,}",
        "batchnorm": "BatchNorm",
        "dropout": "Dropout",
        "gap_head": "GAP head",
        "epochs": f"epochs < {c.get('max_epochs')}",
        "test_acc": f"final test ≥ {c.get('min_test_acc')}%",
        "consistent": f"last {consistent_epochs} ≥ {c.get('min_test_acc')}%",
    }


def check_keys(report: dict[str, Any]) -> list[str]:
    """The checklist columns: the constraints that some iteration is checked against."""
    labels = check_labels(report["constraints"], report["consistent_epochs"])
    return [k for k in labels if any(k in row["checks"] for row in report["iterations"])]


def check_cell(value: Any) -> tuple[str, str]:
    """(text, style) of a checklist cell. Per-seed checks say how many seeds held."""
    from mnistkit.results.compare import check_passed

    ok = check_passed(value)
    if ok is None:
        return NO_RUN, "dim"
    mark = "✓" if ok else "✗"
    if isinstance(value, dict):
        return f"{mark} {value['passed']}/{value['of']}", "bold green" if ok else "bold red"
    return mark, "bold green" if ok else "bold red"


def overall(row: dict[str, Any], keys: list[str]) -> Any:
    from mnistkit.results.compare import check_passed

    values = [check_passed(row["checks"].get(k)) for k in keys]
    return False if False in values else (None if None in values else True)


def how_to_make(row: dict[str, Any]) -> str:
    """The iteration's id names its model and recipe everywhere a model is taken."""
    import shlex

    return f"mnistkit train {shlex.quote(row['id'])} --seeds 3"


FINAL_MARK = " (final)"


def iteration_cell(row: dict[str, Any], mark: bool = True) -> str:
    """An iteration's id, marked when it is the final one (the one ``check`` gates) and ``mark``
    (a change-log of one iteration has nothing to tell apart)."""
    return row["id"] + (FINAL_MARK if mark and row.get("final") else "")


def gate_note(report: dict[str, Any]) -> str:
    """Which iteration the checklist gates, in one sentence."""
    final, rows = report.get("final"), report["iterations"]
    if final is None or len(rows) < 2:
        return ""
    how = "marked final: true" if report.get("final_marked") else "the last one; mark another with final: true"
    return (f"mnistkit check gates the final iteration, {final} ({how}); the others are exploratory: "
            "shown here, never failing the check.")


def compare_cells(row: dict[str, Any], mark: bool = True) -> dict[str, str]:
    """The text of one iteration's cells, shared by the markdown export and the Rich tables."""
    rep, m = row["reported"], row["measured"]
    return {
        "id": iteration_cell(row, mark),
        "changes": row["changes"],
        "params": (f"{rep['params']:,}" if "params" in rep else "-") + f" / {row['params']:,}",
        "test_reported": fmt_pct(rep.get("test_acc")),
        "test_measured": mean_std(m["test_acc"]) if m else NO_RUN,
        "test_min": fmt_pct(m["test_acc"]["min"]) if m else "",
        "seeds": str(m["n"]) if m else "0",
        "train": (fmt_pct(rep.get("train_acc")) + " / " + (fmt_pct(m["train_acc"]["mean"]) if m else NO_RUN)),
        "best": mean_std(m["best_test_acc"]) if m else "",
        "gap": f"{m['gap']['mean']:+.2f}" if m else "",
        "epochs": f"{rep.get('epochs', '-')} / " + (str(m["epochs"]) if m else NO_RUN),
        "lr": (rep.get("lr_scheduler", "-") if not m or lr_scheduler(m["lr"], m["scheduler"]) == rep.get("lr_scheduler")
               else f"{rep.get('lr_scheduler', '-')} / {lr_scheduler(m['lr'], m['scheduler'])}"),
        "first": (", ".join("never" if e is None else str(e) for e in m["first_epoch_at_target"]) if m else ""),
        "delta_test": f"{row['delta_test_acc']:+.2f}" if row["delta_test_acc"] is not None else "",
        "delta_params": f"{row['delta_params']:+,}" if row["delta_params"] is not None else "",
    }


def compare_tables(report: dict[str, Any], console: Console, all_runs: bool = False) -> Group:
    c = report["constraints"]
    target = c.get("min_test_acc")
    rows = report["iterations"]
    cells = [compare_cells(row, len(rows) > 1) for row in rows]
    n = len(rows)
    curves = [v for row in rows if row["measured"] for v in row["measured"]["test_acc_curve"]]
    lo, hi = (min(curves), max(curves)) if curves else (None, None)

    def params(i: int) -> Text:
        text = Text(cells[i]["params"])
        if not rows[i]["params_match"]:
            text.stylize("bold red")
            text.append(" ≠", style="bold red")
        return text

    col = {
        "iter": ("Iter", "fixed", lambda i: cells[i]["id"]),
        "changes": ("Key changes", "text", lambda i: cells[i]["changes"]),
        "params": ("Params rep. / meas.", "num", params),
        "delta_params": ("Δ params", "num", lambda i: cells[i]["delta_params"]),
        "test_rep": ("Test acc reported", "num", lambda i: cells[i]["test_reported"]),
        "test_meas": ("Test acc measured", "num",
                      lambda i: Text(cells[i]["test_measured"], style="" if rows[i]["measured"] else "dim")),
        "test_min": ("Min", "num", lambda i: cells[i]["test_min"]),
        "seeds": ("Seeds", "num", lambda i: cells[i]["seeds"]),
        "delta_test": ("Δ test", "num", lambda i: cells[i]["delta_test"]),
        "samples": ("Train images", "num", lambda i: fmt_int(rows[i]["measured"]["train_samples"])
                    if rows[i]["measured"] and rows[i]["measured"]["train_samples"] is not None else NO_RUN),
        "train": ("Train acc rep. / meas.", "num", lambda i: cells[i]["train"]),
        "best": ("Best (test-chosen)", "num", lambda i: cells[i]["best"]),
        "gap": ("Gap", "num", lambda i: cells[i]["gap"]),
        "epochs": ("Epochs rep. / meas.", "num", lambda i: cells[i]["epochs"]),
        "lr": ("LR/Scheduler", "text", lambda i: cells[i]["lr"]),
        "first": (f"≥ {target}% at epoch", "num", lambda i: cells[i]["first"]),
        "curve": ("Test acc / epoch", "fixed", lambda i: sparkline(rows[i]["measured"]["test_acc_curve"], lo, hi)
                  if rows[i]["measured"] else ""),
    }

    def table(title: str, caption: str | None, keys: list[str]) -> Callable[[], Table]:
        return lambda: spec_table(title, caption, [col[k] for k in keys], n)

    def group(*tables: Callable[[], Table]) -> Callable[[], RenderableType]:
        return lambda: Group(*(make() for make in tables))

    t1 = f"Change-log {report['experiments']}: reported beside measured (comparable runs in {report['runs_dir']})"
    c1 = "Measured test acc: the final epoch, mean ± sample std over seeds. Δ: against the previous iteration."
    changelog = fit(console, [
        table(t1, c1, ["iter", "changes", "params", "test_rep", "test_meas", "test_min", "seeds", "delta_test",
                       "delta_params"]),
        group(table(t1, None, ["iter", "changes", "params", "delta_params"]),
              table("Test accuracy: reported beside measured", c1,
                    ["iter", "test_rep", "test_meas", "test_min", "seeds", "delta_test"])),
    ])
    t2 = "Comparable runs: official MNIST, the whole training set, the change-log's recipe"
    c2 = (f"Best: the best epoch's test accuracy, chosen on the test set itself (optimistic). Gap: train minus "
          f"test accuracy. ≥ {target}% at: the first epoch at the target, per seed.")
    measured = fit(console, [
        table(t2, c2, ["iter", "samples", "train", "best", "gap", "epochs", "lr", "first", "curve"]),
        table(t2, c2, ["iter", "samples", "train", "best", "gap", "epochs", "lr", "first"]),
        group(table(t2, None, ["iter", "samples", "epochs", "lr", "first"]),
              table("Comparable runs: accuracy", c2, ["iter", "train", "best", "gap", "curve"])),
    ])

    keys = check_keys(report)
    short = {"params": f"< {c.get('max_params', 0):,}", "batchnorm": "BN", "dropout": "Drop", "gap_head": "GAP",
             "epochs": f"ep < {c.get('max_epochs')}", "test_acc": f"final ≥ {target}",
             "consistent": f"last {report['consistent_epochs']} ≥ {target}"}

    def checklist(labels: dict[str, str]) -> Callable[[], Table]:
        specs = [("Iter", "fixed", lambda i: cells[i]["id"])]
        specs += [(labels[k], "mark", (lambda k: lambda i: Text(*check_cell(rows[i]["checks"].get(k))))(k))
                  for k in keys]
        specs.append(("All", "mark", lambda i: Text(*check_cell(overall(rows[i], keys)))))
        return lambda: spec_table("Assignment checklist (comparable runs only; accuracy checks count seeds)",
                                   gate_note(report) or None, specs, n)

    parts: list[RenderableType] = [
        Text(f"Runs used: {report['comparable_means']}.", style="dim"), changelog, measured,
        fit(console, [checklist(check_labels(c, report["consistent_epochs"])), checklist(short)]),
    ]
    noted = [row for row in rows if row.get("target") or row.get("analysis")]
    if noted:
        specs = [("Iter", "fixed", lambda i: noted[i]["id"]), ("Model", "text", lambda i: noted[i]["model"]),
                 ("Target", "text", lambda i: noted[i].get("target") or ""),
                 ("Analysis", "text", lambda i: noted[i].get("analysis") or "")]
        parts.append(spec_table("Target and analysis: your words, from the change-log (never written by mnistkit)",
                                None, specs, len(noted)))
    seeds, per_seed = seed_columns(report)
    if seeds:
        def seed_table(wide: bool) -> Callable[[], Table]:
            strip = (lambda v: v) if wide else (lambda v: v.replace("%", "").replace(" ± ", "±"))
            specs = [("Iter", "fixed", lambda i: per_seed[i][0])]
            if wide:
                specs += [("Params", "num", lambda i: per_seed[i][1]), ("Epochs", "num", lambda i: per_seed[i][2])]
            specs += [(f"Seed {seed}" if wide else f"s{seed}", "num",
                       (lambda j: lambda i: strip(per_seed[i][3][j]))(j)) for j, seed in enumerate(seeds)]
            specs += [("Mean ± std", "num", lambda i: strip(per_seed[i][4])),
                      ("Min", "num", lambda i: strip(per_seed[i][5])),
                      (f"Last {report['consistent_epochs']} ≥ {target}%" if wide else "Last 3", "mark",
                       lambda i: per_seed[i][6]), ("s / epoch", "num", lambda i: per_seed[i][7])]
            title = "Final test accuracy per seed (comparable runs)" + ("" if wide else ", in %")
            return lambda: spec_table(title, SEED_CAPTION, specs, len(per_seed))

        parts.append(fit(console, [seed_table(True), seed_table(False)]))
    parts += [Text(line) for line in teacher_lines(report)]
    from mnistkit.runs.comparable import earlier_version

    for row in rows:
        if not row["measured"]:
            parts.append(Text(f"{row['id']}: no comparable run in {report['runs_dir']}; make one with: "
                              f"{how_to_make(row)}{earlier_version(row)}", style="yellow"))
    for bad in report.get("damaged_runs", []):
        parts.append(Text(f"skipped a damaged run folder: {bad['why']}", style="red"))
    others = [(row["id"], r) for row in rows for r in row["other_runs"]]
    if others and not all_runs:
        parts.append(Text(f"{len(others)} other run(s) not used (other data, fewer images or epochs, another "
                          "recipe, or a model source changed since); --all-runs lists them.", style="dim"))
    if others and all_runs:
        def data(r: dict[str, Any]) -> str:
            return f"{r['dataset']}, {fmt_int(r['train_samples'])} train" if r["train_samples"] else str(r["dataset"])

        specs = [("Iter", "fixed", lambda i: others[i][0]),
                 ("Run", "text", lambda i: os.path.basename(others[i][1]["run"])),
                 ("Data", "text", lambda i: data(others[i][1])),
                 ("Seed", "num", lambda i: str(others[i][1]["seed"])),
                 ("Final test", "num", lambda i: fmt_pct(others[i][1]["test_acc"])),
                 ("Not comparable because", "text", lambda i: "; ".join(others[i][1]["why_not"]))]
        parts.append(spec_table("Other runs: experiments, not the iterations (never counted in the checklist)",
                                 None, specs, len(others)))
    return Group(*parts)


def teacher_lines(report: dict[str, Any]) -> list[str]:
    """Which run taught an iteration's comparable runs (distillation), one line per teacher."""
    out = []
    for row in report["iterations"]:
        for t in (row["measured"] or {}).get("teachers") or []:
            out.append(f"{row['id']} was taught by {t['model']}: {t['run']} (epoch {t['epoch']}, test {t['test_acc']:.2f}%, "
                       f"checkpoint SHA-256 {t['sha256'][:12]}...)")
    return out


SEED_CAPTION = ("s / epoch: the median seconds of an epoch, training plus its evaluation, over the seeds' runs "
                "(as metrics.jsonl records them: other work on the machine counts).")


def seed_columns(report: dict[str, Any]) -> tuple[list[Any], list[tuple[str, ...]]]:
    """The per-seed table as text: the seeds any iteration has, and one row per measured
    iteration (id, params, epochs, a cell per seed, mean ± std, min, last-epochs mark, s/epoch)."""
    rows = [r for r in report["iterations"] if r["measured"]]
    seeds = sorted({s["seed"] for r in rows for s in r["measured"]["per_seed"]})  # recipe seeds: ints
    out = []
    for r in rows:
        m = r["measured"]
        by_seed = {s["seed"]: s for s in m["per_seed"]}
        acc, sec = m["test_acc"], m["seconds_per_epoch"]
        std = f" ± {acc['std']:.2f}" if acc["std"] is not None else ""
        last = (f"{sum(s['consistent'] for s in m['per_seed'])}/{len(m['per_seed'])}"
                if m["epochs"] >= report["consistent_epochs"] else f"n/a ({m['epochs']} epoch{'s' * (m['epochs'] > 1)})")
        out.append((r["id"], fmt_int(r["params"]), str(m["epochs"]),
                    [fmt_pct(by_seed[s]["test_acc"]) if s in by_seed else "" for s in seeds],
                    f"{acc['mean']:.2f}{std}%", fmt_pct(acc["min"]), last,
                    f"{sec['mean']:.1f}" if sec else ""))
    return seeds, out


def compare_markdown(report: dict[str, Any]) -> str:
    c = report["constraints"]
    lines = [
        f"Runs used: {report['comparable_means']}.", "",
        "| Iter | Key changes | Params (reported / measured) | Test acc reported | Test acc measured (mean ± std) "
        "| Min | Seeds | Train acc (reported / measured) | Best (test-selected) | Gap | Epochs | LR/Scheduler "
        "| Δ test acc | Δ params |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["iterations"]:
        cell = compare_cells(row, len(report["iterations"]) > 1)
        params = cell["params"] + ("" if row["params_match"] else " **MISMATCH**")
        lines.append("| " + " | ".join([md_cell(cell["id"]), md_cell(cell["changes"]), params, cell["test_reported"], cell["test_measured"],
                                         cell["test_min"], cell["seeds"], cell["train"], cell["best"], cell["gap"],
                                         cell["epochs"], cell["lr"], cell["delta_test"], cell["delta_params"]]) + " |")
    keys = check_keys(report)
    labels = check_labels(c, report["consistent_epochs"])
    lines += ["", "| Iter | " + " | ".join(labels[k] for k in keys) + " | All |", "|---|" + "---|" * (len(keys) + 1)]
    for row in report["iterations"]:
        marks = [check_cell(row["checks"].get(k))[0].replace("✓", "✅").replace("✗", "❌") for k in keys]
        every = check_cell(overall(row, keys))[0].replace("✓", "✅").replace("✗", "❌")
        lines.append(f"| {md_cell(iteration_cell(row, len(report['iterations']) > 1))} | " + " | ".join(marks) + f" | {every} |")
    if gate_note(report):
        lines += ["", gate_note(report)]
    noted = [row for row in report["iterations"] if row.get("target") or row.get("analysis")]
    if noted:
        lines += ["", "| Iter | Model | Target | Analysis |", "|---|---|---|---|"]
        lines += [f"| {md_cell(r['id'])} | {md_cell(r['model'])} | {md_cell(r.get('target', ''))} | "
                  f"{md_cell(r.get('analysis', ''))} |"
                  for r in noted]
    seeds, per_seed = seed_columns(report)
    if seeds:
        target = c.get("min_test_acc")
        lines += ["", "| Iter | Params | Epochs | " + " | ".join(f"Seed {s}" for s in seeds)
                  + f" | Mean ± std | Min | Last {report['consistent_epochs']} ≥ {target}% | s / epoch |",
                  "|---|" + "---:|" * (len(seeds) + 4) + "---|---:|"]
        for it, params, epochs, cells, mean, low, last, sec in per_seed:
            lines.append("| " + " | ".join([it, params, epochs, *cells, mean, low, last, sec]) + " |")
        lines += ["", SEED_CAPTION]
    taught = teacher_lines(report)
    if taught:
        lines += ["", *taught]
    return clean("\n".join(lines) + "\n", lines=True)


def compare_csv(report: dict[str, Any]) -> str:
    from mnistkit.results.compare import COLUMNS, flat_rows

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in flat_rows(report):
        writer.writerow({k: csv_cell(v) for k, v in row.items()})
    return buffer.getvalue()


def compare_plot(report: dict[str, Any]) -> bytes:
    """Every iteration's mean test-accuracy curve (comparable runs) as PNG bytes (needs matplotlib)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=150)
    drawn = 0
    for row in report["iterations"]:
        m = row["measured"]
        if m:
            curve = m["test_acc_curve"]
            ax.plot(range(1, len(curve) + 1), curve, marker="o", markersize=3,
                    label=f"{iteration_cell(row)} ({row['params']:,} params, {m['n']} seed{'s' if m['n'] > 1 else ''})")
            drawn += 1
    target = report["constraints"].get("min_test_acc")
    if target is not None:
        ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target}%")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%), mean over seeds")
    ax.set_title("Test accuracy per epoch, comparable runs" + ("" if drawn else " (none yet)"))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    return png_bytes(fig, plt)


# --------------------------------------------------------------------------- predict, export, runs
