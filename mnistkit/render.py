"""Every Rich table, panel, progress display and text format (markdown, CSV, JSON, the plot) in
one place. Nothing here trains or loads data; the library hands it typed results and plain data.

Tables are built for the terminal they land on: each has a full layout and narrower ones, and
``fit`` picks the widest that fits, so that every table is readable at 80 columns and complete
at 120. Numeric columns fold instead of being cut: no number is ever shown as ``…``.
"""

from __future__ import annotations

import csv
import io
import os
import statistics
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from rich.console import Console, Group, RenderableType
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from mnistkit import strictjson

if TYPE_CHECKING:  # pragma: no cover
    from mnistkit.evaluation import EvaluationReport
    from mnistkit.inspect import LayerInfo, ModelSummary
    from mnistkit.runs import EpochMetrics
    from mnistkit.training import RunStart, StepInfo

WIDTH_OFF_TTY = 120  # tables are complete at 120 columns; a pipe or file gets that width


def stdout() -> Console:
    """Console for results, created per call so that redirected streams (tests, pipes) are
    honoured. Off a terminal there is no width to respect: use the width every table is complete
    at (COLUMNS still wins)."""
    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(width=WIDTH_OFF_TTY)
    return console


def stderr() -> Console:
    return Console(stderr=True)


def error_line(message: str) -> Text:
    """The one line an error gets; the message is user text and never read as markup."""
    return Text.assemble(("error: ", "bold red"), message)


def note_line(message: str) -> Text:
    return Text.assemble(("note: ", "yellow"), message)


def json_text(data: Any) -> str:
    """Strict JSON (no NaN or Infinity: a figure that does not exist is null)."""
    return strictjson.dumps(data, indent=2) + "\n"


def _plain(cell: Any) -> str:
    return cell.plain if isinstance(cell, Text) else str(cell)


def required_width(renderable: RenderableType) -> int:
    """The narrowest width at which a table shows every cell whole: numbers and other no-wrap
    cells at full length, wrapping text at its longest word. Rich would go narrower by cutting
    or folding cells; ``fit`` uses this to choose a layout that never has to."""
    if isinstance(renderable, Group):
        return max((required_width(r) for r in renderable.renderables), default=0)
    if not isinstance(renderable, Table):
        return 0
    total = len(renderable.columns) + 1  # vertical borders
    for column in renderable.columns:
        cells = [_plain(c) for c in column._cells]
        words = [w for text in cells + [_plain(column.header)] for line in text.splitlines() for w in line.split()]
        longest_word = max((len(w) for w in words), default=0)
        if column.no_wrap:  # shown whole, header included
            need = max(len(line) for text in cells + [_plain(column.header)] for line in text.splitlines() or [""])
        elif column.justify == "center":  # marks: short cells under a header kept whole
            need = max(len(line) for text in cells + [_plain(column.header)] for line in text.splitlines() or [""])
        elif column.justify == "right":  # numbers: whole; their header may wrap between words
            need = max([longest_word] + [len(line) for text in cells for line in text.splitlines()])
        else:
            need = max(longest_word, column.min_width or 0)
        total += need + 2  # padding
    return total


def fit(console: Console, layouts: Sequence[Callable[[], RenderableType]]) -> RenderableType:
    """The first layout (widest first) that shows every cell whole at the console's width;
    else the last (the narrowest)."""
    built = None
    for make in layouts:
        built = make()
        if required_width(built) <= console.width:
            return built
    return built


def _num_column(table: Table, name: str, **kw: Any) -> None:
    table.add_column(name, justify="right", no_wrap=False, overflow="fold", **kw)


# --------------------------------------------------------------------------- numbers


def fmt_int(n: int) -> str:
    return f"{n:,}"


def fmt_bytes(n: float) -> str:
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


def fmt_pct(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}%"


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


def mean_std(stats: dict[str, Any] | None, digits: int = 2) -> str:
    if not stats:
        return "-"
    if stats.get("std") is None:
        return f"{stats['mean']:.{digits}f}%"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}%"


# --------------------------------------------------------------------------- models


