"""Every Rich table, panel and progress display in one place. Nothing here trains or loads data."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any, Iterable

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:  # pragma: no cover
    from mnistkit.inspect import LayerInfo, ModelSummary


def stdout() -> Console:
    """Console for results. Created per call so that redirected streams (tests, pipes) are
    honoured. When stdout is not a terminal there is no width to respect, and Rich's default of
    80 columns would truncate numbers: let tables be as wide as they need (COLUMNS still wins)."""
    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(width=200)
    return console


def stderr() -> Console:
    return Console(stderr=True)


def fmt_int(n: int) -> str:
    return f"{n:,}"


def fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n}"


def fmt_mult_adds(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f} G"
    if n >= 1e6:
        return f"{n / 1e6:.2f} M"
    if n >= 1e3:
        return f"{n / 1e3:.1f} K"
    return str(n)


def fmt_shape(shape: Iterable[int] | None, batch: bool = False) -> str:
    """``[1, 16, 28, 28]`` -> ``16x28x28`` (per image: the batch dimension is dropped)."""
    if shape is None:
        return "-"
    dims = list(shape) if batch else list(shape)[1:]
    return "x".join(str(d) for d in dims) or "scalar"


def fmt_geometry(layer: "LayerInfo") -> str:
    if layer.kernel is None:
        return ""
    k, s, p = layer.kernel, layer.stride or [1], layer.padding or [0]
    kernel = f"{k[0]}x{k[1]}" if len(k) > 1 else str(k[0])
    return f"{kernel}/{s[0]}/{p[0]}"


def fmt_rf(layer_or_summary: Any) -> str:
    if layer_or_summary.rf_global:
        return "global"
    return f"{layer_or_summary.rf} (j{layer_or_summary.jump})"


def yes_no(flag: bool) -> Text:
    return Text("yes", style="green") if flag else Text("no", style="dim")


def summary_table(s: "ModelSummary") -> Group:
    table = Table(
        title=f"{s.model}: layer by layer, per image of {fmt_shape(s.input_size)}",
        title_justify="left",
        caption="Kernel: size/stride/padding. RF: receptive field in input pixels (j: jump, the "
                "effective stride); global: the layer sees the whole image.",
        caption_justify="left",
    )
    table.add_column("#", justify="right", style="dim", no_wrap=True)
    table.add_column("Layer", no_wrap=True)
    table.add_column("Type", no_wrap=True)
    table.add_column("Kernel", no_wrap=True)
    table.add_column("Input", no_wrap=True)
    table.add_column("Output", no_wrap=True)
    table.add_column("Params", justify="right", no_wrap=True)
    table.add_column("Mult-adds", justify="right", no_wrap=True)
    table.add_column("RF", justify="right", no_wrap=True)
    for layer in s.layers:
        params = fmt_int(layer.params)
        if layer.shared_with is not None:
            params = f"shared #{layer.shared_with}"
        table.add_row(
            str(layer.index),
            layer.name.removeprefix("net."),
            layer.type,
            fmt_geometry(layer),
            fmt_shape(layer.input_shape),
            fmt_shape(layer.output_shape),
            params,
            fmt_int(layer.mult_adds) if layer.mult_adds else "",
            fmt_rf(layer),
        )

    budget_style = "bold green" if s.within_budget else "bold red"
    verdict = "PASS" if s.within_budget else "FAIL"
    margin = s.budget - s.trainable_params
    uses = ", ".join(
        f"{label} {'yes' if on else 'no'}"
        for label, on in (("BatchNorm", s.has_batchnorm), ("Dropout", s.has_dropout),
                          ("GAP head", s.gap_head), ("FC head", s.fc_head))
    )
    last_spatial = f"{s.rf}x{s.rf} pixels, jump {s.jump}"
    rf_line = (f"global: the output sees the whole image (last spatial layer: {last_spatial})"
               if s.rf_global else last_spatial)
    lines = [
        f"Parameters: {fmt_int(s.total_params)} (trainable {fmt_int(s.trainable_params)}, "
        f"non-trainable {fmt_int(s.non_trainable_params)})",
        f"Buffers: {fmt_int(s.buffers)} values (BatchNorm running statistics; not parameters)",
        f"Memory: parameters {fmt_bytes(s.param_bytes)}, buffers {fmt_bytes(s.buffer_bytes)}",
        f"Mult-adds per image: {fmt_int(s.mult_adds)} ({fmt_mult_adds(s.mult_adds)})",
        f"Receptive field: {rf_line}",
        f"Uses: {uses}",
    ]
    budget = Text.assemble(
        "Budget: ",
        (f"{fmt_int(s.trainable_params)} trainable params < {fmt_int(s.budget)}: {verdict}", budget_style),
        f" ({fmt_int(abs(margin))} {'to spare' if margin > 0 else 'over'})",
    )
    return Group(table, *[Text(line) for line in lines], budget)


def models_table(rows: list[tuple["ModelSummary", str]]) -> Table:
    table = Table(title="Registered models", title_justify="left")
    table.add_column("Model", style="bold", no_wrap=True)
    table.add_column("Params", justify="right", no_wrap=True)
    table.add_column("Mult-adds", justify="right", no_wrap=True)
    table.add_column("Head", no_wrap=True)
    table.add_column("RF", justify="right", no_wrap=True)
    table.add_column("BN", no_wrap=True)
    table.add_column("Drop", no_wrap=True)
    table.add_column("Budget", no_wrap=True)
    table.add_column("Description")
    for s, description in rows:
        table.add_row(
            s.model,
            fmt_int(s.trainable_params),
            fmt_mult_adds(s.mult_adds),
            s.head,
            f"global ({s.rf})" if s.rf_global else str(s.rf),
            yes_no(s.has_batchnorm),
            yes_no(s.has_dropout),
            Text("pass", style="green") if s.within_budget else Text("over", style="red"),
            description,
        )
    return table


# --------------------------------------------------------------------------- training display

EPOCH_HEADER = f"{'epoch':>5}  {'train loss':>10}  {'train acc':>9}  {'test loss':>9}  {'test acc':>8}  {'lr':>9}  {'seconds':>7}"


def epoch_row(row: dict[str, Any], best: bool = False) -> str:
    return (f"{row['epoch']:>5}  {row['train_loss']:>10.4f}  {row['train_acc']:>8.2f}%  {row['test_loss']:>9.4f}  "
            f"{row['test_acc']:>7.2f}%  {row['lr']:>9.5f}  {row['seconds']:>7.1f}" + ("  *" if best else ""))


class TrainDisplay:
    """Progress while training (epoch, step, loss, accuracy, LR, images/s, ETA) and one row per
    finished epoch. A live bar only on a terminal; plain lines otherwise."""

    def __init__(self, console: Console, quiet: bool = False) -> None:
        self.console, self.quiet = console, quiet
        self.progress = None
        self.task = None
        self.best = -1.0
        self.epochs = self.steps = self.start_epoch = 0

    def on_start(self, info: dict[str, Any]) -> None:
        self.epochs, self.steps, self.start_epoch = info["epochs"], info["steps"], info["start_epoch"]
        if self.quiet:
            return
        verb = f"Resuming at epoch {self.start_epoch + 1}" if self.start_epoch else "Training"
        self.console.print(
            f"{verb} [bold]{info['model']}[/] ({fmt_int(info['params'])} params) on {info['device']}: "
            f"{fmt_int(info['train_samples'])} train / {fmt_int(info['test_samples'])} test images "
            f"({info['data']['dataset']}), {info['epochs']} epochs of {info['steps']} steps",
            highlight=False,
        )
        self.console.print(f"Run folder: {info['run_dir']}", highlight=False)
        for note in info.get("notes", []):
            self.console.print(f"[yellow]note:[/] {note}", highlight=False)
        self.console.print(EPOCH_HEADER, style="bold", highlight=False)
        if self.console.is_terminal:
            from rich.progress import BarColumn, Progress, TextColumn

            self.progress = Progress(
                TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[stats]}"),
                console=self.console, transient=True,
            )
            self.started = time.perf_counter()
            self.progress.start()
            total = (self.epochs - self.start_epoch) * self.steps
            self.task = self.progress.add_task("starting", total=total, stats="")

    def on_step(self, epoch: int, step: int, steps: int, loss: float, acc: float, lr: float, ips: float) -> None:
        if self.progress is None:
            return
        done = (epoch - 1 - self.start_epoch) * steps + step
        total = (self.epochs - self.start_epoch) * steps
        elapsed = time.perf_counter() - self.started  # includes evaluation, so the ETA does too
        eta = elapsed / done * (total - done)
        self.progress.update(
            self.task, completed=done, description=f"epoch {epoch}/{self.epochs} step {step}/{steps}",
            stats=f"loss {loss:.4f} acc {acc:.2f}% lr {lr:.4f} {ips:,.0f} img/s ETA {int(eta // 60)}:{int(eta % 60):02d}",
        )

    def on_epoch(self, row: dict[str, Any]) -> None:
        best = row["test_acc"] > self.best
        self.best = max(self.best, row["test_acc"])
        if not self.quiet:
            self.console.print(epoch_row(row, best), highlight=False)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def train_result(result: dict[str, Any]) -> Text:
    return Text.assemble(
        ("Done: ", "bold"),
        f"{result['model']} best test accuracy {result['best_test_acc']:.2f}% (epoch {result['best_epoch']}), "
        f"final {result['final_test_acc']:.2f}%, {result['seconds']:.0f} s. Checkpoints in {result['run_dir']}",
    )


def evaluation(report: dict[str, Any]) -> Group:
    head = [
        Text(f"Checkpoint: {report['checkpoint']} ({report['model']}, epoch {report['epoch']})"),
        Text(f"Test set: {report['dataset']}, {fmt_int(report['samples'])} images"),
        Text.assemble("Test loss ", (f"{report['test_loss']:.4f}", "bold"), ", accuracy ",
                      (f"{report['test_acc']:.2f}%", "bold"),
                      (f" (recorded in the run: {report['recorded_test_acc']:.2f}%)"
                       if report.get("recorded_test_acc") is not None else "")),
    ]
    per_class = Table(title="Per class (percent)", title_justify="left")
    for name in ("class", "support", "accuracy", "precision", "recall"):
        per_class.add_column(name.capitalize(), justify="right")
    for row in report["per_class"]:
        per_class.add_row(str(row["class"]), fmt_int(row["support"]),
                          *(f"{row[k]:.2f}" for k in ("accuracy", "precision", "recall")))
    cm = report["confusion_matrix"]
    matrix = Table(title="Confusion matrix (rows: true class, columns: predicted)", title_justify="left")
    matrix.add_column("", style="bold", justify="right")
    for c in range(len(cm)):
        matrix.add_column(str(c), justify="right")
    for r, row in enumerate(cm):
        matrix.add_row(str(r), *(Text(str(v), style="bold green" if r == c else ("red" if v else "dim"))
                                 for c, v in enumerate(row)))
    return Group(*head, per_class, matrix)


# --------------------------------------------------------------------------- compare


def compare_tables(report: dict[str, Any]) -> Group:
    from mnistkit.compare import CHECK_LABELS, NOT_RUN, check_keys, row_cells, sparkline

    c = report["constraints"]
    table = Table(title=f"Change-log ({report['experiments']}) beside runs in {report['runs_dir']}/",
                  title_justify="left", caption="reported / measured; measured: the final epoch of the newest run of each iteration "
                          "(\"of N!\": the run stopped before its N epochs). LR/Scheduler shows one value when both agree.",
                  caption_justify="left")
    for name, justify in (("Iter", "left"), ("Key changes", "left"), ("Params", "right"), ("Train acc", "right"),
                          ("Test acc", "right"), ("Best (ep)", "right"), (f">= {c.get('min_test_acc', '-')}% at", "right"),
                          ("Gap", "right"), ("Epochs", "right"), ("LR/Scheduler", "left"), ("Δ test", "right"),
                          ("Δ params", "right"), ("Test acc / epoch", "left")):
        table.add_column(name, justify=justify, no_wrap=name != "Key changes",
                         min_width=18 if name == "Key changes" else None)
    all_curves = [v for row in report["iterations"] if row["measured"] for v in row["measured"]["test_acc_curve"]]
    lo, hi = (min(all_curves), max(all_curves)) if all_curves else (None, None)

    def styled(text: str) -> Text:
        out = Text(text)
        for word, style in ((NOT_RUN, "dim"), ("never", "red")):
            out.highlight_words([word], style=style)
        return out

    for row in report["iterations"]:
        cells = {k: styled(v) for k, v in row_cells(row).items()}
        if not row["params_match"]:
            cells["params"].stylize("bold red", cells["params"].plain.index("/ ") + 2)
            cells["params"].append(" ≠", style="bold red")
        m = row["measured"]
        table.add_row(*cells.values(), sparkline(m["test_acc_curve"], lo, hi) if m else "")
    checks = Table(title="Assignment checklist (computed from each model and its newest run)", title_justify="left")
    checks.add_column("Iter")
    keys = check_keys(report)
    for k in keys:
        checks.add_column(CHECK_LABELS[k](c), justify="center")
    checks.add_column("All", justify="center")
    marks = {True: Text("✓", style="bold green"), False: Text("✗", style="bold red"), None: Text(NOT_RUN, style="dim")}
    for row in report["iterations"]:
        values = [row["checks"].get(k) for k in keys]
        overall = False if False in values else (None if None in values else True)
        checks.add_row(row["id"], *(marks[v] for v in values), marks[overall])
    return Group(table, checks)
