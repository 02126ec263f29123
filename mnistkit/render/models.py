"""`summary`, `models` and `recipe`: a model's layer table, the registry overview, a recipe as YAML."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from rich.console import Console, Group, RenderableType
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from mnistkit.render.common import SafeConsole, clean, num_column, fit, fmt_bytes, fmt_geometry, fmt_int, fmt_mult_adds, fmt_shape, yes_no

if TYPE_CHECKING:  # pragma: no cover
    from mnistkit.introspect.summary import LayerInfo, ModelSummary


def summary_json(s: "ModelSummary", description: str) -> dict[str, Any]:
    return {**s.to_dict(), "head": s.head, "description": description}


def models_json(rows: list[tuple["ModelSummary", str]], budget: int) -> dict[str, Any]:
    """The model list: each entry is the model's whole summary (the same shape as ``summary
    MODEL --json``), so there is one JSON shape for a model."""
    return {"models": [{"name": s.model, **summary_json(s, d)} for s, d in rows], "budget": budget}


def _rf_cell(layer: "LayerInfo") -> str:
    """A row's receptive field: ``22 (j2)``, or ``40 (global)`` where it covers the whole input."""
    return f"{layer.rf} (global)" if layer.rf_global else f"{layer.rf} (j{layer.jump})"


def _side(s: "ModelSummary") -> str:
    return "x".join(str(v) for v in s.input_size[2:]) or "1"


def _rf_caption(s: "ModelSummary") -> str:
    return (f"RF: receptive field in input pixels by the course's formula, r_out = r_in + (k - 1) * d * j_in, "
            f"not clipped at the image (j: jump, the effective stride, j_out = j_in * s); global: it covers the whole "
            f"{_side(s)} input (RF >= {max(s.input_size[2:], default=1)}, or after a pooling of the whole map).")


def _rf_line(s: "ModelSummary") -> str:
    last_spatial = f"{s.rf}x{s.rf} pixels, jump {s.jump}"
    if s.rf_global:
        return f"global: {s.rf_output} by the formula at the output (last layer with a map: {last_spatial})"
    return last_spatial


def _uncalled(s: "ModelSummary") -> str:
    return f", of which {fmt_int(s.uncalled_params)} in layers forward never calls" if s.uncalled_params else ""


def summary_table(s: "ModelSummary", console: Console) -> Group:
    def layout(wide: bool) -> Callable[[], Table]:
        def make() -> Table:
            caption = "Kernel: size/stride/padding. " + _rf_caption(s)
            if not wide:
                caption += " Each layer's input is the previous layer's output."
            if s.uncounted:
                caption += " ?: the layer calls ops that are not counted (listed below)."
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
            num_column(table, "Params")
            num_column(table, "Mult-adds")
            num_column(table, "RF")
            for layer in s.layers:
                params = fmt_int(layer.params) if layer.shared_with is None else f"shared #{layer.shared_with}"
                name = layer.name.removeprefix("net.")
                cells = [str(layer.index), name] + ([layer.label or layer.type] if wide else []) + [fmt_geometry(layer)]
                cells += ([fmt_shape(layer.input_shape)] if wide else []) + [fmt_shape(layer.output_shape)]
                cells += [params, _mult_adds_cell(layer), _rf_cell(layer)]
                table.add_row(*(Text(c) for c in cells))
            return table
        return make

    table = fit(console, [layout(True), layout(False)])
    budget_style = "bold green" if s.within_budget else "bold red"
    verdict = "PASS" if s.within_budget else "FAIL"
    margin = s.budget - s.trainable_params
    uses = ", ".join(f"{label} {'yes' if on else 'no'}" for label, on in (
        ("BatchNorm", s.has_batchnorm), ("Dropout", s.has_dropout), ("GAP head", s.gap_head), ("FC head", s.fc_head)))
    lines = [
        f"Parameters: {fmt_int(s.total_params)}{_uncalled(s)} (trainable {fmt_int(s.trainable_params)}, "
        f"non-trainable {fmt_int(s.non_trainable_params)})",
        f"Buffers: {fmt_int(s.buffers)} values (BatchNorm running statistics; not parameters)",
        f"Memory: parameters {fmt_bytes(s.param_bytes)}, buffers {fmt_bytes(s.buffer_bytes)}",
        f"Mult-adds per image: {fmt_int(s.mult_adds)} ({fmt_mult_adds(s.mult_adds)})" + _not_counted(s),
        f"Receptive field: {_rf_line(s)}",
        f"Uses: {uses}",
    ]
    budget = Text.assemble(
        "Budget: ",
        (f"{fmt_int(s.trainable_params)} trainable params < {fmt_int(s.budget)}: {verdict}", budget_style),
        f" ({fmt_int(abs(margin))} {'to spare' if margin > 0 else 'over'})",
    )
    return Group(table, *[Text(line) for line in lines], budget)


def _mult_adds_cell(layer: "LayerInfo") -> str:
    counted = fmt_int(layer.mult_adds) if layer.mult_adds else ""
    return (f"{counted}+?" if counted else "?") if layer.uncounted else counted


