"""Consoles, widths and number formats shared by every command's rendering."""

from __future__ import annotations

import io
import os
import re
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from rich.console import Console, ConsoleOptions, Group, RenderableType
from rich.segment import Segment
from rich.table import Table
from rich.text import Text

from mnistkit.files import strictjson

if TYPE_CHECKING:  # pragma: no cover
    from mnistkit.introspect.summary import LayerInfo


WIDTH_OFF_TTY = 120  # tables are complete at 120 columns; a pipe or file gets that width
MIN_WIDTH = 40       # a narrower width (COLUMNS=0, a tiny pane) is taken as this one

# --------------------------------------------------------------------------- user text, made safe

# C0 controls, DEL and C1 controls: ESC starts the sequences that clear a screen, set a window
# title or write the clipboard (OSC 52), and U+009B (CSI) does the same on some terminals. Rich
# drops only BEL, BS, VT, FF and CR.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_CONTROL_BUT_LINES = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")   # keeps \t and \n
_NAMED = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _shown(match: "re.Match[str]") -> str:
    char = match.group()
    return _NAMED.get(char) or f"\\x{ord(char):02x}"


def clean(text: Any, lines: bool = False) -> str:
    """User text made safe to print or to write into a document someone will ``cat``: every
    control character (C0, DEL, C1) is shown as its escape (ESC as ``\\x1b``, a newline as
    ``\\n``), so a name, a change-log's text or a message can neither drive the terminal nor
    break one line into two. ``lines=True`` keeps newlines and tabs (text meant to span lines: a
    whole Markdown or CSV document). The one mechanism: every console of ``stdout``/``stderr``
    applies it to all it prints, and the document writers apply it to what they return."""
    return (_CONTROL_BUT_LINES if lines else _CONTROL).sub(_shown, str(text))


_FORMULA = ("=", "+", "-", "@", "\t", "\r")   # what a spreadsheet reads as the start of a formula


def csv_cell(value: Any) -> Any:
    """A CSV cell: numbers stay numbers; text has its controls shown (newlines kept: the CSV
    writer quotes them) and, when it begins like a formula (``=``, ``+``, ``-``, ``@``, a tab),
    gets a leading ``'`` so that a spreadsheet shows it instead of running it (OWASP's advice
    against CSV injection). None is an empty cell."""
    if value is None:
        return ""
    if not isinstance(value, str):
        return value
    text = clean(value, lines=True)
    return "'" + text if text.startswith(_FORMULA) else text


_XML_FORBIDDEN = re.compile("[\ud800-\udfff\ufffe\uffff]")


def xml_text(text: Any) -> str:
    """Text an XML 1.0 parser accepts: controls shown as ``clean`` shows them (XML forbids every
    C0 control but tab, newline and CR), and the code points XML forbids outright (lone
    surrogates, U+FFFE, U+FFFF) dropped."""
    return _XML_FORBIDDEN.sub("", clean(text, lines=True))


class SafeConsole(Console):
    """A Rich console that never writes a control character it did not make itself: the text of
    every segment goes through ``clean`` (newlines kept: they are the layout); Rich's own control
    segments (cursor moves of a live display) and the styles it adds are left alone."""

    def render(self, renderable: RenderableType, options: ConsoleOptions | None = None) -> Iterable[Segment]:
        for segment in super().render(renderable, options):
            if segment.control is None and _CONTROL_BUT_LINES.search(segment.text):
                segment = Segment(clean(segment.text, lines=True).replace("\t", " "), segment.style, None)
            yield segment


def stdout() -> Console:
    """Console for results, created per call so that redirected streams (tests, pipes) are
    honoured. Off a terminal there is no width to respect: use the width every table is complete
    at (COLUMNS still wins)."""
    console = SafeConsole()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = SafeConsole(width=WIDTH_OFF_TTY)
    elif console.width < MIN_WIDTH:   # COLUMNS=0 printed nothing, COLUMNS=10 tables of empty cells
        console = SafeConsole(width=MIN_WIDTH)
    return console