def summary_json(s: "ModelSummary", description: str) -> dict[str, Any]:
    return {**s.to_dict(), "head": s.head, "description": description}


def models_json(rows: list[tuple["ModelSummary", str]], budget: int) -> dict[str, Any]:
    """The model list: each entry is the model's whole summary (the same shape as ``summary
    MODEL --json``), so there is one JSON shape for a model."""
    return {"models": [{"name": s.model, **summary_json(s, d)} for s, d in rows], "budget": budget}


def summary_table(s: "ModelSummary", console: Console) -> Group:
    def layout(wide: bool) -> Callable[[], Table]:
        def make() -> Table:
            caption = ("Kernel: size/stride/padding. RF: receptive field in input pixels (j: jump, the effective "
                       "stride); global: the layer sees the whole image.")
            if not wide:
                caption += " Each layer's input is the previous layer's output."
            table = Table(title=f"{escape(s.model)}: layer by layer, per image of {fmt_shape(s.input_size)}",
                          title_justify="left", caption=caption, caption_justify="left")
            table.add_column("#", justify="right", style="dim", no_wrap=True)
            table.add_column("Layer", no_wrap=True)
            if wide:
                table.add_column("Type", no_wrap=True)
            table.add_column("Kernel", no_wrap=True)
            if wide:
                table.add_column("Input", no_wrap=True)
            table.add_column("Output", no_wrap=True)
            _num_column(table, "Params")
            _num_column(table, "Mult-adds")
            _num_column(table, "RF")
            for layer in s.layers:
                params = fmt_int(layer.params) if layer.shared_with is None else f"shared #{layer.shared_with}"
                name = layer.name.removeprefix("net.")
                cells = [str(layer.index), name] + ([layer.type] if wide else []) + [fmt_geometry(layer)]
                cells += ([fmt_shape(layer.input_shape)] if wide else []) + [fmt_shape(layer.output_shape)]
                cells += [params, fmt_int(layer.mult_adds) if layer.mult_adds else "", fmt_rf(layer)]
                table.add_row(*(Text(c) for c in cells))
            return table
        return make

    table = fit(console, [layout(True), layout(False)])
    budget_style = "bold green" if s.within_budget else "bold red"
    verdict = "PASS" if s.within_budget else "FAIL"
    margin = s.budget - s.trainable_params
    uses = ", ".join(f"{label} {'yes' if on else 'no'}" for label, on in (
        ("BatchNorm", s.has_batchnorm), ("Dropout", s.has_dropout), ("GAP head", s.gap_head), ("FC head", s.fc_head)))
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


def models_table(rows: list[tuple["ModelSummary", str]], console: Console) -> RenderableType:
    def layout(with_description: bool) -> Callable[[], RenderableType]:
        def make() -> RenderableType:
            table = Table(title="Registered models", title_justify="left")
            table.add_column("Model", style="bold", no_wrap=True)
            _num_column(table, "Params")
            _num_column(table, "Mult-adds")
            table.add_column("Head", no_wrap=True)
            _num_column(table, "RF")
            table.add_column("BN", no_wrap=True)
            table.add_column("Drop", no_wrap=True)
            table.add_column("Budget", no_wrap=True)
            if with_description:
                table.add_column("Description", min_width=30, overflow="fold")
            for s, description in rows:
                cells = [Text(s.model), fmt_int(s.trainable_params), fmt_mult_adds(s.mult_adds), s.head,
                         f"global ({s.rf})" if s.rf_global else str(s.rf), yes_no(s.has_batchnorm),
                         yes_no(s.has_dropout),
                         Text("pass", style="green") if s.within_budget else Text("over", style="red")]
                table.add_row(*cells, *([Text(description)] if with_description else []))
            if with_description:
                return table
            return Group(table, *(Text.assemble((f"{s.model}: ", "bold"), d) for s, d in rows))
        return make

    return fit(console, [layout(True), layout(False)])


def recipe_text(model: str, recipe: dict[str, Any], described: str) -> str:
    import yaml

    return f"# {model}: {described}\n" + yaml.safe_dump(recipe, sort_keys=False)


