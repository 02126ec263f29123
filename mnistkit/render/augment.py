"""``mnistkit augment``: the trainer's first batch as a grid, each digit as stored above the same
digit as trained, the drawn parameters under it, the recipe's settings and the provenance in
the title."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mnistkit.render.common import clean, png_bytes, pyplot

if TYPE_CHECKING:  # pragma: no cover
    from mnistkit.training.augpreview import AugmentPreview

COLUMNS = 8


def shown_pixels(preview: "AugmentPreview") -> Any:
    """The pixels the grid draws for the augmented digits: the batch itself, un-normalised
    (``images * std + mean``) to the [0, 1] of the stored digits; nothing else is computed."""
    r = preview.recipe
    return (preview.images * r.std + r.mean).clamp(0, 1)


def drawn_text(p: dict[str, Any]) -> str:
    return f"{p['angle']:+.1f}° ({p['translate_x']:+d},{p['translate_y']:+d}) ×{p['scale']:.3f}"


def augment_png(preview: "AugmentPreview") -> bytes:
    plt = pyplot()
    n = len(preview.labels)
    cols = min(COLUMNS, n)
    rows = -(-n // cols)
    height = 3.0 * rows + 1.0   # inches: a pair of digits with their titles, and the figure's title
    fig, axes = plt.subplots(2 * rows, cols, figsize=(max(1.45 * cols, 7.5), height), dpi=110, squeeze=False,
                             gridspec_kw={"hspace": 0.32, "wspace": 0.12, "top": 1 - 1.0 / height,
                                          "bottom": 0.1 / height, "left": 0.02, "right": 0.98})
    trained = shown_pixels(preview)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        r, c = divmod(i, cols)
        top, bottom = axes[2 * r][c], axes[2 * r + 1][c]
        top.imshow(preview.originals[i, 0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        top.set_title(f"{preview.labels[i]}: as stored", fontsize=7, color="#555555")
        bottom.imshow(trained[i, 0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        bottom.set_title("as trained" if not preview.recipe.augment.enabled else drawn_text(preview.params[i]),
                         fontsize=7)
    fig.suptitle(clean(f"Augmentation of {preview.model}'s recipe: {preview.settings}\n{preview.provenance}\n"
                       "Each digit as stored (above) and as the trainer's own batch has it (below), with what was "
                       "drawn:\nrotation in degrees (+ clockwise), shift in pixels (x right, y down), scale",
                       lines=True), fontsize=9, y=1 - 0.08 / height, va="top")
    return png_bytes(fig, plt)
