"""`summary`, `models`, `recipe`: what a model is and how it trains."""

from __future__ import annotations

import sys
from typing import Optional

import typer

from mnistkit.cli.app import app, handles_errors, examples, print_json, note, BUDGET, JSON, EXPERIMENTS


def _models_overview(as_json: bool, budget: int) -> None:
    from mnistkit import render
    from mnistkit.summary import summarize
    from mnistkit.models import get_model, list_models, model_info

    rows = [(summarize(get_model(name), name=name, budget=budget), model_info(name).description)
            for name in list_models()]
    if as_json:
        print_json(render.models_json(rows, budget))
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
        print_json(render.summary_json(s, entry.description))
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
        note(f"{name} is not in {exp.path}; it trains with the default recipe")
    sys.stdout.write(render.recipe_text(name, recipe.to_dict(), exp.described))
