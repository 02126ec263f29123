"""The command line: parse options, call the library, render. No logic of its own.

torch is imported inside the commands, never at module level: ``mnistkit --help`` and
``mnistkit --version`` stay fast.
"""

from __future__ import annotations

import functools
import json
import sys
from typing import Any, Callable, Optional

import typer

from mnistkit import __version__

app = typer.Typer(
    name="mnistkit",
    help="Design, train, inspect and compare tiny CNNs on MNIST.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_state = {"debug": False}


def _error(message: str, code: int = 1) -> None:
    from mnistkit import render

    render.stderr().print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def handles_errors(fn: Callable) -> Callable:
    """Turn the errors a user can cause into one line on stderr and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from mnistkit.errors import MnistkitError

        try:
            return fn(*args, **kwargs)
        except MnistkitError as exc:
            if _state["debug"]:
                raise
            _error(str(exc), exc.exit_code)

    return wrapper


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


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


def _models_overview(as_json: bool, budget: int) -> None:
    from mnistkit import render
    from mnistkit.inspect import summarize
    from mnistkit.models import get_model, list_models, model_info

    rows = []
    for name in list_models():
        rows.append((summarize(get_model(name), name=name, budget=budget), model_info(name).description))
    if as_json:
        _print_json({
            "models": [
                {"name": s.model, "params": s.trainable_params, "mult_adds": s.mult_adds, "head": s.head,
                 "rf": s.rf, "rf_global": s.rf_global, "batchnorm": s.has_batchnorm,
                 "dropout": s.has_dropout, "within_budget": s.within_budget, "description": d}
                for s, d in rows
            ],
            "budget": budget,
        })
    else:
        render.stdout().print(render.models_table(rows))


def _positive(value: int) -> int:
    if value <= 0:
        raise typer.BadParameter("must be a positive integer")
    return value


@app.command()
@handles_errors
def summary(
    model: Optional[str] = typer.Argument(None, help="Registered model name, e.g. I3. Omit to list all models."),
    budget: int = typer.Option(20_000, "--budget", callback=_positive, help="Parameter budget for the check."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout instead of tables."),
) -> None:
    """Layer-by-layer table of a model: shapes, parameters, mult-adds, receptive field, budget check."""
    if model is None:
        _models_overview(as_json, budget)
        return
    from mnistkit import render
    from mnistkit.inspect import summarize
    from mnistkit.models import get_model, model_info

    entry = model_info(model)
    s = summarize(get_model(entry.name), name=entry.name, budget=budget)
    if as_json:
        data = s.to_dict()
        data["description"] = entry.description
        _print_json(data)
    else:
        out = render.stdout()
        out.print(f"[bold]{entry.name}[/]: {entry.description}", highlight=False)
        out.print(render.summary_table(s))


@app.command("models")
@handles_errors
def models_cmd(
    budget: int = typer.Option(20_000, "--budget", callback=_positive, help="Parameter budget for the check."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List the registered models: params, mult-adds, head, receptive field, description."""
    _models_overview(as_json, budget)


def main() -> None:
    app()
