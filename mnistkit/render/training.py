"""`train`: the live progress display, the closing line, the table over seeds."""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING, Any

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from mnistkit.render.common import num_column, fmt_int, fmt_pct, note_line, stderr, stdout

if TYPE_CHECKING:  # pragma: no cover
    from mnistkit.runs.metrics import EpochMetrics
    from mnistkit.training.loop import RunStart, StepInfo


class TrainDisplay:
    """Progress while training and one row per finished epoch. A live bar on a terminal only,
    with Rich's own columns: speed and time remaining come from a recent window, so the ETA
    follows the machine's load. The trainer says which epoch is best; nothing is re-derived."""

    def __init__(self, console: Console, quiet: bool = False, preamble: list[str] | None = None) -> None:
        self.console, self.quiet = console, quiet
        self.preamble = preamble or []  # said on stderr when training really starts (not before an error)
        self.progress = None
        self.task = None
        self.val = False
        self.epochs = self.steps = self.start_epoch = 0

    def header(self) -> str:
        val = f"  {'val loss':>9}  {'val acc':>8}" if self.val else ""
        return (f"{'epoch':>5}  {'train loss':>10}  {'train acc':>9}{val}  {'test loss':>9}  {'test acc':>8}  "
                f"{'lr':>9}  {'seconds':>7}")

    def row(self, row: "EpochMetrics", best: bool) -> str:
        val = f"  {row.val_loss:>9.4f}  {row.val_acc:>7.2f}%" if self.val and row.val_acc is not None else ""
        return (f"{row.epoch:>5}  {row.train_loss:>10.4f}  {row.train_acc:>8.2f}%{val}  {row.test_loss:>9.4f}  "
                f"{row.test_acc:>7.2f}%  {row.lr:>9.5f}  {row.seconds:>7.1f}" + ("  *" if best else ""))

    def on_start(self, start: "RunStart") -> None:
        self.epochs, self.steps, self.start_epoch = start.epochs, start.steps, start.start_epoch
        self.val = start.val_samples > 0
        for line in self.preamble:
            stderr().print(Text(line, style="dim"), highlight=False, soft_wrap=True)
        self.preamble = []
        if self.quiet:
            return
        verb = f"Resuming at epoch {self.start_epoch + 1}" if self.start_epoch else "Training"
        split = (f"{fmt_int(start.train_samples)} train / {fmt_int(start.val_samples)} validation / "
                 f"{fmt_int(start.test_samples)} test images" if self.val else
                 f"{fmt_int(start.train_samples)} train / {fmt_int(start.test_samples)} test images")
        self.console.print(Text.assemble(
            f"{verb} ", (start.model, "bold"),
            f" ({fmt_int(start.params)} params, seed {start.recipe.seed}) on {start.device}: {split} "
            f"({start.data.dataset}), {start.epochs} epoch{'s' * (start.epochs != 1)} of {start.steps} steps"))
        self.console.print(Text(f"Run folder: {start.run_dir}"))
        for note in start.notes:
            self.console.print(note_line(note))
        on = "validation" if self.val else "test (no validation split)"
        self.console.print(Text(f"* marks the best epoch so far, chosen on {on}"
                                + (f"; so far: epoch {start.best.epoch}" if start.best else "")))
        self.console.print(Text(self.header(), style="bold"))
        if self.console.is_terminal:
            from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                TextColumn("{task.fields[stats]}"), TextColumn("{task.fields[speed]}"),
                TimeRemainingColumn(), console=self.console, transient=True, speed_estimate_period=15,
            )
            self.progress.start()
            total = (self.epochs - self.start_epoch) * self.steps
            self.task = self.progress.add_task("starting", total=total, stats="", speed="")

    def on_step(self, step: "StepInfo") -> None:
        if self.progress is None:
            return
        done = (step.epoch - 1 - self.start_epoch) * step.steps + step.step
        self.progress.update(self.task, completed=done, description=f"epoch {step.epoch}/{self.epochs}",
                             stats=f"loss {step.loss:.4f} acc {step.acc:.2f}% lr {step.lr:.4f}")
        task = self.progress.tasks[0]
        if task.speed:  # steps per second over the recent window -> images per second
            per_step = step.images / step.step
            self.progress.update(self.task, speed=f"{task.speed * per_step:,.0f} img/s")

    def on_epoch(self, row: "EpochMetrics", best: bool) -> None:
        if not self.quiet:
            self.console.print(Text(self.row(row, best)))

    def close(self) -> None:
        """Called by the fit when it ends, however it ends (``training.loop``)."""
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def progress(quiet: bool = False) -> TrainDisplay:
    """The CLI's progress display for ``mnistkit.train(..., callback=mnistkit.progress())``:
    a live bar on a terminal or in Jupyter (Rich renders there), one row per epoch."""
    return TrainDisplay(stdout(), quiet=quiet)