# --------------------------------------------------------------------------- training display


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
            f"({start.data.dataset}), {start.epochs} epochs of {start.steps} steps"))
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
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


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
    _num_column(table, "Final test acc")
    _num_column(table, "Best test acc")
    _num_column(table, "Best epoch")
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


def evaluation(report: "EvaluationReport") -> Group:
    head = [
        Text(f"Checkpoint: {report.checkpoint} ({report.model}, epoch {report.epoch})"),
        Text(f"Test set: {report.dataset}, {fmt_int(report.samples)} images"),
        Text.assemble("Test loss ", (f"{report.test_loss:.4f}", "bold"), ", accuracy ",
                      (f"{report.test_acc:.2f}%", "bold"),
                      (f" (recorded in the run: {report.recorded_test_acc:.2f}%)"
                       if report.recorded_test_acc is not None else "")),
    ]
    per_class = Table(title="Per class (percent; - where undefined)", title_justify="left")
    for name in ("class", "support", "accuracy", "precision", "recall"):
        _num_column(per_class, name.capitalize())
    for row in report.per_class:
        per_class.add_row(str(row["class"]), fmt_int(row["support"]),
                          *("-" if row[k] is None else f"{row[k]:.2f}" for k in ("accuracy", "precision", "recall")))
    cm = report.confusion_matrix
    matrix = Table(title="Confusion matrix (rows: true class, columns: predicted)", title_justify="left")
    matrix.add_column("", style="bold", justify="right")
    for c in range(len(cm)):
        _num_column(matrix, str(c))
    for r, row in enumerate(cm):
        matrix.add_row(str(r), *(Text(str(v), style="bold green" if r == c else ("red" if v else "dim"))
                                 for c, v in enumerate(row)))
    return Group(*head, per_class, matrix)


# --------------------------------------------------------------------------- compare

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
    from mnistkit.compare import check_passed

    ok = check_passed(value)
    if ok is None:
        return NO_RUN, "dim"
    mark = "✓" if ok else "✗"
    if isinstance(value, dict):
        return f"{mark} {value['passed']}/{value['of']}", "bold green" if ok else "bold red"
    return mark, "bold green" if ok else "bold red"


def overall(row: dict[str, Any], keys: list[str]) -> Any:
    from mnistkit.compare import check_passed

    values = [check_passed(row["checks"].get(k)) for k in keys]
    return False if False in values else (None if None in values else True)


def how_to_make(row: dict[str, Any]) -> str:
    return f"mnistkit train {row['model']} --seeds 3"