def _not_counted(s: "ModelSummary") -> str:
    if not s.uncounted:
        return ""
    calls = ", ".join(f"{op} ({n} call{'s' if n != 1 else ''})" for op, n in s.uncounted_calls.items())
    return f"; not counted: {calls}"


def summary_text(s: "ModelSummary", width: int = 120) -> str:
    """The summary table as plain text (no colour), as ``print(summary)`` shows it."""
    import io

    console = SafeConsole(file=io.StringIO(), width=width, color_system=None, force_terminal=False, highlight=False)
    console.print(summary_table(s, console))
    return console.file.getvalue()


def summary_markdown(s: "ModelSummary") -> str:
    """The layer table as GitHub Markdown, then the totals and the budget check."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|") or " "

    lines = ["| # | Layer | Type | Kernel | Output | Params | Mult-adds | RF |",
             "|--:|:--|:--|:--|:--|--:|--:|--:|"]
    for layer in s.layers:
        params = fmt_int(layer.params) if layer.shared_with is None else f"shared #{layer.shared_with}"
        cells = [str(layer.index), layer.name.removeprefix("net."), layer.label or layer.type, fmt_geometry(layer),
                 fmt_shape(layer.output_shape), params, _mult_adds_cell(layer), _rf_cell(layer)]
        lines.append("| " + " | ".join(cell(c) for c in cells) + " |")
    verdict = "PASS" if s.within_budget else "FAIL"
    lines += ["", f"**Totals:** {fmt_int(s.total_params)} parameters{_uncalled(s)} ({fmt_int(s.trainable_params)} trainable), "
              f"{fmt_int(s.buffers)} buffer values, {fmt_int(s.mult_adds)} mult-adds per image"
              f"{_not_counted(s)}, receptive field {_rf_line(s)}.",
              "", f"**Budget:** {fmt_int(s.trainable_params)} trainable params < {fmt_int(s.budget)}: {verdict} "
              f"({fmt_int(abs(s.budget - s.trainable_params))} {'to spare' if s.budget > s.trainable_params else 'over'})"]
    return "\n".join(lines) + "\n"


RF_HEADER = ("layer", "n_in", "n_out", "k", "p", "s", "d", "r_in", "r_out", "j_in", "j_out")


def _rf_cells(s: "ModelSummary") -> tuple[tuple[str, ...], list[list[str]]]:
    """The course's table (``ModelSummary.rf_rows``) as text cells; the d column only where a layer is dilated."""
    rows = s.rf_rows()
    header = tuple(h for h in RF_HEADER if h != "d" or any(row["d"] != 1 for row in rows))
    return header, [[row["layer"].removeprefix("net.")] + [str(row[h]) for h in header[1:]] for row in rows]


def _rf_note(s: "ModelSummary") -> str:
    first = next((row for row in s.rf_rows() if row["global"]), None)
    side, n = _side(s), max(s.input_size[2:], default=1)
    note = ("r_out = r_in + (k - 1) * d * j_in, j_out = j_in * s, n: the side of the map. Layers with no window "
            "(activations, BatchNorm, Dropout, views, adds) change neither r nor j and are left out; where paths "
            "merge, r_in is the largest branch's.")
    if first is not None:
        note += (f" Global from {first['layer'].removeprefix('net.')} on: it covers the whole {side} input "
                 f"(r_out >= {n}, or a pooling of the whole map).")
    return note


def rf_table(s: "ModelSummary") -> Table:
    """``summary MODEL --rf``: the course's receptive-field table, one row per layer with a window."""
    header, rows = _rf_cells(s)
    table = Table(title=f"{escape(s.model)}: receptive field by the course's formula, on a {fmt_shape(s.input_size)} input",
                  title_justify="left", caption=_rf_note(s), caption_justify="left")
    table.add_column(header[0], no_wrap=True)
    for h in header[1:]:
        num_column(table, h)
    for cells in rows:
        table.add_row(*(Text(c) for c in cells))
    return table


def rf_markdown(s: "ModelSummary") -> str:
    """``summary MODEL --rf --format markdown``: the same table in GitHub Markdown, to paste into a README."""
    header, rows = _rf_cells(s)
    lines = ["| " + " | ".join(header) + " |", "|:--|" + "--:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |" for cells in rows]
    return "\n".join(lines) + "\n\n" + _rf_note(s) + "\n"


def models_table(rows: list[tuple["ModelSummary", str]], console: Console) -> RenderableType:
    def layout(with_description: bool) -> Callable[[], RenderableType]:
        def make() -> RenderableType:
            table = Table(title="Registered models", title_justify="left")
            table.add_column("Model", style="bold", no_wrap=True)
            num_column(table, "Params")
            num_column(table, "Mult-adds")
            table.add_column("Head", no_wrap=True)
            num_column(table, "RF")
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

    return clean(f"# {model}: {described}\n" + yaml.safe_dump(recipe, sort_keys=False), lines=True)


# --------------------------------------------------------------------------- training display
