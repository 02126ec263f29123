"""`evaluate`, `predict`, `export`: figures, predictions with their pictures, the PNGs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from mnistkit.render.common import pyplot, num_column, png_bytes, fmt_bytes, fmt_int

if TYPE_CHECKING:  # pragma: no cover
    from mnistkit.training.evaluation import EvaluationReport


def best_line(on: str | None, epoch: Any) -> Text | None:
    """One line saying which split chose best.pt's epoch (``None`` for another checkpoint)."""
    if on == "test":
        return Text(f"best.pt: epoch {epoch} was chosen on the test set (the run held out no validation split), so "
                    "its test accuracy is optimistic: the figure that chose it", style="yellow")
    if on == "validation":
        return Text(f"best.pt: epoch {epoch} was chosen on the validation split; the test set did not choose it")
    return None


def evaluation(report: "EvaluationReport") -> Group:
    chosen = best_line(report.best_chosen_on, report.epoch)
    head = [
        Text(f"Checkpoint: {report.checkpoint} ({report.model}, epoch {report.epoch})"),
        *([chosen] if chosen else []),
        Text(f"Test set: {report.dataset}, {fmt_int(report.samples)} images"),
        Text.assemble("Test loss ", (f"{report.test_loss:.4f}", "bold"), ", accuracy ",
                      (f"{report.test_acc:.2f}%", "bold"),
                      (f" (recorded in the run: {report.recorded_test_acc:.2f}%)"
                       if report.recorded_test_acc is not None else "")),
    ]
    per_class = Table(title="Per class (percent; - where undefined)", title_justify="left")
    for name in ("class", "support", "accuracy", "precision", "recall"):
        num_column(per_class, name.capitalize())
    for row in report.per_class:
        per_class.add_row(str(row["class"]), fmt_int(row["support"]),
                          *("-" if row[k] is None else f"{row[k]:.2f}" for k in ("accuracy", "precision", "recall")))
    cm = report.confusion_matrix
    matrix = Table(title="Confusion matrix (rows: true class, columns: predicted)", title_justify="left")
    matrix.add_column("", style="bold", justify="right")
    for c in range(len(cm)):
        num_column(matrix, str(c))
    for r, row in enumerate(cm):
        matrix.add_row(str(r), *(Text(str(v), style="bold green" if r == c else ("red" if v else "dim"))
                                 for c, v in enumerate(row)))
    return Group(*head, per_class, matrix)


# --------------------------------------------------------------------------- compare

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
    num_column(table, "Digit")
    num_column(table, "Probability")
    table.add_column("Top 3", overflow="fold")
    for r in results:
        if r.error:
            table.add_row(Text(r.path), "-", "-", Text("unreadable (see the error below)", style="red"))
            continue
        top = ", ".join(f"{d}: {p:.1%}" for d, p in r.top3)
        table.add_row(Text(r.path), Text(str(r.digit), style="bold"), f"{r.probability:.1%}", top)
    chosen = best_line(getattr(result, "best_chosen_on", None), result.epoch)
    parts: list[RenderableType] = [table, *([chosen] if chosen else [])]
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


def errors_png(report: "EvaluationReport", limit: int = 100) -> bytes:
    """A grid of misclassified test digits, most confident mistakes first: true label,
    predicted label and its probability under each."""
    plt = pyplot()
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
    return png_bytes(fig, plt)


def confusion_png(report: "EvaluationReport") -> bytes:
    """The confusion matrix as a heat map with counts (rows: true class, columns: predicted);
    the colour scale is logarithmic so that a few mistakes still show beside ~1,000 hits."""
    import matplotlib.colors as mcolors

    plt = pyplot()
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
    return png_bytes(fig, plt)
