"""Every Rich table, panel, progress display and text format (Markdown, CSV, JSON, the plots),
one module per command family; nothing here trains or loads data: the library hands it typed
results and plain data. The CLI uses the names below.

Tables are built for the terminal they land on: each has a full layout and narrower ones, and
``fit`` picks the widest that fits, so that every table is readable at 80 columns and complete
at 120. Numeric columns fold instead of being cut: no number is ever shown as ``…``.
"""

from rich.text import Text

from mnistkit.render.common import (  # noqa: F401
    WIDTH_OFF_TTY, SafeConsole, clean, csv_cell, error_line, fit, safe_cell, xml_text,
    fmt_bytes, fmt_geometry, fmt_int, fmt_mult_adds, fmt_pct,
    fmt_shape, json_text, mean_std, note_line, num_column, plain, png_bytes, pyplot,
    required_width, spec_table, stderr, stdout, yes_no,
)
from mnistkit.render.curves import curves_png, run_colours  # noqa: F401
from mnistkit.render.models import (  # noqa: F401
    models_json, models_table, recipe_text, summary_json, summary_table,
)
from mnistkit.render.training import (  # noqa: F401
    TrainDisplay, seeds_table, train_result,
)
from mnistkit.render.evaluation import (  # noqa: F401
    SHADES, confusion_png, digit_picture, errors_png, evaluation, export_result, predictions,
)
from mnistkit.render.compare import (  # noqa: F401
    NO_RUN, SCHEDULER_NAMES, SEED_CAPTION, SPARKS, check_cell, check_keys, check_labels,
    compare_cells, compare_csv, compare_markdown, compare_plot, compare_tables, how_to_make,
    lr_scheduler, overall, seed_columns, sparkline,
)
from mnistkit.render.check import (  # noqa: F401
    check_junit, check_line, check_text, check_verdict,
)
from mnistkit.render.runs import (  # noqa: F401
    fmt_age, runs_table,
)
from mnistkit.render.sweep import (  # noqa: F401
    sweep_cells, sweep_csv, sweep_markdown, sweep_table,
)
