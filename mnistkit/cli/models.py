"""`summary`, `models`, `recipe`, `augment`: what a model is and how it trains."""

from __future__ import annotations

import sys
from typing import Optional

import typer

from mnistkit.cli.app import (app, handles_errors, examples, nonempty_path, print_json, note, recipe_settings, say,
                              BUDGET, JSON, EXPERIMENTS, MODEL_ARG, MODEL_HELP, SET)


def _models_overview(as_json: bool, budget: int) -> None:
    from mnistkit import render
    from mnistkit.introspect.summary import summarize
    from mnistkit.models import get_model, list_models, model_info

    rows = [(summarize(get_model(name), name=name, budget=budget), model_info(name).description)
            for name in list_models()]
    if as_json:
        print_json(render.models_json(rows, budget))
    else:
        out = render.stdout()
        out.print(render.models_table(rows, out))


@app.command(epilog=examples("mnistkit summary I3", "mnistkit summary I3 --rf --format markdown",
                             "mnistkit summary I2 --budget 15000 --json",
                             "mnistkit summary models.py:Net --model-arg width=12", "mnistkit summary s1.yaml",
                             "mnistkit summary"))
@handles_errors
def summary(
    model: Optional[str] = typer.Argument(None, help=MODEL_HELP + " Omit to list the registered models."),
    budget: Optional[int] = typer.Option(None, "--budget", min=1, help="Parameter budget for the check (strictly "
                                         "fewer; default: the change-log's max_params, else 20,000)."),
    model_arg: Optional[list[str]] = MODEL_ARG,
    experiments: Optional[str] = EXPERIMENTS,
    rf: bool = typer.Option(False, "--rf", help="Print the course's receptive-field table instead: layer, n_in, "
                            "n_out, k, p, s, r_in, r_out, j_in, j_out, one row per convolution or pooling."),
    fmt: Optional[str] = typer.Option(None, "--format", "-f", help="table (default), markdown (to paste into a "
                                      "README) or json."),
    as_json: bool = typer.Option(False, "--json", help="The same as --format json: the whole summary, the "
                                 "receptive-field table included."),
) -> None:
    """Layer-by-layer table of a model: shapes, parameters, mult-adds, receptive field, budget check."""
    from mnistkit.cli.results import choose_format
    from mnistkit.errors import UsageError
    from mnistkit.experiments import find_experiments
    from mnistkit.recipe import DEFAULT_BUDGET

    fmt = choose_format(fmt, as_json, ("table", "markdown", "json"))
    if model is None:
        if rf or fmt == "markdown":
            raise UsageError("--rf and --format markdown describe one model: name it (e.g. mnistkit summary I3 --rf)")
        _models_overview(fmt == "json", budget or DEFAULT_BUDGET)
        return
    from mnistkit import render
    from mnistkit.usermodels.modelref import build, parse_model_args, resolve
    from mnistkit.introspect.summary import summarize

    exp = find_experiments(experiments)
    source = resolve(model, args=parse_model_args(model_arg or []) or None, experiments=exp)
    it = exp.iteration_of(source)
    built, _ = build(source, _recipe_kwargs(exp, it))
    s = summarize(built, name=source.name, budget=budget or exp.constraints.get("max_params", DEFAULT_BUDGET))
    description = source.description or (it.changes if it else "")
    if fmt == "json":
        print_json({**render.summary_json(s, description), "source": source.to_record()})
    elif fmt == "markdown":
        sys.stdout.write(render.clean(s.rf_markdown() if rf else s.to_markdown(), lines=True))
    else:
        from rich.text import Text

        from mnistkit.render.models import rf_table

        out = render.stdout()
        shown = source.name if source.reference == source.name else f"{source.name} ({source.reference})"
        out.print(Text.assemble((shown, "bold"), f": {description}" if description else ""))
        out.print(rf_table(s) if rf else render.summary_table(s, out))


def _recipe_kwargs(exp: object, it: object) -> dict:
    """What the model's builder takes from its iteration's recipe (dropout)."""
    from mnistkit.recipe import Recipe

    return Recipe.from_dict(exp.recipe_for(it), where=str(exp.path)).model_kwargs()  # type: ignore[attr-defined]


@app.command("models", epilog=examples("mnistkit models", "mnistkit models --json"))
@handles_errors
def models_cmd(budget: int = BUDGET, as_json: bool = JSON) -> None:
    """List the registered models: params, mult-adds, head, receptive field, description."""
    _models_overview(as_json, budget)


