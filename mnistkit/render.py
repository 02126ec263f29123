"""Every Rich table, panel and progress display in one place. Nothing here trains or loads data."""

from __future__ import annotations

import os
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
