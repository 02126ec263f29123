"""`lr-find`: the progress bar, the text result and the picture of the LR range test. Everything
here reads the test's plain dict (``LRFind.to_dict()``): nothing trains."""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from mnistkit.render.common import fmt_int, note_line, num_column, png_bytes, pyplot

__all__ = ["LRFindDisplay", "lr_find_text", "lr_find_png", "provenance"]


class LRFindDisplay:
    """A live bar on a terminal while the LR rises (nothing off a terminal)."""

    def __init__(self, console: Console) -> None:
        self.console, self.progress, self.task = console, None, None

    def on_step(self, point: Any, steps: int) -> None:
        if self.progress is None:
            if not self.console.is_terminal:
                return
            from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("LR range test"), BarColumn(), TaskProgressColumn(),
                                     TextColumn("{task.fields[stats]}"), TimeRemainingColumn(),
                                     console=self.console, transient=True)
            self.progress.start()
            self.task = self.progress.add_task("lr", total=steps, stats="")
        self.progress.update(self.task, completed=point.step,
                             stats=f"lr {point.lr:.3g}  smoothed loss {point.smoothed:.4f}")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def _lr(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def provenance(r: dict[str, Any]) -> str:
    """What the curve was measured on, in one line (the picture's subtitle, the text's first line)."""
    t, rc, on = r["test"], r["recipe"], r["measured_on"]
    return (f"{r['model']} ({fmt_int(r['params'])} params), {t['steps_done']} steps of batch {rc['batch_size']} "
            f"({fmt_int(t['images'])} images drawn from {fmt_int(on.get('train_samples', 0))} {on.get('dataset')} "
            f"training images), seed {rc['seed']}, {rc['precision']}, {r['device']}, {r['threads']} thread"
            f"{'s' * (r['threads'] != 1)}")


def _rows(curve: list[dict[str, Any]], n: int = 9) -> list[dict[str, Any]]:
    """About ``n`` points of the curve spread evenly in log LR, the last one included."""
    if len(curve) <= n:
        return curve
    lo, hi = math.log(curve[0]["lr"]), math.log(curve[-1]["lr"])
    picked, want = [], [lo + (hi - lo) * k / (n - 1) for k in range(n)]
    for w in want:
        best = min(curve, key=lambda p: abs(math.log(p["lr"]) - w))
        if best not in picked:
            picked.append(best)
    return picked


def lr_find_text(r: dict[str, Any], line: str | None, where: str) -> Group:
    """The result for a terminal: what was measured, a few points of the curve, the suggestion
    with its rule, and the change-log line (``where``: which file and iteration it goes in)."""
    t, s = r["test"], r["suggestion"]
    parts: list[Any] = [Text(f"LR range test of {provenance(r)}")]
    parts.append(Text(f"LR {t['start_lr']:g} to {t['end_lr']:g} over {t['steps']} steps, momentum "
                      f"{t['momentum']:g}, weight decay {r['recipe']['weight_decay']:g}; smoothed with beta "
                      f"{t['smoothing_beta']:g}; {r['seconds']:.1f} s", style="dim"))
    parts.append(Text(f"stopped early: {t['stopped']}" if t["stopped"] else f"ran all {t['steps']} steps"))
    for n in r["notes"]:
        parts.append(note_line(n))
    table = Table(title=Text("The curve (smoothed loss at a few LRs)"), title_justify="left")
    num_column(table, "step")
    num_column(table, "LR")
    num_column(table, "loss")
    num_column(table, "smoothed")
    for p in _rows(r["curve"]):
        mark = "  <- lowest" if s["min_step"] == p["step"] else ""
        table.add_row(str(p["step"]), f"{p['lr']:.3g}", f"{p['loss']:.4f}", f"{p['smoothed']:.4f}{mark}")
    if r["curve"]:
        parts.append(table)
    if s["lr"] is None:
        parts.append(Text(f"no suggestion: {s['note']}", style="yellow"))
        return Group(*parts)
    parts.append(Text.assemble(("suggested max_lr: ", "bold"), (f"{s['lr']:g}", "bold green"),
                               f" ({s['rule']}: {s['rule_text']}, {_lr(s['min_loss_lr'])} at step {s['min_step']}); "
                               f"the recipe's lr now: {r['current_lr']:g}"))
    if s["note"]:
        parts.append(note_line(s["note"]))
    if line:
        parts.append(Text(f"to use it, put in {where}:"))
        parts.append(Text(f"  {line}", style="bold"))
    if r.get("train_command"):
        parts.append(Text(f"or for one run: {r['train_command']}"))
    return Group(*parts)


def lr_find_png(r: dict[str, Any]) -> bytes:
    """Smoothed loss (and each step's loss, faint) against the LR on a log axis; the suggestion,
    the smoothed minimum and the recipe's own LR marked; what it was measured on in the title."""
    plt = pyplot()
    t, s, curve = r["test"], r["suggestion"], r["curve"]
    fig, ax = plt.subplots(figsize=(9, 6), dpi=110)
    lrs = [p["lr"] for p in curve]
    ax.plot(lrs, [p["loss"] for p in curve], color="#999999", linewidth=0.7, alpha=0.6, label="loss of each step")
    ax.plot(lrs, [p["smoothed"] for p in curve], color="#1f77b4", linewidth=2.0,
            label=f"smoothed loss (moving average forward and backward, beta {t['smoothing_beta']:g})")
    if s["min_loss_lr"] is not None and s["min_step"] is not None:
        low = curve[s["min_step"] - 1]["smoothed"]
        ax.plot([s["min_loss_lr"]], [low], "o", color="#555555")
        ax.axvline(s["min_loss_lr"], color="#555555", linestyle=":", linewidth=1,
                   label=f"lowest smoothed loss at LR {s['min_loss_lr']:.3g}")
    if s["lr"] is not None:
        ax.axvline(s["lr"], color="#d62728", linewidth=2,
                   label=f"suggested max_lr {s['lr']:g} ({s['rule']}: {s['rule_text']})")
    ax.axvline(r["current_lr"], color="#2ca02c", linestyle="--", linewidth=1,
               label=f"the recipe's lr now: {r['current_lr']:g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss")
    if curve:
        finite = [p["smoothed"] for p in curve]
        top = max(finite) * 1.15
        ax.set_ylim(bottom=min(0.0, min(finite)), top=top)
        ax.set_xlim(t["start_lr"], max(t["end_lr"] if not t["stopped"] else lrs[-1] * 1.5, r["current_lr"] * 1.5))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)   # off the curve
    stop = (f"stopped at step {t['steps_done']} of {t['steps']}: the loss diverged" if t["stopped"]
            else f"all {t['steps']} steps")
    ax.set_title(f"LR range test: {provenance(r)}\nLR {t['start_lr']:g} to {t['end_lr']:g}, momentum "
                 f"{t['momentum']:g}, weight decay {r['recipe']['weight_decay']:g}; {stop}. "
                 "A short test on fresh weights, not a training result", fontsize=8.5)
    fig.tight_layout()
    return png_bytes(fig, plt)
