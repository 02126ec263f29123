"""`sweep`: the table of trials, as Rich, Markdown and CSV."""

from __future__ import annotations

import csv
import io
from typing import Any

from rich.console import Console, RenderableType

from mnistkit.render.common import clean, csv_cell, fmt_int, fmt_pct, mean_std, spec_table


def sweep_cells(row: dict[str, Any]) -> dict[str, str]:
    t, v = row["test_acc"], row["val_acc"]
    return {
        "config": row["config"], "done": f"{row['done']}/{row['trials']}",
        "failed": str(row["failed"]) if row["failed"] else "",
        "test": mean_std(t), "min": fmt_pct(t["min"]) if t else "-",
        "val": mean_std(v) if v else "-",
        "passing": f"{row['passing']}/{row['done']}" if row["done"] else "-",
        "data": _trained_on(row["trained_on"]),
    }


def _trained_on(on: dict[str, Any] | None) -> str:
    if not on:
        return "-"
    text = f"{on['dataset']}, {fmt_int(on['train_samples'] or 0)} train, {on['epochs']} ep"
    return text + (f", {fmt_int(on['val_samples'])} val" if on.get("val_samples") else "")


def sweep_table(report: dict[str, Any], console: Console) -> RenderableType:
    rows = [sweep_cells(r) for r in report["configs"]]
    has_val = any(r["val_acc"] for r in report["configs"])
    target = report["constraints"].get("min_test_acc")
    spec = [("Configuration", "text", lambda i: rows[i]["config"]), ("Trained on", "text", lambda i: rows[i]["data"]),
            ("Done", "num", lambda i: rows[i]["done"]),
            ("Failed", "num", lambda i: rows[i]["failed"]), ("Final test acc", "num", lambda i: rows[i]["test"]),
            ("Min", "num", lambda i: rows[i]["min"])]
    if has_val:
        spec.append(("Final val acc", "num", lambda i: rows[i]["val"]))
    spec.append(("Pass", "num", lambda i: rows[i]["passing"]))
    caption = (f"Final test acc: mean ± sample std over the seeds done. Pass: trials whose final test accuracy and "
               f"each of their last 3 epochs reach {target}%, in fewer epochs than the limit.")
    return spec_table(f"Sweep {report['sweep']} ({report['runs']})", caption, spec, len(rows))


def sweep_markdown(report: dict[str, Any]) -> str:
    has_val = any(r["val_acc"] for r in report["configs"])
    head = ["Configuration", "Trained on", "Done", "Failed", "Final test acc (mean ± std)", "Min"] + (
        ["Final val acc"] if has_val else []) + ["Pass"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in report["configs"]:
        c = sweep_cells(r)
        cells = [c["config"], c["data"], c["done"], c["failed"] or "0", c["test"], c["min"]] + (
            [c["val"]] if has_val else [])
        lines.append("| " + " | ".join(cells + [c["passing"]]) + " |")
    return clean("\n".join(lines) + "\n", lines=True)


def sweep_csv(report: dict[str, Any]) -> str:
    buffer = io.StringIO()
    fields = ["config", "model", "trials", "done", "failed", "test_acc_mean", "test_acc_std", "test_acc_min",
              "val_acc_mean", "passing", "seeds_done"] + list(report["varied"])
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for r in report["configs"]:
        t, v = r["test_acc"] or {}, r["val_acc"] or {}
        writer.writerow({k: csv_cell(cell) for k, cell in {"config": r["config"], "model": r["model"], "trials": r["trials"], "done": r["done"],
                         "failed": r["failed"], "test_acc_mean": t.get("mean", ""), "test_acc_std": t.get("std") or "",
                         "test_acc_min": t.get("min", ""), "val_acc_mean": v.get("mean", ""),
                         "passing": r["passing"], "seeds_done": " ".join(map(str, r["seeds_done"])),
                         **{k: r["values"].get(k, "") for k in report["varied"]}}.items()})
    return buffer.getvalue()
