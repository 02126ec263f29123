"""`evaluate`, `predict`, `explain`, `export`, `runs`, `compare`: what the runs measured."""

from __future__ import annotations

import io
import sys
from typing import List, Optional

import typer

from mnistkit.cli.app import (app, handles_errors, examples, nonempty_path, note, print_json, say, JSON,
                              EXPERIMENTS, MODEL_CODE)
from mnistkit.recipe import DEFAULT_RUNS_DIR, Dataset


@app.command("evaluate", epilog=examples("mnistkit evaluate runs/I3-20261125-101500",
                                         "mnistkit evaluate runs/I3-20261125-101500/last.pt --json",
                                         "mnistkit evaluate runs/I3-20261125-101500 --errors errors.png "
                                         "--confusion confusion.png"))
@handles_errors
def evaluate_cmd(
    target: str = typer.Argument(..., help="A run folder (uses its best.pt) or a checkpoint file.",
                                 callback=nonempty_path),
    dataset: Optional[Dataset] = typer.Option(None, "--dataset", case_sensitive=False,
                                              help="mnist or synthetic (default: the run's)."),
    data_dir: Optional[str] = typer.Option(None, "--data-dir", help="Folder with the MNIST IDX files (default: the run's)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    errors: Optional[str] = typer.Option(None, "--errors", metavar="PNG",
                                         help="Draw the misclassified test digits, most confident first."),
    confusion: Optional[str] = typer.Option(None, "--confusion", metavar="PNG",
                                            help="Draw the confusion matrix as a heat map with counts."),
    model_code: Optional[str] = MODEL_CODE,
    as_json: bool = JSON,
) -> None:
    """Test loss and accuracy, per-class figures and the confusion matrix of a checkpoint."""
    from mnistkit import render
    from mnistkit.training.evaluation import evaluate_checkpoint
    from mnistkit.runs.checkpoint import resolve_checkpoint
    from mnistkit.files.outputs import check_outputs, write_output

    check_outputs([errors, confusion], inputs=(resolve_checkpoint(target),))
    report = evaluate_checkpoint(target, dataset=dataset.value if dataset else None, data_dir=data_dir, device=device,
                                 model_code=model_code)
    from mnistkit.runs import sigint_deferred

    with sigint_deferred():   # Ctrl-C inside matplotlib could leave it half-drawn (a ValueError later): after
        pictures = [(path, draw(report)) for path, draw in ((errors, render.errors_png),
                                                            (confusion, render.confusion_png))
                    if path]  # drawn before any is written: all or nothing
    if as_json:
        print_json(report.to_dict())
    else:
        render.stdout().print(render.evaluation(report))
    for path, png in pictures:
        write_output(path, png)
        say(f"wrote {path}")


@app.command("predict", epilog=examples("mnistkit predict runs/I3-20261125-101500 examples/three.png",
                                        "mnistkit predict runs/I3-20261125-101500 my-digits/ --show",
                                        "mnistkit predict runs/I3-20261125-101500/best.pt photo.jpg --json"))
