"""`runs`: the table of run folders."""

from __future__ import annotations

import os
from typing import Any, Callable

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from mnistkit.render.common import fit, fmt_int, fmt_pct, spec_table


def fmt_age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


def runs_table(runs: list[Any], root: str, now: float, console: Console) -> RenderableType:
    styles = {"finished": "green", "interrupted": "yellow", "diverged": "red", "damaged": "red"}
    labels = {"interrupted": "interrupted: resumable"}

    def cells(r: Any) -> dict[str, Any]:
        data = r.dataset or "-"
        if r.train_samples:
            data += f", {fmt_int(r.train_samples)}"
        return {
            "run": Text(os.path.basename(r.run)), "model": r.model or "-", "data": data,
            "seed": "-" if r.seed is None else str(r.seed),
            "epochs": f"{r.epochs_done}/{r.epochs_planned}" if r.epochs_planned else "-",
            "final": fmt_pct(r.final_test_acc), "best": fmt_pct(r.best_test_acc) + (
                "*" if r.best_selected_on == "test" else ""),
            "state": Text(f"training ({r.why})" if r.state == "training" else labels.get(r.state, r.state),
                          style=styles.get(r.state, "")),
            "state_short": Text("resumable" if r.state == "interrupted" else r.state, style=styles.get(r.state, "")),
            "age": fmt_age(max(0.0, now - r.modified)),
        }

    rows = [cells(r) for r in runs]
    spec = {"run": ("Run", "fixed"), "model": ("Model", "fixed"), "data": ("Data, train images", "text"),
            "seed": ("Seed", "num"), "epochs": ("Epochs", "num"), "final": ("Final test", "num"),
            "best": ("Best test", "num"), "state": ("State", "text"), "state_short": ("State", "fixed"),
            "age": ("Age", "num")}

    def layout(keys: list[str]) -> Callable[[], Table]:
        return lambda: spec_table(f"Runs in {root}, newest first", "Best: * chosen on the test set; otherwise on a "
                                   "validation split.", [(spec[k][0], spec[k][1], (lambda k: lambda i: rows[i][k])(k))
                                                         for k in keys], len(rows))

    wide = ["run", "model", "data", "seed", "epochs", "final", "best", "state", "age"]
    narrow = ["run", "model", "seed", "epochs", "final", "state_short", "age"]
    narrowest = ["run", "epochs", "final", "state_short"]
    parts: list[RenderableType] = [fit(console, [layout(wide), layout(narrow), layout(narrowest)])]
    for r in runs:
        if r.why and r.state in ("damaged", "diverged"):
            parts.append(Text(f"{os.path.basename(r.run)}: {r.why}", style="dim"))
    return Group(*parts)