def compare_cells(row: dict[str, Any]) -> dict[str, str]:
    """The text of one iteration's cells, shared by the markdown export and the Rich tables."""
    rep, m = row["reported"], row["measured"]
    return {
        "id": row["id"],
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


def _spec_table(title: str, caption: str | None, specs: list[tuple[str, str, Callable[[int], Any]]],
                n_rows: int) -> Table:
    """A table from column specs ``(header, kind, cell(i))``; kind: ``text`` (wraps), ``num``
    (right-aligned, folds rather than truncates), ``fixed`` (never wraps), ``mark`` (centred)."""
    t = Table(title=Text(title), title_justify="left", caption=Text(caption) if caption else None,
              caption_justify="left")
    for header, kind, _ in specs:
        if kind == "num":
            _num_column(t, header)
        elif kind == "mark":
            t.add_column(header, justify="center", overflow="fold")
        elif kind == "fixed":
            t.add_column(header, no_wrap=True)
        else:
            t.add_column(header, min_width=10, overflow="fold")
    for i in range(n_rows):
        t.add_row(*(v if isinstance(v := cell(i), Text) else Text(str(v)) for _, _, cell in specs))
    for column, (header, kind, _) in zip(t.columns, specs):
        if kind == "num":  # a fixed width: Rich narrows only the text columns, never a number
            cells = [_plain(c) for c in column._cells]
            column.width = max([len(w) for w in header.split()] + [len(c) for c in cells])
    return t


def compare_tables(report: dict[str, Any], console: Console, all_runs: bool = False) -> Group:
    c = report["constraints"]
    target = c.get("min_test_acc")
    rows = report["iterations"]
    cells = [compare_cells(row) for row in rows]
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
        return lambda: _spec_table(title, caption, [col[k] for k in keys], n)

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
        specs = [("Iter", "fixed", lambda i: rows[i]["id"])]
        specs += [(labels[k], "mark", (lambda k: lambda i: Text(*check_cell(rows[i]["checks"].get(k))))(k))
                  for k in keys]
        specs.append(("All", "mark", lambda i: Text(*check_cell(overall(rows[i], keys)))))
        return lambda: _spec_table("Assignment checklist (comparable runs only; accuracy checks count seeds)",
                                   None, specs, n)

    parts: list[RenderableType] = [
        Text(f"Runs used: {report['comparable_means']}.", style="dim"), changelog, measured,
        fit(console, [checklist(check_labels(c, report["consistent_epochs"])), checklist(short)]),
    ]
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
            return lambda: _spec_table(title, SEED_CAPTION, specs, len(per_seed))

        parts.append(fit(console, [seed_table(True), seed_table(False)]))
    for row in rows:
        if not row["measured"]:
            parts.append(Text(f"{row['id']}: no comparable run in {report['runs_dir']}; make one with: "
                              f"{how_to_make(row)}", style="yellow"))
    for bad in report.get("damaged_runs", []):
        parts.append(Text(f"skipped a damaged run folder: {bad['why']}", style="red"))
    others = [(row["id"], r) for row in rows for r in row["other_runs"]]
    if others and not all_runs:
        parts.append(Text(f"{len(others)} other run(s) not used (other data, fewer images or epochs, or another "
                          "recipe); --all-runs lists them.", style="dim"))
    if others and all_runs:
        def data(r: dict[str, Any]) -> str:
            return f"{r['dataset']}, {fmt_int(r['train_samples'])} train" if r["train_samples"] else str(r["dataset"])

        specs = [("Iter", "fixed", lambda i: others[i][0]),
                 ("Run", "text", lambda i: os.path.basename(others[i][1]["run"])),
                 ("Data", "text", lambda i: data(others[i][1])),
                 ("Seed", "num", lambda i: str(others[i][1]["seed"])),
                 ("Final test", "num", lambda i: fmt_pct(others[i][1]["test_acc"])),
                 ("Not comparable because", "text", lambda i: "; ".join(others[i][1]["why_not"]))]
        parts.append(_spec_table("Other runs: experiments, not the iterations (never counted in the checklist)",
                                 None, specs, len(others)))
    return Group(*parts)


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
        cell = compare_cells(row)
        params = cell["params"] + ("" if row["params_match"] else " **MISMATCH**")
        lines.append("| " + " | ".join([cell["id"], cell["changes"], params, cell["test_reported"], cell["test_measured"],
                                         cell["test_min"], cell["seeds"], cell["train"], cell["best"], cell["gap"],
                                         cell["epochs"], cell["lr"], cell["delta_test"], cell["delta_params"]]) + " |")
    keys = check_keys(report)
    labels = check_labels(c, report["consistent_epochs"])
    lines += ["", "| Iter | " + " | ".join(labels[k] for k in keys) + " | All |", "|---|" + "---|" * (len(keys) + 1)]
    for row in report["iterations"]:
        marks = [check_cell(row["checks"].get(k))[0].replace("✓", "✅").replace("✗", "❌") for k in keys]
        every = check_cell(overall(row, keys))[0].replace("✓", "✅").replace("✗", "❌")
        lines.append(f"| {row['id']} | " + " | ".join(marks) + f" | {every} |")
    seeds, per_seed = seed_columns(report)
    if seeds:
        target = c.get("min_test_acc")
        lines += ["", "| Iter | Params | Epochs | " + " | ".join(f"Seed {s}" for s in seeds)
                  + f" | Mean ± std | Min | Last {report['consistent_epochs']} ≥ {target}% | s / epoch |",
                  "|---|" + "---:|" * (len(seeds) + 4) + "---|---:|"]
        for it, params, epochs, cells, mean, low, last, sec in per_seed:
            lines.append("| " + " | ".join([it, params, epochs, *cells, mean, low, last, sec]) + " |")
        lines += ["", SEED_CAPTION]
    return "\n".join(lines) + "\n"


def compare_csv(report: dict[str, Any]) -> str:
    from mnistkit.compare import COLUMNS, flat_rows

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in flat_rows(report):
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return buffer.getvalue()


def compare_plot(report: dict[str, Any]) -> bytes:
    """Every iteration's mean test-accuracy curve (comparable runs) as PNG bytes (needs matplotlib)."""
    plt = _matplotlib()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=150)
    drawn = 0
    for row in report["iterations"]:
        m = row["measured"]
        if m:
            curve = m["test_acc_curve"]
            ax.plot(range(1, len(curve) + 1), curve, marker="o", markersize=3,
                    label=f"{row['id']} ({row['params']:,} params, {m['n']} seed{'s' if m['n'] > 1 else ''})")
            drawn += 1
    target = report["constraints"].get("min_test_acc")
    if target is not None:
        ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target}%")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%), mean over seeds")
    ax.set_title("Test accuracy per epoch, comparable runs" + ("" if drawn else " (none yet)"))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    return _png(fig, plt)


