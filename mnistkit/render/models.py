"""`summary`, `models` and `recipe`: a model's layer table, the registry overview, a recipe as YAML."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from rich.console import Console, Group, RenderableType
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from mnistkit.render.common import num_column, fit, fmt_bytes, fmt_geometry, fmt_int, fmt_mult_adds, fmt_rf, fmt_shape, yes_no

if TYPE_CHECKING:  # pragma: no cover
    from mnistkit.summary import LayerInfo, ModelSummary


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
            if s.uncounted:
                caption += " ?: the layer calls ops that are not counted (listed below)."
            method = s.extra.get("receptive_field", "gradient")
            if method != "gradient":
                caption += f" RF by the layer {escape(method)}."
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
                cells = [str(layer.index), name] + ([layer.type] if wide else []) + [fmt_geometry(layer)]
                cells += ([fmt_shape(layer.input_shape)] if wide else []) + [fmt_shape(layer.output_shape)]
                cells += [params, _mult_adds_cell(layer), fmt_rf(layer)]
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
        f"Mult-adds per image: {fmt_int(s.mult_adds)} ({fmt_mult_adds(s.mult_adds)})" + _not_counted(s),
        f"Receptive field: {rf_line}",
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

    console = Console(file=io.StringIO(), width=width, color_system=None, force_terminal=False, highlight=False)
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
        cells = [str(layer.index), layer.name.removeprefix("net."), layer.type, fmt_geometry(layer),
                 fmt_shape(layer.output_shape), params, _mult_adds_cell(layer), fmt_rf(layer)]
        lines.append("| " + " | ".join(cell(c) for c in cells) + " |")
    verdict = "PASS" if s.within_budget else "FAIL"
    last_spatial = f"{s.rf}x{s.rf} pixels, jump {s.jump}"
    rf = f"global (last spatial layer: {last_spatial})" if s.rf_global else last_spatial
    lines += ["", f"**Totals:** {fmt_int(s.total_params)} parameters ({fmt_int(s.trainable_params)} trainable), "
              f"{fmt_int(s.buffers)} buffer values, {fmt_int(s.mult_adds)} mult-adds per image"
              f"{_not_counted(s)}, receptive field {rf}.",
              "", f"**Budget:** {fmt_int(s.trainable_params)} trainable params < {fmt_int(s.budget)}: {verdict} "
              f"({fmt_int(abs(s.budget - s.trainable_params))} {'to spare' if s.budget > s.trainable_params else 'over'})"]
    return "\n".join(lines) + "\n"


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

    return f"# {model}: {described}\n" + yaml.safe_dump(recipe, sort_keys=False)


# --------------------------------------------------------------------------- training display
