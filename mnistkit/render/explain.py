"""`explain`: one picture per digit (the input, the prediction, each convolution's first feature
maps, the Grad-CAM map over the digit) and the text table. Everything here reads the plain data
of ``explain.ExplainResult``: nothing runs the model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from mnistkit.render.common import fmt_int, num_column, png_bytes, pyplot

__all__ = ["explain_png", "explain_text", "explain_paths", "provenance"]


def provenance(result: Any) -> str:
    """What the model was trained on, in one line: the picture's title, the table's caption."""
    on = result.trained_on
    data = (f"trained on {fmt_int(on['train_samples'])} {on['dataset']} images" if on.get("dataset")
            else "training data not recorded")
    if on.get("dataset") == "synthetic" or on.get("full_training_set") is False:
        data += " (a shortened or synthetic run, not an iteration's result)"
    chosen = {"test": ", best.pt chosen on the test set", "validation": ", best.pt chosen on validation"}
    return (f"{result.model}, epoch {result.epoch}, seed {result.seed}, {data}"
            f"{chosen.get(result.best_chosen_on or '', '')}; {Path(result.checkpoint).name}")


def explain_paths(output: str, count: int, names: list[str]) -> list[str]:
    """Where each image's picture goes: ``output`` itself for one image, else ``STEM-N-IMAGE.png``
    beside it (N counts from 1, so two images of one name in two folders never collide)."""
    if count == 1:
        return [output]
    out = Path(output)
    return [str(out.with_name(f"{out.stem}-{i}-{Path(n).stem}{out.suffix or '.png'}")) for i, n in
            enumerate(names, 1)]


def explain_text(result: Any, written: dict[str, str]) -> Group:
    """For the terminal: each image's prediction, the layers shown and where its picture went."""
    table = Table(title=Text(f"What {result.model} sees ({provenance(result)})"), title_justify="left",
                  caption=f"Feature maps: the first {result.channels} channels of each nn.Conv2d; class-activation "
                          "map: Grad-CAM for the predicted class on the last convolution with a spatial map.",
                  caption_justify="left")
    table.add_column("Image", overflow="fold")
    num_column(table, "Digit")
    num_column(table, "Probability")
    table.add_column("Convolutions (channels x height x width)", overflow="fold")
    table.add_column("Grad-CAM on", overflow="fold")
    table.add_column("Picture", overflow="fold")
    for e in result.explanations:
        if e.error:
            table.add_row(Text(e.path), "-", "-", Text("unreadable (see the error below)", style="red"), "", "")
            continue
        convs = ", ".join(f"{m.name} {m.channels}x{m.height}x{m.width}" for m in e.layers) or "none"
        if e.functional_convs:
            convs += f" (+{e.functional_convs} F.conv2d call(s), not shown)"
        table.add_row(Text(e.path), Text(str(e.digit), style="bold"), f"{e.probability:.1%}", Text(convs),
                      Text(e.cam_layer or "-"), Text(written.get(e.path, "-")))
    return Group(table)


def explain_png(result: Any, e: Any) -> bytes:
    """One image: the input as the model saw it, the Grad-CAM map over it, the top 3; then one
    row per convolution with its first channels (each scaled to its own range)."""
    import numpy as np

    plt = pyplot()
    n = max(3, max((len(m.maps) for m in e.layers), default=0))
    rows = 1 + len(e.layers)
    fig, axes = plt.subplots(rows, n, figsize=(1.25 * n + 0.4, 1.35 * rows + 1.3), dpi=110, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    pixels = e.pixels.numpy()
    a0, a1, a2 = axes[0, 0], axes[0, 1], axes[0, 2]
    a0.imshow(pixels, cmap="gray", vmin=0, vmax=1)
    a0.set_title(f"input (28x28,\n{getattr(result, 'inputs', 'as predict prepares it')})", fontsize=7)
    a1.imshow(pixels, cmap="gray", vmin=0, vmax=1)
    if e.cam is not None:
        cam = e.cam.numpy()
        top = float(cam.max())
        if top > 0:
            a1.imshow(cam / top, cmap="jet", alpha=0.5, vmin=0, vmax=1)
            a1.set_title(f"Grad-CAM for {e.digit}\non {e.cam_layer}", fontsize=7)
        else:
            a1.set_title(f"Grad-CAM on {e.cam_layer}:\nzero everywhere", fontsize=7)
    else:
        a1.set_title("no Grad-CAM: no convolution\nwith a spatial map", fontsize=7)
    a2.text(0.0, 0.5, "\n".join([f"predicted {e.digit}: {e.probability:.1%}", "top 3:",
                                 *(f"  {d}: {p:.1%}" for d, p in e.top3)]),
            fontsize=8, va="center", ha="left", transform=a2.transAxes, family="monospace")
    for r, m in enumerate(e.layers, 1):
        for c in range(len(m.maps)):
            ax = axes[r, c]
            ax.imshow(np.asarray(m.maps[c].numpy()), cmap="viridis")
            if m.height * m.width == 1:   # one value: a colour says nothing, the number does
                ax.text(0, 0, f"{float(m.maps[c].flatten()[0]):.2g}", ha="center", va="center", fontsize=7,
                        color="white")
            ax.set_title(f"ch {c}", fontsize=6, pad=2)
        axes[r, 0].text(-0.08, 0.5, f"{m.name}\n{m.channels}x{m.height}x{m.width}", fontsize=7, rotation=90,
                        va="center", ha="right", transform=axes[r, 0].transAxes)
    missed = (f"; {e.functional_convs} F.conv2d call(s) outside nn.Conv2d not shown" if e.functional_convs else "")
    fig.suptitle(f"What the model sees: {Path(e.path).name} predicted {e.digit} ({e.probability:.1%})\n"
                 f"{provenance(result)}\nrows: the first {min(result.channels, n)} channels of each convolution's "
                 f"output (each map scaled to its own range){missed}", fontsize=8)
    fig.tight_layout()
    return png_bytes(fig, plt)