# --------------------------------------------------------------------------- predict, export, runs

SHADES = " ░▒▓█"


def digit_picture(pixels: Any) -> Text:
    """A 28x28 input in [0, 1] as 28 lines of 28 double-width block characters."""
    rows = []
    for row in pixels.tolist():
        rows.append("".join(SHADES[min(len(SHADES) - 1, int(v * len(SHADES)))] * 2 for v in row))
    return Text("\n".join(rows))


def predictions(result: Any, show: bool = False) -> Group:
    results = result.predictions
    on = result.trained_on
    trained = (f"trained on {on['dataset']}, {fmt_int(on['train_samples'])} images" if on.get("dataset")
               else "training data not recorded")
    table = Table(title=Text(f"Predictions of {result.model} (epoch {result.epoch}, {trained}; {result.checkpoint})"),
                  title_justify="left",
                  caption="Top 3: the three most likely digits with their probabilities.", caption_justify="left")
    table.add_column("Image", overflow="fold")
    _num_column(table, "Digit")
    _num_column(table, "Probability")
    table.add_column("Top 3", overflow="fold")
    for r in results:
        if r.error:
            table.add_row(Text(r.path), "-", "-", Text("unreadable (see the error below)", style="red"))
            continue
        top = ", ".join(f"{d}: {p:.1%}" for d, p in r.top3)
        table.add_row(Text(r.path), Text(str(r.digit), style="bold"), f"{r.probability:.1%}", top)
    parts: list[RenderableType] = [table]
    if show:
        for r in results:
            if r.pixels is not None:
                parts += [Text(f"{r.path}: what the model saw (28x28), predicted {r.digit}", style="bold"),
                          digit_picture(r.pixels)]
    return Group(*parts)


