"""The command line: parse options, call the library, render. No logic of its own.

torch is imported inside the commands, never at module level: ``mnistkit --help`` and
``mnistkit --version`` stay fast. Every error a user can cause, from a bad option value (Click)
to a damaged file (the library), is printed by ``fail`` as one line on stderr.
"""

from __future__ import annotations

import functools
import io
import sys
from typing import Any, Callable, List, Optional

import typer
from typer.core import TyperGroup

from mnistkit import __version__
from mnistkit.recipe import DEFAULT_BUDGET, DEFAULT_RUNS_DIR, Backend, Dataset, Precision, Recipe

try:  # Typer that vendors Click: its option errors derive from TyperException
    from typer import TyperException as ClickException
except ImportError:  # pragma: no cover - older Typer with Click installed beside it
    from click.exceptions import ClickException
Abort = typer.Abort

_state = {"debug": False}
_DEFAULTS = Recipe()  # the one owner of recipe defaults; help texts read them from here


def fail(message: str, code: int = 1) -> None:
    """The one error printer: one line on stderr, then exit with ``code``."""
    from mnistkit import render

    render.stderr().print(render.error_line(message), highlight=False, soft_wrap=True)
    raise typer.Exit(code)


class _OneLineErrors(TyperGroup):
    """Click's own errors (a bad option value, an unknown option) as one line too, instead of
    a usage box: ``error: Invalid value for '--budget': 0 is not in the range x>=1; see
    'mnistkit summary --help'``."""

    def main(self, args: Any = None, prog_name: Any = None, complete_var: Any = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        try:
            try:
                code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            except ClickException as exc:
                ctx = getattr(exc, "ctx", None)
                hint = f"; see '{ctx.command_path} --help'" if ctx is not None else ""
                fail(exc.format_message().rstrip(".") + hint, exc.exit_code)
            except Abort:
                fail("aborted", 1)
        except typer.Exit as exc:
            code = exc.exit_code
        if not standalone_mode:
            return code
        sys.exit(code if isinstance(code, int) else 0)


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
            if _state["debug"]:
                raise
            fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            if _state["debug"]:
                raise
            fail("interrupted", 130)

    return wrapper


def examples(*lines: str) -> str:
    return "Examples:\n\n" + "\n\n".join(f"  {line}" for line in lines)


def _print_json(data: Any) -> None:
    from mnistkit import render

    sys.stdout.write(render.json_text(data))


def _note(message: str) -> None:
    from mnistkit import render

    render.stderr().print(render.note_line(message), highlight=False, soft_wrap=True)


def _say(message: str) -> None:
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


def _models_overview(as_json: bool, budget: int) -> None:
    from mnistkit import render
    from mnistkit.summary import summarize
    from mnistkit.models import get_model, list_models, model_info

    rows = [(summarize(get_model(name), name=name, budget=budget), model_info(name).description)
            for name in list_models()]
    if as_json:
        _print_json(render.models_json(rows, budget))
    else:
        out = render.stdout()
        out.print(render.models_table(rows, out))


@app.command(epilog=examples("mnistkit summary I3", "mnistkit summary I2 --budget 15000 --json", "mnistkit summary"))
@handles_errors
def summary(
    model: Optional[str] = typer.Argument(None, help="Registered model name, e.g. I3. Omit to list all models."),
    budget: int = BUDGET,
    as_json: bool = JSON,
) -> None:
    """Layer-by-layer table of a model: shapes, parameters, mult-adds, receptive field, budget check."""
    if model is None:
        _models_overview(as_json, budget)
        return
    from mnistkit import render
    from mnistkit.summary import summarize
    from mnistkit.models import get_model, model_info

    entry = model_info(model)
    s = summarize(get_model(entry.name), name=entry.name, budget=budget)
    if as_json:
        _print_json(render.summary_json(s, entry.description))
    else:
        from rich.text import Text

        out = render.stdout()
        out.print(Text.assemble((entry.name, "bold"), f": {entry.description}"))
        out.print(render.summary_table(s, out))


@app.command("models", epilog=examples("mnistkit models", "mnistkit models --json"))
@handles_errors
def models_cmd(budget: int = BUDGET, as_json: bool = JSON) -> None:
    """List the registered models: params, mult-adds, head, receptive field, description."""
    _models_overview(as_json, budget)


EXPERIMENTS = typer.Option(None, "--experiments", metavar="FILE",
                           help="The change-log (default: ./experiments.yaml when present, else the one "
                                "shipped with mnistkit).")


@app.command("recipe", epilog=examples("mnistkit recipe I3", "mnistkit recipe I0 --experiments my.yaml"))
@handles_errors
def recipe_cmd(
    model: str = typer.Argument(..., help="Registered model name, e.g. I3."),
    experiments: Optional[str] = EXPERIMENTS,
) -> None:
    """Print the resolved training recipe of a model (its change-log entry over the defaults) as YAML."""
    from mnistkit import render
    from mnistkit.experiments import find_experiments, resolve_recipe
    from mnistkit.models import model_info

    name = model_info(model).name
    exp = find_experiments(experiments)
    recipe = resolve_recipe(name, exp)
    # stdout's first line names the change-log (a YAML comment), so it is not said again on stderr
    if exp.iteration_for_model(name) is None:
        _note(f"{name} is not in {exp.path}; it trains with the default recipe")
    sys.stdout.write(render.recipe_text(name, recipe.to_dict(), exp.described))


@app.command("train", epilog=examples(
    "mnistkit train I3                                 an iteration with its change-log recipe",
    "mnistkit train I1 --seeds 3 --data-dir ../mnist   seeds 1, 2, 3; mean ± std at the end",
    "mnistkit train I3 --val 10000                     best epoch chosen on 10,000 held-out images",
    "mnistkit train --resume runs/I3-20261125-101500   continue an interrupted run"))
@handles_errors
def train_cmd(
    model: Optional[str] = typer.Argument(None, help="Model to train; default: the change-log's final iteration."),
    epochs: Optional[int] = typer.Option(None, "--epochs", "-e", min=1, help="Epochs (default: the iteration's recipe)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", min=1,
                                             help=f"Training batch size (default: the recipe's; {_DEFAULTS.batch_size} "
                                                  "unless the change-log says otherwise)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Maximum learning rate (OneCycleLR) or initial LR (StepLR)."),
    seed: Optional[int] = typer.Option(None, "--seed", min=0, help=f"Random seed (default: {_DEFAULTS.seed})."),
    seeds: Optional[str] = typer.Option(None, "--seeds", metavar="N|LIST",
                                        help="Train once per seed: a count (3 = seeds 1, 2, 3) or a list (1,2,42); "
                                             "ends with mean ± std."),
    precision: Optional[Precision] = typer.Option(None, "--precision", case_sensitive=False,
                                                  help="The training step's precision (default: auto = bf16 where "
                                                       "the hardware has it natively)."),
    backend: Optional[Backend] = typer.Option(None, "--backend", case_sensitive=False,
                                              help="How the step computes: auto (the default: fused where mnistkit's "
                                                   "C kernel builds, else torch), torch (PyTorch's ops) or fused "
                                                   "(BatchNorm + ReLU in the kernel; CPU)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps; auto picks cuda, then mps, then cpu."),
    dataset: Dataset = typer.Option(Dataset.mnist, "--dataset", case_sensitive=False,
                                    help="mnist, or synthetic (made locally, no download)."),
    data_dir: Optional[str] = typer.Option(None, "--data-dir", help="Folder with the MNIST IDX files "
                                           "(default: $MNISTKIT_DATA, else ~/.cache/mnistkit; downloaded if absent)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Use only the first N training images "
                                        "(a shortened run: compare never counts it)."),
    val: int = typer.Option(0, "--val", min=0, help="Hold out N training images (a fixed draw) to choose the best "
                                                     "epoch on; the test set is then only reported."),
    runs_dir: str = typer.Option(DEFAULT_RUNS_DIR, "--runs-dir", help="Where run folders are written."),
    experiments: Optional[str] = EXPERIMENTS,
    resume: Optional[str] = typer.Option(None, "--resume", metavar="RUN", help="Continue an interrupted run from its folder."),
    all_iterations: bool = typer.Option(False, "--all", help="Train every iteration of the change-log, each with its own recipe."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON summary on stdout at the end."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress display and no per-epoch rows."),
) -> None:
    """Train a registered model with its iteration's recipe from the change-log."""
    from mnistkit import render
    from mnistkit.backends.memory import keep_freed_memory, release_memory
    from mnistkit.errors import UsageError
    from mnistkit.experiments import find_experiments
    from mnistkit.plan import make_plan, parse_seeds, train_plan
    from mnistkit.recipe import DataOptions
    from mnistkit.training import resume as resume_run

    console = render.stderr() if as_json else render.stdout()
    pending: list[str] = []  # said on stderr once training starts, so that an error stays one line

    def run(call: Callable, *args: Any, **kwargs: Any) -> dict:
        display = render.TrainDisplay(console, quiet=quiet, preamble=list(pending))
        pending.clear()
        try:
            result = call(*args, callback=display, **kwargs).to_dict()
        finally:
            display.close()
        if not quiet:
            console.print(render.train_result(result), highlight=False)
        return result

    def seeds_done(name: str, group: list[dict]) -> None:
        if len(group) > 1 and not quiet:
            console.print(render.seeds_table(group, plan.experiments.constraints.get("min_test_acc")))

    if resume is not None:
        given = [name for name, v in (("MODEL", model), ("--all", all_iterations or None), ("--epochs", epochs),
                                      ("--batch-size", batch_size), ("--lr", lr), ("--seed", seed), ("--seeds", seeds),
                                      ("--limit", limit), ("--val", val or None), ("--data-dir", data_dir),
                                      ("--precision", precision), ("--backend", backend),
                                      ("--experiments", experiments))
                 if v is not None]
        if given:
            raise UsageError(f"--resume continues a run with its own recipe and data; drop {', '.join(given)}")
    elif seed is not None and seeds is not None:
        raise UsageError("give --seed or --seeds, not both")
    elif all_iterations and model is not None:
        raise UsageError("--all trains every iteration; drop MODEL")
    keep_freed_memory()   # the CLI's process only: each step's buffers are reused, not faulted in anew
    try:
        if resume is not None:
            result = run(resume_run, resume, device=device)
            if as_json:
                _print_json(result)
            return
        plan = make_plan(find_experiments(experiments), model, all_iterations,
                         parse_seeds(seeds) if seeds is not None else [seed])
        pending += [plan.experiments.described, *plan.notes]
        overrides = {"epochs": epochs, "batch_size": batch_size, "lr": lr,
                     "precision": precision.value if precision else None, "backend": backend.value if backend else None}
        results = train_plan(plan, DataOptions(dataset.value, data_dir, limit, val), overrides, device, runs_dir,
                             run=run, on_group=seeds_done)
    finally:
        release_memory()
    if as_json:
        path = str(plan.experiments.path)
        _print_json({**results[0], "experiments": path} if len(results) == 1 else {"experiments": path, "runs": results})


@app.command("evaluate", epilog=examples("mnistkit evaluate runs/I3-20261125-101500",
                                         "mnistkit evaluate runs/I3-20261125-101500/last.pt --json",
                                         "mnistkit evaluate runs/I3-20261125-101500 --errors errors.png "
                                         "--confusion confusion.png"))
@handles_errors
def evaluate_cmd(
    target: str = typer.Argument(..., help="A run folder (uses its best.pt) or a checkpoint file."),
    dataset: Optional[Dataset] = typer.Option(None, "--dataset", case_sensitive=False,
                                              help="mnist or synthetic (default: the run's)."),
    data_dir: Optional[str] = typer.Option(None, "--data-dir", help="Folder with the MNIST IDX files (default: the run's)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    errors: Optional[str] = typer.Option(None, "--errors", metavar="PNG",
                                         help="Draw the misclassified test digits, most confident first."),
    confusion: Optional[str] = typer.Option(None, "--confusion", metavar="PNG",
                                            help="Draw the confusion matrix as a heat map with counts."),
    as_json: bool = JSON,
) -> None:
    """Test loss and accuracy, per-class figures and the confusion matrix of a checkpoint."""
    from mnistkit import render
    from mnistkit.evaluation import evaluate_checkpoint
    from mnistkit.outputs import check_output, write_output

    for path in (errors, confusion):
        if path:
            check_output(path)
    report = evaluate_checkpoint(target, dataset=dataset.value if dataset else None, data_dir=data_dir, device=device)
    pictures = [(path, draw(report)) for path, draw in ((errors, render.errors_png), (confusion, render.confusion_png))
                if path]  # drawn before any is written: all or nothing
    if as_json:
        _print_json(report.to_dict())
    else:
        render.stdout().print(render.evaluation(report))
    for path, png in pictures:
        write_output(path, png)
        _say(f"wrote {path}")


@app.command("predict", epilog=examples("mnistkit predict runs/I3-20261125-101500 examples/three.png",
                                        "mnistkit predict runs/I3-20261125-101500 my-digits/ --show",
                                        "mnistkit predict runs/I3-20261125-101500/best.pt photo.jpg --json"))
@handles_errors
def predict_cmd(
    target: str = typer.Argument(..., help="A run folder (uses its best.pt) or a checkpoint file."),
    images: List[str] = typer.Argument(..., help="Image files (PNG, JPEG, ...) or folders of them."),
    show: bool = typer.Option(False, "--show", help="Also draw each 28x28 input as the model saw it."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    as_json: bool = JSON,
) -> None:
    """Predict your own digit images: prepared as MNIST was (inverted, cropped, 20 px, centred by mass)."""
    from mnistkit import render
    from mnistkit.predict import predict

    result = predict(target, images, device=device)
    if as_json:
        _print_json(result.to_dict())
    else:
        render.stdout().print(render.predictions(result, show))
    failed = [r for r in result.predictions if r.error]
    for r in failed:
        render.stderr().print(render.error_line(r.error), highlight=False, soft_wrap=True)
    if failed:
        raise typer.Exit(1)


@app.command("export", epilog=examples("mnistkit export runs/I3-20261125-101500 --format onnx",
                                       "mnistkit export runs/I3-20261125-101500 --format safetensors -o i3.safetensors"))
@handles_errors
def export_cmd(
    target: str = typer.Argument(..., help="A run folder (uses its best.pt) or a checkpoint file."),
    fmt: str = typer.Option(..., "--format", "-f", help="onnx or safetensors."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="The file to write (default: beside the checkpoint)."),
    check: bool = typer.Option(True, "--check/--no-check", help="ONNX: compare with PyTorch on the whole test set."),
    data_dir: Optional[str] = typer.Option(None, "--data-dir", help="Test data for the check (default: the run's)."),
    as_json: bool = JSON,
) -> None:
    """Export a trained model to ONNX (checked with ONNX Runtime) or safetensors (no pickle)."""
    from mnistkit import render
    from mnistkit.export import export

    result = export(target, fmt.lower(), output, check=check, data_dir=data_dir)
    if as_json:
        _print_json(result.to_dict())
    else:
        render.stdout().print(render.export_result(result), highlight=False)


@app.command("runs", epilog=examples("mnistkit runs", "mnistkit runs --runs-dir runs-bench --json"))
@handles_errors
def runs_cmd(
    runs_dir: str = typer.Option(DEFAULT_RUNS_DIR, "--runs-dir", help="Where run folders are."),
    as_json: bool = JSON,
) -> None:
    """List the run folders: model, data, seed, epochs, accuracy, state (finished, resumable, diverged, damaged), age."""
    import time

    from mnistkit import render
    from mnistkit.runs import list_runs

    runs = list_runs(runs_dir)
    if as_json:
        _print_json({"runs_dir": runs_dir, "runs": [r.to_dict() for r in runs]})
        return
    if not runs:
        _say(f"no run folders in {runs_dir}; make one with: mnistkit train")
        return
    out = render.stdout()
    out.print(render.runs_table(runs, runs_dir, time.time(), out))


@app.command("compare", epilog=examples("mnistkit compare", "mnistkit compare --all-runs",
                                        "mnistkit compare --format markdown --output results.md --plot acc.png"))
@handles_errors
def compare_cmd(
    runs_dir: str = typer.Option(DEFAULT_RUNS_DIR, "--runs-dir", help="Where run folders are."),
    experiments: Optional[str] = EXPERIMENTS,
    fmt: Optional[str] = typer.Option(None, "--format", "-f", help="table (default), markdown, json or csv."),
    as_json: bool = typer.Option(False, "--json", help="The same as --format json."),
    all_runs: bool = typer.Option(False, "--all-runs", help="Also list the runs that are not comparable (never counted)."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Write to this file instead of stdout."),
    plot: Optional[str] = typer.Option(None, "--plot", metavar="PNG", help="Also draw every iteration's test accuracy to this PNG."),
) -> None:
    """The change-log: reported figures beside measured ones (comparable runs, over seeds), deltas, and the assignment checks."""
    from mnistkit import compare, render
    from mnistkit.errors import UsageError
    from mnistkit.experiments import find_experiments
    from mnistkit.outputs import check_output, write_output

    formats = ("table", "markdown", "json", "csv")
    if as_json and fmt not in (None, "json"):
        raise UsageError(f"--json and --format {fmt} disagree; give one")
    fmt = "json" if as_json else (fmt or "table").lower()
    if fmt not in formats:
        raise UsageError(f"unknown format {fmt!r}; choose one of: {', '.join(formats)}")
    for path in (output, plot):
        if path:
            check_output(path)
    exp = find_experiments(experiments)
    report = compare.build_report(exp, runs_dir)
    if fmt == "table":
        if output:
            from rich.console import Console

            console = Console(record=True, width=render.WIDTH_OFF_TTY, file=io.StringIO())
            console.print(render.compare_tables(report, console, all_runs))
            text = console.export_text()
        else:
            out = render.stdout()
            out.print(render.compare_tables(report, out, all_runs))
            text = None
    else:
        text = {"markdown": render.compare_markdown, "json": render.json_text, "csv": render.compare_csv}[fmt](report)
    png = render.compare_plot(report) if plot else None  # before any file is written: all or nothing
    if text is not None:
        if output:
            write_output(output, text)
        else:
            sys.stdout.write(text)
    if plot:
        write_output(plot, png)
    _say(exp.described)  # last, so that an error before it stays one line
    for path in (output, plot):
        if path:
            _say(f"wrote {path}")


@app.command("sweep", epilog=examples("mnistkit sweep examples/sweep-i3-lr.yaml",
                                      "mnistkit sweep spec.yaml --workers 1",
                                      "mnistkit sweep spec.yaml --ray HEAD:6379",
                                      "mnistkit sweep spec.yaml --resume",
                                      "mnistkit sweep spec.yaml --report --format markdown"))
@handles_errors
def sweep_cmd(
    spec_file: str = typer.Argument(..., metavar="SPEC.yaml", help="The sweep spec: models, seeds, grid or random, recipe, data."),
    runs_dir: str = typer.Option(DEFAULT_RUNS_DIR, "--runs-dir", help="Trials go to RUNS_DIR/<sweep name>/."),
    workers: Optional[int] = typer.Option(None, "--workers", "-w", min=1,
                                          help="Local worker processes (default: one per core; torch threads are split "
                                               "between them)."),
    ray: Optional[str] = typer.Option(None, "--ray", metavar="auto|ADDRESS|local",
                                      help="Run the trials as Ray tasks: auto (the cluster this machine belongs to), "
                                           "HEAD:6379, or local (an embedded Ray)."),
    resume: bool = typer.Option(False, "--resume", help="Run only what is missing: finished trials are skipped, "
                                                        "interrupted ones resumed."),
    report_only: bool = typer.Option(False, "--report", help="Only print the table of the trials done so far."),
    fmt: Optional[str] = typer.Option(None, "--format", "-f", help="table (default), markdown, json or csv."),
    as_json: bool = typer.Option(False, "--json", help="The same as --format json."),
    device: str = typer.Option("cpu", "--device", help="Device for every trial (cpu, cuda, ...)."),
) -> None:
    """Many trainings at once: a grid or random search of recipes over seeds, locally or on Ray."""
    import time

    from mnistkit import render
    from mnistkit.errors import UsageError
    from mnistkit.sweep import default_workers, load_spec, run_sweep, sweep_report

    formats = ("table", "markdown", "json", "csv")
    fmt = "json" if as_json else (fmt or "table").lower()
    if fmt not in formats:
        raise UsageError(f"unknown format {fmt!r}; choose one of: {', '.join(formats)}")
    spec = load_spec(spec_file)
    seconds = None
    if not report_only:
        err = render.stderr()
        err.print(render.Text(f"sweep {spec.name}: {len(spec.trials)} trials into {runs_dir}/{spec.name}/ "
                              f"({'Ray: ' + ray if ray else f'{workers or default_workers()} local worker(s)'})",
                              style="dim"))

        def said(record: dict, n: int) -> None:
            status = record["status"] + (" (already done)" if record.get("skipped") else "")
            line = f"[{n}/{len(spec.trials)}] {record['trial']}: {status}"
            if record.get("error") and record["status"] != "finished":
                line += f": {record['error']}"
            err.print(render.Text(line, style="red" if record["status"] in ("failed", "diverged") else ""),
                      highlight=False, soft_wrap=True)

        t0 = time.perf_counter()
        try:
            last_records = run_sweep(spec, runs_dir, workers=workers, ray=ray, device=device, resume=resume,
                                     on_result=said, keep_memory=True)
        except KeyboardInterrupt:
            fail(f"interrupted; run only what is missing with: mnistkit sweep {spec_file} --resume", 130)
        seconds = time.perf_counter() - t0
    records = []
    if not report_only:
        records = last_records
    report = sweep_report(spec, runs_dir)
    if seconds is not None:
        report["wall_seconds"] = round(seconds, 1)
    if fmt == "json":
        _print_json(report)
    elif fmt == "markdown":
        sys.stdout.write(render.sweep_markdown(report))
    elif fmt == "csv":
        sys.stdout.write(render.sweep_csv(report))
    else:
        out = render.stdout()
        out.print(render.sweep_table(report, out))
        if seconds is not None:
            out.print(render.Text(f"wall time {seconds:.1f} s"))
    bad = [r for r in records if r["status"] != "finished"]
    if bad:
        fail(f"{len(bad)} of {len(records)} trials did not finish ({', '.join(sorted({r['status'] for r in bad}))}); "
             f"the others are in {runs_dir}/{spec.name}/", 1)


def main() -> None:
    app()