def train_result(result: dict[str, Any]) -> Text:
    on = result["best_selected_on"]
    best = (f"best epoch {result['best_epoch']} (chosen on validation: {result['best_val_acc']:.2f}%, "
            f"test {result['best_test_acc']:.2f}%)" if on == "validation" else
            f"best test accuracy {result['best_test_acc']:.2f}% (epoch {result['best_epoch']}, chosen on the test set)")
    return Text.assemble(("Done: ", "bold"),
                         f"{result['model']} seed {result['seed']}: final test accuracy "
                         f"{result['final_test_acc']:.2f}%, {best}, {result['seconds']:.0f} s. "
                         f"Checkpoints in {result['run_dir']}")


def seeds_table(results: list[dict[str, Any]], threshold: float | None) -> Group:
    """Several seeds of one recipe: a row per seed, then mean ± std, min and max."""
    on = results[0]["best_selected_on"]
    table = Table(title=f"{results[0]['model']}: {len(results)} seeds, {results[0]['epochs']} epochs, "
                        f"{results[0]['measured_on'].get('dataset')} "
                        f"({fmt_int(results[0]['measured_on'].get('train_samples', 0))} training images)",
                  title_justify="left",
                  caption=f"Best: the epoch chosen on {on}" + (" (optimistic: chosen on the figure it reports)"
                                                                if on == "test" else "")
                  + (f"; last 3: the target {threshold}% holds in each of the last 3 epochs" if threshold else ""),
                  caption_justify="left")
    table.add_column("Seed", justify="right")
    num_column(table, "Final test acc")
    num_column(table, "Best test acc")
    num_column(table, "Best epoch")
    if threshold is not None:
        table.add_column("Last 3", justify="center")
    table.add_column("Run", overflow="fold")
    for r in results:
        last3 = r["last3_test_acc"]
        ok = threshold is not None and len(last3) == 3 and all(a >= threshold for a in last3)
        table.add_row(str(r["seed"]), fmt_pct(r["final_test_acc"]), fmt_pct(r["best_test_acc"]), str(r["best_epoch"]),
                      *([Text("✓", style="green") if ok else Text("✗", style="red")] if threshold is not None else []),
                      Text(r["run_dir"]))
    final = [r["final_test_acc"] for r in results]
    best = [r["best_test_acc"] for r in results]
    sd = (lambda v: f"{statistics.stdev(v):.2f}" if len(v) > 1 else "-")
    lines = [Text(f"Final test accuracy: mean {statistics.fmean(final):.2f}% ± {sd(final)} (sample std), "
                  f"min {min(final):.2f}%, max {max(final):.2f}%"),
             Text(f"Best test accuracy:  mean {statistics.fmean(best):.2f}% ± {sd(best)}, "
                  f"min {min(best):.2f}%, max {max(best):.2f}%")]
    return Group(table, *lines)


# --------------------------------------------------------------------------- evaluation