def export_result(result: Any) -> Text:
    line = Text(f"wrote {result.path} ({result.format}, {fmt_bytes(result.bytes)}, {result.model} from "
                f"{result.checkpoint})")
    if result.check is not None:
        c = result.check
        line.append(f"\nONNX Runtime beside PyTorch on the {c.dataset} test set: {c.same_predictions:,} of "
                    f"{c.images:,} predictions agree, max |logit difference| {c.max_abs_logit_difference:.1e} "
                    f"(tolerance {c.tolerance:g}): ", style="")
        line.append("passed" if c.passed else "FAILED", style="bold green" if c.passed else "bold red")
    return line


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
            "state": Text(labels.get(r.state, r.state), style=styles.get(r.state, "")),
            "state_short": Text("resumable" if r.state == "interrupted" else r.state, style=styles.get(r.state, "")),
            "age": fmt_age(max(0.0, now - r.modified)),
        }

    rows = [cells(r) for r in runs]
    spec = {"run": ("Run", "fixed"), "model": ("Model", "fixed"), "data": ("Data, train images", "text"),
            "seed": ("Seed", "num"), "epochs": ("Epochs", "num"), "final": ("Final test", "num"),
            "best": ("Best test", "num"), "state": ("State", "text"), "state_short": ("State", "fixed"),
            "age": ("Age", "num")}

    def layout(keys: list[str]) -> Callable[[], Table]:
        return lambda: _spec_table(f"Runs in {root}, newest first", "Best: * chosen on the test set; otherwise on a "
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


def _matplotlib() -> Any:
    from mnistkit.errors import MnistkitError

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MnistkitError("drawing a picture needs matplotlib, which is not installed; install it with "
                            "pip install 'mnistkit[plot]' (or pip install matplotlib)") from None
    return plt


def errors_png(report: "EvaluationReport", limit: int = 100) -> bytes:
    """A grid of misclassified test digits, most confident mistakes first: true label,
    predicted label and its probability under each."""
    plt = _matplotlib()
    shown = report.mistakes[:limit]
    cols = min(10, max(1, len(shown)))
    rows = max(1, -(-len(shown) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.35 * cols, 1.6 * rows + 0.6), dpi=150, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, m, img in zip(axes.flat, shown, report.mistake_images):
        ax.imshow(img.numpy(), cmap="gray_r", vmin=0, vmax=255)
        ax.set_title(f"true {m['label']} → {m['predicted']}\n{m['probability']:.0%}", fontsize=8,
                     color="darkred" if m["probability"] >= 0.9 else "black")
    more = f" (the {len(shown)} most confident shown)" if len(report.mistakes) > len(shown) else ""
    fig.suptitle(f"{report.model}: {len(report.mistakes):,} of {report.samples:,} {report.dataset} test digits "
                 f"misclassified{more}", fontsize=10)
    if not shown:
        axes.flat[0].text(0.5, 0.5, "no mistakes", ha="center", va="center")
    return _png(fig, plt)


def confusion_png(report: "EvaluationReport") -> bytes:
    """The confusion matrix as a heat map with counts (rows: true class, columns: predicted);
    the colour scale is logarithmic so that a few mistakes still show beside ~1,000 hits."""
    import matplotlib.colors as mcolors

    plt = _matplotlib()
    cm = report.confusion_matrix
    n = len(cm)
    fig, ax = plt.subplots(figsize=(6.4, 5.6), dpi=150)
    image = ax.imshow([[v + 1 for v in row] for row in cm], cmap="Blues", norm=mcolors.LogNorm())
    top = max(max(row) for row in cm) or 1
    for r in range(n):
        for c in range(n):
            v = cm[r][c]
            ax.text(c, r, str(v), ha="center", va="center", fontsize=8,
                    color="white" if v > top ** 0.5 else ("darkred" if v and r != c else "black"))
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xlabel("predicted digit")
    ax.set_ylabel("true digit")
    ax.set_title(f"{report.model}: confusion matrix on {fmt_int(report.samples)} {report.dataset} test digits "
                 f"({report.test_acc:.2f}%)", fontsize=10)
    fig.colorbar(image, ax=ax, label="count + 1 (log scale)")
    return _png(fig, plt)


def _png(fig: Any, plt: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


# --------------------------------------------------------------------------- sweep


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
    return _spec_table(f"Sweep {report['sweep']} ({report['runs']})", caption, spec, len(rows))


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
    return "\n".join(lines) + "\n"


def sweep_csv(report: dict[str, Any]) -> str:
    buffer = io.StringIO()
    fields = ["config", "model", "trials", "done", "failed", "test_acc_mean", "test_acc_std", "test_acc_min",
              "val_acc_mean", "passing", "seeds_done"] + list(report["varied"])
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for r in report["configs"]:
        t, v = r["test_acc"] or {}, r["val_acc"] or {}
        writer.writerow({"config": r["config"], "model": r["model"], "trials": r["trials"], "done": r["done"],
                         "failed": r["failed"], "test_acc_mean": t.get("mean", ""), "test_acc_std": t.get("std") or "",
                         "test_acc_min": t.get("min", ""), "val_acc_mean": v.get("mean", ""),
                         "passing": r["passing"], "seeds_done": " ".join(map(str, r["seeds_done"])),
                         **{k: r["values"].get(k, "") for k in report["varied"]}})
    return buffer.getvalue()
