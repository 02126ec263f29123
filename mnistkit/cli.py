"""The command line: parse options, call the library, render. No logic of its own.

torch is imported inside the commands, never at module level: ``mnistkit --help`` and
``mnistkit --version`` stay fast.
"""

from __future__ import annotations

import functools
import json
import os
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
        except KeyboardInterrupt:
            if _state["debug"]:
                raise
            _error("interrupted", 130)

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


def _check_choice(value: str, choices: tuple[str, ...], option: str) -> str:
    from mnistkit.errors import UsageError

    if value.lower() not in choices:
        raise UsageError(f"unknown {option[2:]} {value!r} for {option}; choose one of: {', '.join(choices)}")
    return value.lower()


def _check_dataset(value: str) -> str:
    from mnistkit.data import DATASETS

    return _check_choice(value, DATASETS, "--dataset")


@app.command("train")
@handles_errors
def train_cmd(
    model: Optional[str] = typer.Argument(None, help="Model to train; default: the final iteration in experiments.yaml (I3)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", "-e", help="Epochs (default: the iteration's recipe)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", help="Training batch size (recipe: 256)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Maximum learning rate (OneCycleLR) or initial LR (StepLR)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed (recipe: 42)."),
    precision: Optional[str] = typer.Option(None, "--precision", help="auto, fp32 or bf16 for the training "
                                            "step (recipe: auto = bf16 where the hardware has it natively)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or mps; auto picks cuda, then mps, then cpu."),
    dataset: str = typer.Option("mnist", "--dataset", help="mnist, or synthetic (made locally, no download)."),
    data_dir: Optional[str] = typer.Option(None, "--data-dir", help="Folder with the MNIST IDX files "
                                           "(default: $MNISTKIT_DATA, else ~/.cache/mnistkit; downloaded if absent)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Use only the first N training samples."),
    runs_dir: str = typer.Option("runs", "--runs-dir", help="Where run folders are written."),
    experiments: Optional[str] = typer.Option(None, "--experiments", help="The change-log file (default: ./experiments.yaml)."),
    resume: Optional[str] = typer.Option(None, "--resume", help="Continue an interrupted run from its folder."),
    all_iterations: bool = typer.Option(False, "--all", help="Train every iteration of experiments.yaml, each with its own recipe."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON summary on stdout at the end."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress display and no per-epoch rows."),
) -> None:
    """Train a registered model with its iteration's recipe from experiments.yaml."""
    from mnistkit import render
    from mnistkit.errors import UsageError
    from mnistkit.experiments import DEFAULT_PATH, find_experiments, load_experiments, resolve_recipe
    from mnistkit.models import list_models
    from mnistkit.training import DataOptions, train

    console = render.stderr() if as_json else render.stdout()

    def run(**kwargs: Any) -> dict:
        display = render.TrainDisplay(console, quiet=quiet)
        try:
            summary = train(device=device, runs_dir=runs_dir, callback=display, **kwargs).to_dict()
        finally:
            display.close()
        if not quiet:
            console.print(render.train_result(summary), highlight=False)
        return summary

    if resume is not None:
        given = [name for name, value in (("MODEL", model), ("--all", all_iterations or None), ("--epochs", epochs),
                                          ("--batch-size", batch_size), ("--lr", lr), ("--seed", seed),
                                          ("--limit", limit), ("--data-dir", data_dir), ("--precision", precision))
                 if value is not None]
        if given:
            raise UsageError(f"--resume continues a run with its own recipe and data; drop {', '.join(given)}")
        summaries = [run(resume=resume)]
    else:
        data = DataOptions(_check_dataset(dataset), os.path.abspath(data_dir) if data_dir else None, limit)
        overrides = dict(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, precision=precision)
        if all_iterations:
            if model is not None:
                raise UsageError("--all trains every iteration; drop MODEL")
            exp = load_experiments(experiments or DEFAULT_PATH)
            models = [it.model for it in exp.iterations]
        else:
            exp = find_experiments(experiments)
            models = [model or (exp.iterations[-1].model if exp and exp.iterations else list_models()[-1])]
        summaries = [run(model_name=name, recipe=resolve_recipe(name, exp, **overrides), data=data)
                     for name in models]
    if as_json:
        _print_json({"runs": summaries} if all_iterations else summaries[0])


@app.command("evaluate")
@handles_errors
def evaluate_cmd(
    target: str = typer.Argument(..., help="A run folder (uses its best.pt) or a checkpoint file."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="mnist or synthetic (default: the run's)."),
    data_dir: Optional[str] = typer.Option(None, "--data-dir", help="Folder with the MNIST IDX files."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or mps."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> None:
    """Test loss and accuracy, per-class figures and the confusion matrix of a checkpoint."""
    from mnistkit import render
    from mnistkit.training import evaluate_checkpoint

    if dataset is not None:
        dataset = _check_dataset(dataset)
    report = evaluate_checkpoint(target, dataset=dataset, data_dir=data_dir, device=device)
    if as_json:
        _print_json(report)
    else:
        render.stdout().print(render.evaluation(report))


@app.command("compare")
@handles_errors
def compare_cmd(
    runs_dir: str = typer.Option("runs", "--runs-dir", help="Where run folders are."),
    experiments: str = typer.Option("experiments.yaml", "--experiments", help="The change-log file."),
    fmt: str = typer.Option("table", "--format", "-f", help="table, markdown, json or csv."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Write to this file instead of stdout."),
    plot: Optional[str] = typer.Option(None, "--plot", help="Also draw every iteration's test accuracy to this PNG."),
) -> None:
    """The change-log I0..I3: reported figures beside measured ones, deltas, and the assignment checks."""
    from mnistkit import compare, render
    from mnistkit.experiments import load_experiments
    from mnistkit.runs import atomic_write

    fmt = _check_choice(fmt, ("table", "markdown", "json", "csv"), "--format")
    report = compare.build_report(load_experiments(experiments), runs_dir)
    if fmt == "table":
        if output:
            import io

            from rich.console import Console

            console = Console(record=True, width=200, file=io.StringIO())
            console.print(render.compare_tables(report))
            text = console.export_text()
        else:
            render.stdout().print(render.compare_tables(report))
            text = None
    else:
        text = {"markdown": compare.to_markdown, "json": compare.to_json, "csv": compare.to_csv}[fmt](report)
    if text is not None:
        if output:
            try:
                atomic_write(output, text)
            except OSError as exc:
                _error(f"cannot write {output}: {exc.strerror or exc}; choose another --output")
        else:
            sys.stdout.write(text)
    if plot:
        compare.plot(report, plot)
    for path in (output, plot):
        if path:
            render.stderr().print(f"wrote {path}", highlight=False)


def main() -> None:
    app()
