"""The application and what every command shares: one-line errors, the options several commands
take, the printers. The commands live beside it, one module per family.

torch is imported inside the commands, never at module level: ``mnistkit --help`` and
``mnistkit --version`` stay fast. Every error a user can cause, from a bad option value (Click)
to a damaged file (the library), is printed by ``fail`` as one line on stderr.
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable

import typer
from typer.core import TyperGroup

from mnistkit import __version__
from mnistkit.recipe import DEFAULT_BUDGET, Recipe

try:  # Typer that vendors Click: its option errors derive from TyperException
    from typer import TyperException as ClickException
except ImportError:  # pragma: no cover - older Typer with Click installed beside it
    from click.exceptions import ClickException
Abort = typer.Abort

_state = {"debug": False}
DEFAULTS = Recipe()  # the one owner of recipe defaults; help texts read them from here


def fail(message: str, code: int = 1) -> None:
    """The one error printer: one line on stderr, then exit with ``code``."""
    from mnistkit import render

    render.stderr().print(render.error_line(message), highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _flags_show_no_value() -> None:
    """Help shows a flag as a flag: Typer 0.29 prints every boolean flag's type (``--json <bool>``),
    which reads as if it took a value. The one place help asks for an option's type is taught
    that a flag has none (Typer versions without the method are left alone)."""
    from typer.core import TyperOption

    shown = getattr(TyperOption, "display_type_rich", None)
    if shown is not None and not getattr(shown, "_mnistkit", False):
        def display_type_rich(self: Any, ctx: Any) -> Any:
            return None if getattr(self, "is_flag", False) and self.metavar is None else shown(self, ctx)

        display_type_rich._mnistkit = True  # type: ignore[attr-defined]
        TyperOption.display_type_rich = display_type_rich


_flags_show_no_value()


class _OneLineErrors(TyperGroup):
    """Click's own errors (a bad option value, an unknown option) as one line too, instead of
    a usage box: ``error: Invalid value for '--budget': 0 is not in the range x>=1; see
    'mnistkit summary --help'``."""

    def main(self, args: Any = None, prog_name: Any = None, complete_var: Any = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        try:
            try:
                if sys.stdout is None:   # started with stdout closed (cmd >&-): the output would be lost
                    fail("standard output is closed; redirect it to a file (or to /dev/null)", 1)
                code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
                if standalone_mode:
                    sys.stdout.flush()   # what is still buffered must reach its file now, or fail here
            except ClickException as exc:
                ctx = getattr(exc, "ctx", None)
                hint = f"; see '{ctx.command_path} --help'" if ctx is not None else ""
                fail(exc.format_message().rstrip(".") + hint, exc.exit_code)
            except Abort:
                fail("aborted", 1)
            except OSError as exc:   # the library words its files' errors; one it did not still gets one line
                if exc.filename is not None:
                    fail(f"cannot use {exc.filename}: {exc.strerror or exc}; check the path", 1)
                _drop_stdout()   # no file named: writing stdout failed (a full disk, a closed pipe)
                fail(f"cannot write to standard output: {exc.strerror or exc}; choose another place for it", 1)
        except typer.Exit as exc:
            code = exc.exit_code
        if not standalone_mode:
            return code
        sys.exit(code if isinstance(code, int) else 0)


def _drop_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's flush at exit does not fail again."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


app = typer.Typer(
    name="mnistkit",
    cls=_OneLineErrors,
    help="Design, train, inspect and compare tiny CNNs on MNIST.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def handles_errors(fn: Callable) -> Callable:
    """Turn the errors a user can cause into one line on stderr and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from mnistkit.errors import MnistkitError

        try:
            return fn(*args, **kwargs)
        except MnistkitError as exc:
            from mnistkit.errors import ModelCodeError

            if _state["debug"]:
                raise
            hint = " (mnistkit --debug COMMAND ... shows the whole traceback)" if isinstance(exc, ModelCodeError) else ""
            fail(str(exc) + hint, exc.exit_code)
        except KeyboardInterrupt:
            if _state["debug"]:
                raise
            fail("interrupted", 130)

    return wrapper


def nonempty_path(value: Any) -> Any:
    """Typer callback for a path argument: an empty path (a variable that was not set, ``""``)
    is refused in one line instead of being taken as the current folder."""
    values = value if isinstance(value, (list, tuple)) else [value]
    if any(v is not None and str(v) == "" for v in values):
        raise typer.BadParameter("an empty path; name a file or a folder ('.' for the current folder)")
    return value


def examples(*lines: str) -> str:
    return "Examples:\n\n" + "\n\n".join(f"  {line}" for line in lines)


def print_json(data: Any) -> None:
    from mnistkit import render

    sys.stdout.write(render.json_text(data))


def note(message: str) -> None:
    from mnistkit import render

    render.stderr().print(render.note_line(message), highlight=False, soft_wrap=True)


def say(message: str) -> None:
    from mnistkit import render
    from rich.text import Text

    render.stderr().print(Text(message, style="dim"), highlight=False, soft_wrap=True)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mnistkit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Show the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors."),
) -> None:
    """Design, train, inspect and compare tiny CNNs on MNIST."""
    _state["debug"] = debug


BUDGET = typer.Option(DEFAULT_BUDGET, "--budget", min=1, help="Parameter budget for the check (strictly fewer).")
JSON = typer.Option(False, "--json", help="Print one JSON object on stdout instead of tables.")


EXPERIMENTS = typer.Option(None, "--experiments", metavar="FILE",
                           help="The change-log (default: ./experiments.yaml when present, else the one "
                                "shipped with mnistkit).")

MODEL_HELP = ("A registered model (I3), a change-log iteration's id (S1), FILE.py:Name (an nn.Module class or a "
              "function returning one), package.module:Name, or FILE.yaml (an architecture as data).")
MODEL_ARG = typer.Option(None, "--model-arg", metavar="NAME=VALUE",
                         help="A keyword argument for the model's class or function, e.g. width=12 (repeatable; "
                              "over the change-log's model_args).")
MODEL_CODE = typer.Option(None, "--model-code", metavar="FILE",
                          help="The Python file of the run's model, when it changed or moved since the run (or "
                               "the run came from elsewhere): you name it, so you trust it; the run folder keeps "
                               "a copy (model.py).")

SET = typer.Option(None, "--set", metavar="KEY=VALUE",
                   help="Any recipe key, over the change-log's recipe: weight_decay=5e-4, augment.degrees=7, "
                        "channels_last=false, scheduler=step (repeatable; values read as YAML scalars; checked as "
                        "the change-log's recipe is checked).")
THREADS = typer.Option(None, "--threads", min=1, max=1024,
                       help="torch's CPU threads for the work (default: torch's, one per core); runs record it. "
                            "Fewer than the cores helps where other jobs share the machine.")


def recipe_settings(pairs: Any, named: dict[str, tuple[str, Any]] | None = None) -> dict[str, Any]:
    """``--set`` pairs and the named recipe options (``{"lr": ("--lr", 0.1)}``) as one dict of
    recipe keys (``augment.KEY`` for an augmentation field); a key given both ways is one line."""
    from mnistkit.errors import UsageError
    from mnistkit.settings import parse_settings

    values = parse_settings(list(pairs or []))
    for key, (flag, value) in (named or {}).items():
        if value is None:
            continue
        if key in values:
            raise UsageError(f"{key} is given twice, by {flag} and by --set {key}=...; give it once", key=key)
        values[key] = value.value if hasattr(value, "value") else value
    return values


def main() -> None:
    app()