def stderr() -> Console:
    console = SafeConsole(stderr=True)
    return SafeConsole(stderr=True, width=MIN_WIDTH) if console.width < MIN_WIDTH else console


def error_line(message: str) -> Text:
    """The one line an error gets; the message is user text: never read as markup, and its
    control characters (a newline included) are shown, not obeyed."""
    return Text.assemble(("error: ", "bold red"), clean(message))


def note_line(message: str) -> Text:
    return Text.assemble(("note: ", "yellow"), clean(message))


def json_text(data: Any) -> str:
    """Strict JSON (no NaN or Infinity: a figure that does not exist is null)."""
    return strictjson.dumps(data, indent=2) + "\n"


def md_cell(text: Any) -> str:
    """User text as one Markdown table cell: one line, pipes escaped, controls shown, never empty."""
    return clean(" ".join(str(text).split())).replace("|", "\\|") or " "


def plain(cell: Any) -> str:
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
        cells = [plain(c) for c in column._cells]
        words = [w for text in cells + [plain(column.header)] for line in text.splitlines() for w in line.split()]
        longest_word = max((len(w) for w in words), default=0)
        if column.no_wrap:  # shown whole, header included
            need = max(len(line) for text in cells + [plain(column.header)] for line in text.splitlines() or [""])
        elif column.justify == "center":  # marks: short cells under a header kept whole
            need = max(len(line) for text in cells + [plain(column.header)] for line in text.splitlines() or [""])
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


def num_column(table: Table, name: str, **kw: Any) -> None:
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


def yes_no(flag: bool) -> Text:
    return Text("yes", style="green") if flag else Text("no", style="dim")


def mean_std(stats: dict[str, Any] | None, digits: int = 2) -> str:
    if not stats:
        return "-"
    if stats.get("std") is None:
        return f"{stats['mean']:.{digits}f}%"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}%"


# --------------------------------------------------------------------------- models


def pyplot() -> Any:
    from mnistkit.errors import MnistkitError

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MnistkitError("drawing a picture needs matplotlib, which is not installed; install it with "
                            "pip install 'mnistkit[plot]' (or pip install matplotlib)") from None
    return plt


def png_bytes(fig: Any, plt: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


# --------------------------------------------------------------------------- sweep


def safe_cell(value: Any) -> Text:
    """A table cell with its controls shown before the table is laid out (so its width is
    right; the console would show them anyway)."""
    if not isinstance(value, Text):
        return Text(clean(value))
    if not _CONTROL.search(value.plain):
        return value
    return Text(clean(value.plain), style=value.style)


def spec_table(title: str, caption: str | None, specs: list[tuple[str, str, Callable[[int], Any]]],
                n_rows: int) -> Table:
    """A table from column specs ``(header, kind, cell(i))``; kind: ``text`` (wraps), ``num``
    (right-aligned, folds rather than truncates), ``fixed`` (never wraps), ``mark`` (centred)."""
    t = Table(title=Text(title), title_justify="left", caption=Text(caption) if caption else None,
              caption_justify="left")
    for header, kind, _ in specs:
        if kind == "num":
            num_column(t, header)
        elif kind == "mark":
            t.add_column(header, justify="center", overflow="fold")
        elif kind == "fixed":
            t.add_column(header, no_wrap=True)
        else:
            t.add_column(header, min_width=10, overflow="fold")
    for i in range(n_rows):
        t.add_row(*(safe_cell(cell(i)) for _, _, cell in specs))
    for column, (header, kind, _) in zip(t.columns, specs):
        if kind == "num":  # a fixed width: Rich narrows only the text columns, never a number
            cells = [plain(c) for c in column._cells]
            column.width = max([len(w) for w in header.split()] + [len(c) for c in cells])
    return t
