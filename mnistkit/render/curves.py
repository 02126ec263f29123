"""Training curves as a picture: any runs overlaid, each labelled by what differs, one colour
each (``mnistkit plot`` and the write-up)."""

from __future__ import annotations

from typing import Any

from mnistkit.render.common import clean, png_bytes, pyplot


def run_colours(groups: list[str], plt: Any) -> dict[str, Any]:
    """A distinct colour for each group, in order: tab10 up to 10, tab20 up to 20, else evenly
    spaced along a perceptual colour map."""
    names = list(dict.fromkeys(groups))
    n = len(names)
    if n <= 10:
        colours = [plt.get_cmap("tab10")(i) for i in range(n)]
    elif n <= 20:
        colours = [plt.get_cmap("tab20")(i) for i in range(n)]
    else:
        colours = [plt.get_cmap("turbo")(0.05 + 0.9 * i / (n - 1)) for i in range(n)]
    return dict(zip(names, colours))


def _step_points(metrics: Any) -> tuple[list[float], list[float]]:
    """The recorded step losses of a run on an epoch axis (epoch e's step s of S at e - 1 + s/S)."""
    xs: list[float] = []
    ys: list[float] = []
    for m in metrics:
        points = getattr(m, "step_losses", None) or ()
        if points:
            last = points[-1][0]
            xs += [m.epoch - 1 + step / last for step, _ in points]
            ys += [loss for _, loss in points]
    return xs, ys


def _accuracy_floor(curves: list[Any]) -> float | None:
    """The accuracy axis' lower end: the lowest figure after epoch 1, with a margin (epoch 1 is
    often far below the rest and would flatten every difference that matters); None: no zoom."""
    if not curves or min(len(c.metrics) for c in curves) < 4:
        return None   # a short run is drawn whole
    later = [v for c in curves for m in c.metrics if m.epoch >= 2
             for v in (m.train_acc, m.test_acc, m.val_acc) if v is not None]
    low, high = min(later), max(later)
    return max(0.0, low - max(0.1 * (high - low), 0.05))


def curves_png(curves: list[Any], title: str = "Training curves", target: float | None = None,
               shared: str = "") -> bytes:
    """Each run (``curves.RunCurve``) in one colour of its group: accuracy (train dashed, test
    solid, validation dotted) on shared axes, loss likewise, the training loss per recorded
    step, and the LR at each epoch's last step; runs of one group after the first are thin. The
    legend names each run by its label, with ``shared`` (what every run has) as its title."""
    plt = pyplot()
    import textwrap

    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fig = plt.figure(figsize=(15, 8), dpi=110)
    grid = fig.add_gridspec(2, 3, width_ratios=[1, 1, 0.72])
    acc, loss = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])
    steps, lr = fig.add_subplot(grid[1, 0]), fig.add_subplot(grid[1, 1])
    legend = fig.add_subplot(grid[:, 2])
    colours = run_colours([c.group for c in curves], plt)
    seen_groups: set[str] = set()
    handles, no_steps, any_val = [], [], False
    for c in curves:
        first = c.group not in seen_groups
        seen_groups.add(c.group)
        style = {"color": colours[c.group], "linewidth": 1.7 if first else 0.9, "alpha": 1.0 if first else 0.6,
                 "marker": "o" if len(c.metrics) == 1 else None, "markersize": 4}   # one epoch: a point
        epochs = [m.epoch for m in c.metrics]
        (line,) = acc.plot(epochs, [m.test_acc for m in c.metrics], linestyle="-", **style)
        handles.append((line, c.label))
        acc.plot(epochs, [m.train_acc for m in c.metrics], linestyle="--", **style)
        loss.plot(epochs, [m.test_loss for m in c.metrics], linestyle="-", **style)
        loss.plot(epochs, [m.train_loss for m in c.metrics], linestyle="--", **style)
        if c.metrics[0].val_acc is not None:
            any_val = True
            acc.plot(epochs, [m.val_acc for m in c.metrics], linestyle=":", **style)
            loss.plot(epochs, [m.val_loss for m in c.metrics], linestyle=":", **style)
        xs, ys = _step_points(c.metrics)
        if xs:
            steps.plot(xs, ys, **{**style, "linewidth": style["linewidth"] * 0.7, "marker": None})
        else:
            no_steps.append(c)
        lr.plot(epochs, [m.lr for m in c.metrics], **style)
    floor = _accuracy_floor(curves)
    clipped = floor is not None and any(v < floor for c in curves for m in c.metrics
                                        for v in (m.train_acc, m.test_acc, m.val_acc) if v is not None)
    if floor is not None:
        acc.set_ylim(bottom=floor, top=min(100.0, acc.get_ylim()[1]))
    if target is not None:
        acc.axhline(target, color="grey", linestyle="--", linewidth=1)
    acc.set_title("accuracy (%)" + ("; epoch 1 is below the axis where not shown" if clipped else ""), fontsize=10)
    loss.set_title("loss (log scale)", fontsize=10)
    loss.set_yscale("log")
    recorded = len(curves) - len(no_steps)
    steps.set_title("training loss per recorded step (mean of each window; log scale)", fontsize=10)
    if recorded:
        steps.set_yscale("log")
    else:
        steps.text(0.5, 0.5, "not recorded by these runs\n(mnistkit 0.11 and before kept no step losses)",
                   ha="center", va="center", fontsize=9, color="#555555", transform=steps.transAxes)
        steps.set_yticks([])
    lr.set_title("learning rate at each epoch's last step", fontsize=10)
    plain_numbers = FuncFormatter(lambda v, _: f"{v:g}")
    for ax in (acc, loss, steps, lr):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.get_yscale() == "log":   # 0.5, not 5x10^-1; minor ticks labelled within about a decade
            low, high = ax.get_ylim()
            ax.yaxis.set_major_formatter(plain_numbers)
            ax.yaxis.set_minor_formatter(plain_numbers if high < 15 * low else NullFormatter())
            ax.tick_params(axis="y", which="minor", labelsize=7)
    legend.axis("off")
    if handles:
        key = [Line2D([], [], color="black", linestyle="-", label="test"),
               Line2D([], [], color="black", linestyle="--", label="train")]
        if any_val:
            key.append(Line2D([], [], color="black", linestyle=":", label="validation"))
        size = 8 if len(handles) <= 20 else 6
        heading = "runs" if len(handles) == 1 or not shared else textwrap.fill(f"runs (all: {shared})", 48)
        runs_legend = legend.legend([h for h, _ in handles], [textwrap.fill(clean(label), 52) for _, label in handles],
                                    loc="upper left", fontsize=size, frameon=False, title=clean(heading, lines=True),
                                    title_fontsize=size + 1, alignment="left")
        legend.add_artist(runs_legend)
        legend.legend(handles=key, loc="lower left", fontsize=8, frameon=False, title="line style (accuracy, loss)",
                      title_fontsize=8, alignment="left")
        if no_steps and recorded:
            legend.text(0, 0.2, f"{len(no_steps)} of {len(curves)} runs recorded no step losses\n"
                                "(mnistkit 0.11 and before)", fontsize=7, va="top")
    else:
        legend.text(0, 0.9, "no runs to draw", fontsize=10)
    fig.suptitle(clean(title), fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    return png_bytes(fig, plt)