@app.command("recipe", epilog=examples("mnistkit recipe I3", "mnistkit recipe S1", "mnistkit recipe I0 --experiments my.yaml"))
@handles_errors
def recipe_cmd(
    model: str = typer.Argument(..., help=MODEL_HELP),
    experiments: Optional[str] = EXPERIMENTS,
) -> None:
    """Print the resolved training recipe of a model (its change-log entry over the defaults) as YAML."""
    from mnistkit import render
    from mnistkit.experiments import find_experiments, resolve_recipe
    from mnistkit.usermodels.modelref import resolve

    exp = find_experiments(experiments)
    source = resolve(model, experiments=exp)
    recipe = resolve_recipe(source, exp)
    # stdout's first line names the change-log (a YAML comment), so it is not said again on stderr
    if exp.iteration_of(source) is None:
        note(f"{source.shown} is not in {exp.path}; it trains with the default recipe")
    sys.stdout.write(render.recipe_text(source.name, recipe.to_dict(), exp.described))


@app.command("augment", epilog=examples("mnistkit augment I3", "mnistkit augment I4 --seed 1 -n 16 -o i4-aug.png",
                                       "mnistkit augment I3 --set augment.degrees=20 --set augment.interpolation=bilinear",
                                       "mnistkit augment S1 --json"))
@handles_errors
def augment_cmd(
    model: Optional[str] = typer.Argument(None, help=MODEL_HELP + " Default: the change-log's final iteration."),
    seed: Optional[int] = typer.Option(None, "--seed", min=0, help="The seed whose first batch is shown (default: "
                                                                   "the recipe's)."),
    count: int = typer.Option(32, "--count", "-n", min=1, max=256, help="How many digits of the batch to show."),
    dataset: str = typer.Option("mnist", "--dataset", help="mnist, or synthetic (made locally, no download)."),
    data_dir: Optional[str] = typer.Option(None, "--data-dir", help="Folder with the MNIST IDX files "
                                           "(default: $MNISTKIT_DATA, else ~/.cache/mnistkit; downloaded if absent)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="As train's --limit: the first N training images."),
    val: int = typer.Option(0, "--val", min=0, help="As train's --val: N training images held out."),
    device: str = typer.Option("auto", "--device", help="Where the batch is drawn, as train would (a GPU's random "
                                                        "numbers differ from the CPU's): auto, cpu, cuda or mps."),
    experiments: Optional[str] = EXPERIMENTS,
    output: Optional[str] = typer.Option(None, "--output", "-o", metavar="PNG",
                                         help="The picture to write (default: augment.png; with --json, only when given)."),
    as_json: bool = typer.Option(False, "--json", help="Print the parameters drawn for each digit as JSON on stdout."),
    settings: Optional[list[str]] = SET,
) -> None:
    """Draw training digits as the recipe's augmentation transforms them: the trainer's own first batch for that seed."""
    from mnistkit.training.augpreview import augment_preview
    from mnistkit.experiments import find_experiments, resolve_recipe
    from mnistkit.usermodels.modelref import resolve
    from mnistkit.files.outputs import check_outputs, write_output
    from mnistkit.recipe import DataOptions, check_choice, Dataset
    from mnistkit.render.augment import augment_png

    output = output or (None if as_json else "augment.png")
    exp = find_experiments(experiments)
    check_outputs([output], inputs=(exp.path,))
    data = DataOptions(check_choice(dataset, Dataset, "dataset"), data_dir, limit, val)
    source = exp.model_source(exp.final) if model is None and exp.iterations else resolve(model or "I3", experiments=exp)
    if exp.iteration_of(source) is None:
        note(f"{source.shown} is not in {exp.path}; it trains with the default recipe")
    recipe = resolve_recipe(source, exp).with_settings(recipe_settings(settings, {"seed": ("--seed", seed)}))
    preview = augment_preview(source.name, recipe, data, device=device, count=count)
    png = augment_png(preview) if output else None
    if as_json:
        print_json({**preview.to_dict(), "experiments": str(exp.path)})
    say(exp.described)
    if output:
        write_output(output, png)
        say(f"wrote {output}: {preview.model}, {preview.provenance}")


@app.command("init", epilog=examples("mnistkit init demo && cd demo && mnistkit summary S1"))
@handles_errors
def init_cmd(
    folder: str = typer.Argument(".", help="The project's folder (made when missing; must not hold these files yet).",
                                 callback=nonempty_path),
) -> None:
    """Start a project of your own: a change-log with the assignment's constraints, S1 in models.py,
    S2 as a YAML architecture, and a .gitignore for runs/."""
    import shlex

    from mnistkit import render
    from mnistkit.project import init_project
    from rich.text import Text

    written = init_project(folder)
    out = render.stdout()
    out.print(Text(f"wrote {', '.join(str(p) for p in written)}"), highlight=False, soft_wrap=True)
    go = f"cd {shlex.quote(folder)} && " if folder != "." else ""
    out.print(Text("next: " + go + "mnistkit summary S1, then mnistkit train S1 and mnistkit compare"),
              highlight=False, soft_wrap=True)