@handles_errors
def predict_cmd(
    target: str = typer.Argument(..., help="A run folder (uses its best.pt) or a checkpoint file.",
                                 callback=nonempty_path),
    images: List[str] = typer.Argument(..., help="Image files (PNG, JPEG, ...) or folders of them.",
                                       callback=nonempty_path),
    show: bool = typer.Option(False, "--show", help="Also draw each 28x28 input as the model saw it."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    model_code: Optional[str] = MODEL_CODE,
    as_json: bool = JSON,
) -> None:
    """Predict your own digit images: prepared as MNIST was (inverted, cropped, 20 px, centred by mass)."""
    from mnistkit import render
    from mnistkit.inference.predict import predict

    result = predict(target, images, device=device, model_code=model_code)
    if as_json:
        print_json(result.to_dict())
    else:
        render.stdout().print(render.predictions(result, show))
    failed = [r for r in result.predictions if r.error]
    for r in failed:
        render.stderr().print(render.error_line(r.error), highlight=False, soft_wrap=True)
    if failed:
        raise typer.Exit(1)


@app.command("explain", epilog=examples("mnistkit explain runs/I3-20261125-101500 examples/three.png",
                                        "mnistkit explain runs/I3-20261125-101500 a.png b.png -o seen.png",
                                        "mnistkit explain runs/I3-20261125-101500 my-digits/ --channels 4 --json"))
@handles_errors
def explain_cmd(
    target: str = typer.Argument(..., help="A run folder (uses its best.pt) or a checkpoint file.",
                                 callback=nonempty_path),
    images: List[str] = typer.Argument(..., help="Image files (PNG, JPEG, ...) or folders of them, read as "
                                       "predict reads them.", callback=nonempty_path),
    channels: int = typer.Option(8, "--channels", min=1, max=1024,
                                 help="How many channels of each convolution's output to draw (the first N)."),
    output: str = typer.Option("explain.png", "--output", "-o", help="The PNG to write (several images: "
                               "STEM-N-IMAGE.png beside it, one per image; needs mnistkit[plot])."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    model_code: Optional[str] = MODEL_CODE,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout: each image's prediction, "
                                                       "the convolutions and their shapes (no pixels)."),
) -> None:
    """What the model sees: each digit, its prediction, every convolution's feature maps and a Grad-CAM map."""
    from mnistkit import render
    from mnistkit.runs.checkpoint import resolve_checkpoint
    from mnistkit.inference.explain import explain
    from mnistkit.files.outputs import check_outputs, write_output
    from mnistkit.inference.predict import image_files
    from mnistkit.render.explain import explain_paths, explain_png, explain_text

    files = image_files(images)
    paths = explain_paths(output, len(files), [str(f) for f in files])
    check_outputs(paths, inputs=(resolve_checkpoint(target), *files))
    render.pyplot()   # matplotlib missing is one line before the model runs
    result = explain(target, images, channels=channels, device=device, model_code=model_code)
    pictures = {e.path: (path, explain_png(result, e)) for e, path in zip(result.explanations, paths) if not e.error}
    for path, png in pictures.values():
        write_output(path, png)
    written = {k: v[0] for k, v in pictures.items()}
    if as_json:
        data = result.to_dict()
        for item in data["images"]:
            item["picture"] = written.get(item["path"])
        print_json(data)
    elif written:   # no image readable: the error lines say it all
        render.stdout().print(explain_text(result, written))
    failed = [e for e in result.explanations if e.error]
    for e in failed:
        render.stderr().print(render.error_line(e.error), highlight=False, soft_wrap=True)
    if written:
        say(f"wrote {', '.join(written.values())}")
    if failed:
        raise typer.Exit(1)


@app.command("export", epilog=examples("mnistkit export runs/I3-20261125-101500 --format onnx",
                                       "mnistkit export runs/I3-20261125-101500 --format safetensors -o i3.safetensors"))
@handles_errors
def export_cmd(
    target: str = typer.Argument(..., help="A run folder (uses its best.pt) or a checkpoint file.",
                                 callback=nonempty_path),
    fmt: str = typer.Option(..., "--format", "-f", help="onnx or safetensors."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="The file to write (default: beside the checkpoint)."),
    check: bool = typer.Option(True, "--check/--no-check", help="ONNX: compare with PyTorch on the whole test set."),
    data_dir: Optional[str] = typer.Option(None, "--data-dir", help="Test data for the check (default: the run's)."),
    model_code: Optional[str] = MODEL_CODE,
    as_json: bool = JSON,
) -> None:
    """Export a trained model to ONNX (checked with ONNX Runtime) or safetensors (no pickle)."""
    from mnistkit import render
    from mnistkit.inference.export import export

    result = export(target, fmt.lower(), output, check=check, data_dir=data_dir, model_code=model_code)
    if as_json:
        print_json(result.to_dict())
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
        print_json({"runs_dir": runs_dir, "runs": [r.to_dict() for r in runs]})
        return
    if not runs:
        say(f"no run folders in {runs_dir}; make one with: mnistkit train")
        return
    out = render.stdout()
    out.print(render.runs_table(runs, runs_dir, time.time(), out))


def choose_format(fmt: str | None, as_json: bool, formats: tuple[str, ...]) -> str:
    """--format (the first of ``formats`` by default) and --json, which is --format json."""
    from mnistkit.errors import UsageError

    if as_json and fmt not in (None, "json"):
        raise UsageError(f"--json and --format {fmt} disagree; give one")
    fmt = "json" if as_json else (fmt or formats[0]).lower()
    if fmt not in formats:
        raise UsageError(f"unknown format {fmt!r}; choose one of: {', '.join(formats)}")
    return fmt


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
    from mnistkit import render
    from mnistkit.results import compare
    from mnistkit.experiments import find_experiments
    from mnistkit.files.outputs import check_outputs, write_output

    fmt = choose_format(fmt, as_json, ("table", "markdown", "json", "csv"))
    exp = find_experiments(experiments)
    check_outputs([output, plot], inputs=(exp.path,))   # never the change-log itself (./experiments.yaml may be a link)
    report = compare.build_report(exp, runs_dir)
    if fmt == "table":
        if output:
            console = render.SafeConsole(record=True, width=render.WIDTH_OFF_TTY, file=io.StringIO())
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
    say(exp.described)  # last, so that an error before it stays one line
    for path in (output, plot):
        if path:
            say(f"wrote {path}")


@app.command("check", epilog=examples("mnistkit check --static", "mnistkit check --iteration S3",
                                      "mnistkit check --format junit -o check.xml"))
@handles_errors
def check_cmd(
    runs_dir: str = typer.Option(DEFAULT_RUNS_DIR, "--runs-dir", help="Where run folders are."),
    experiments: Optional[str] = EXPERIMENTS,
    iteration: Optional[str] = typer.Option(None, "--iteration", "-i", help="Check this iteration only (its id), "
                                                                            "gated whether final or not."),
    all_iterations: bool = typer.Option(False, "--all-iterations", help="Gate every iteration, exploratory ones "
                                                                         "too (by default only the final one gates)."),
    static: bool = typer.Option(False, "--static", help="Only what needs no training: parameters, BatchNorm, "
                                                        "Dropout, GAP head, the recipe's epochs (no runs read)."),
    fmt: Optional[str] = typer.Option(None, "--format", "-f", help="text (default), junit or json."),
    as_json: bool = typer.Option(False, "--json", help="The same as --format json."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Write to this file instead of stdout."),
) -> None:
    """The change-log's constraints as a gate on the final iteration: exit 0 when its checks pass, 1 when one fails, 2 when they cannot be checked."""
    from mnistkit import render
    from mnistkit.results.check import run_checks
    from mnistkit.errors import MnistkitError, UsageError
    from mnistkit.experiments import find_experiments
    from mnistkit.files.outputs import check_outputs, write_output

    try:   # 1 means a check failed: anything else that goes wrong, before or after the checks, is 2
        fmt = choose_format(fmt, as_json, ("text", "junit", "json"))
        exp = find_experiments(experiments)
        check_outputs([output], inputs=(exp.path,))
        report = run_checks(exp, runs_dir, iteration=iteration, static=static, every=all_iterations)
        text = {"text": render.check_text, "junit": render.check_junit, "json": render.json_text}[fmt](
            report.to_dict() if fmt == "json" else report)
        if output:
            write_output(output, text)
        else:
            try:
                sys.stdout.write(text)
                sys.stdout.flush()
            except OSError as exc:
                raise UsageError(f"cannot write to standard output: {exc.strerror or exc}") from None
    except MnistkitError as exc:
        exc.exit_code = 2
        raise
    for why in report.damaged:
        note(f"skipped a damaged run folder: {why}")
    if output or fmt != "text":  # the failing checks reach the log whatever the format
        for case in report.failed:
            render.stderr().print(render.check_line(case), highlight=False, soft_wrap=True, markup=False)
    say(render.check_verdict(report))
    if output:
        say(f"wrote {output}")
    if not report.passed:
        raise typer.Exit(1)


@app.command("plot", epilog=examples("mnistkit plot runs/I3-20261125-101500 runs/I4-20261125-113000",
                                     "mnistkit plot runs/ -o all-runs.png", "mnistkit plot runs/sweep-lr"))
@handles_errors
def plot_cmd(
    runs: List[str] = typer.Argument(..., help="Run folders, or folders of runs (every run in them).",
                                     callback=nonempty_path),
    output: str = typer.Option("curves.png", "--output", "-o", help="The PNG to write."),
) -> None:
    """Draw accuracy and loss (train, test, validation on shared axes), the step losses and the LR of any runs, overlaid and labelled by what differs."""
    from mnistkit import render
    from mnistkit.results.curves import run_curves, shared_facts
    from mnistkit.files.outputs import check_outputs, write_output

    curves = run_curves(runs)
    check_outputs([output], inputs=tuple(c.run for c in curves))
    png = render.curves_png(curves, title=f"Training curves of {len(curves)} run{'s' * (len(curves) != 1)} "
                                          "(test: each run's own test set)", shared=shared_facts(curves))
    write_output(output, png)
    say(f"wrote {output}: {len(curves)} run{'s' * (len(curves) != 1)}")


@app.command("report", epilog=examples("mnistkit report", "mnistkit report -o write-up/ --runs-dir runs",
                                       "mnistkit report --format html -o report.html"))
@handles_errors
def report_cmd(
    runs_dir: str = typer.Option(DEFAULT_RUNS_DIR, "--runs-dir", help="Where run folders are."),
    experiments: Optional[str] = EXPERIMENTS,
    fmt: str = typer.Option("markdown", "--format", "-f", help="markdown (a folder: README.md and its PNGs) or html "
                                                               "(one self-contained file)."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="The folder (markdown; default: report) or "
                                                                      "file (html; default: report.html) to write."),
    device: str = typer.Option("auto", "--device", help="Where the best run is evaluated: auto, cpu, cuda, mps."),
) -> None:
    """The assignment's write-up from the change-log and the runs: per iteration Target / Result / Analysis, layers, architecture, curves, mistakes, checklist."""
    from mnistkit import render
    from mnistkit.errors import UsageError
    from mnistkit.experiments import find_experiments
    from mnistkit.files.outputs import check_folder, check_outputs, write_folder, write_output
    from mnistkit.render.report import blocks, report_html, report_markdown
    from mnistkit.results.report import build_write_up

    fmt = fmt.lower()
    if fmt not in ("markdown", "html"):
        raise UsageError(f"unknown format {fmt!r}; choose markdown or html")
    output = output or ("report" if fmt == "markdown" else "report.html")
    exp = find_experiments(experiments)
    if fmt == "html":
        check_outputs([output], inputs=(exp.path,))
    else:
        check_folder(output, inputs=(exp.path, runs_dir))   # before the minutes of work, not after
    write_up = build_write_up(exp, runs_dir, device=device)
    bs = blocks(write_up)   # every picture drawn before anything is written
    if fmt == "html":
        write_output(output, report_html(bs))
    else:
        text, files = report_markdown(bs)
        write_folder(output, {"README.md": text, **files}, inputs=(exp.path, runs_dir))
    say(exp.described)
    for note_text in write_up.notes:
        render.stderr().print(render.note_line(note_text), highlight=False, soft_wrap=True)
    say(f"wrote {output}" + ("/README.md" if fmt == "markdown" else "")
        + f" ({len(write_up.iterations)} iteration{'s' * (len(write_up.iterations) != 1)}, "
          f"{sum(1 for p in write_up.iterations if p.row['measured'])} "
          "with comparable runs)")
