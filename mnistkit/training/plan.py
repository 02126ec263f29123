"""Several trainings in one call, as ``mnistkit train --seeds`` and ``--all`` do them: every seed
of a list, for one model or for every iteration of the change-log, each with its iteration's
recipe. The CLI renders; Python users call ``train_plan`` directly."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from mnistkit.errors import UsageError
from mnistkit.recipe import DEFAULT_RUNS_DIR, DataOptions

__all__ = ["parse_seeds", "Plan", "make_plan", "train_plan"]


def parse_seeds(value: Any) -> list[int]:
    """The one seed parser: a count (``3`` or ``"3"``: seeds 1, 2, 3) or a list of distinct
    non-negative seeds (``"1,2,42"``, ``[1, 2, 42]``), as ``--seeds`` and a sweep spec give them."""
    if isinstance(value, str):
        try:
            value = [int(p) for p in value.split(",")]
        except ValueError:
            raise UsageError(f"seeds must be a count (3 means seeds 1, 2, 3) or a comma-separated list of seeds, "
                             f"not {value!r}") from None
        value = value[0] if len(value) == 1 else value
    if isinstance(value, int) and not isinstance(value, bool):
        if not 1 <= value <= 100:
            raise UsageError(f"a seed count must be 1 to 100, not {value}")
        return list(range(1, value + 1))
    if not isinstance(value, list) or not value or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                                           for v in value) or len(set(value)) != len(value):
        raise UsageError(f"seeds must be a count (1 to 100) or a list of distinct non-negative integers, not {value!r}")
    return value


@dataclass(frozen=True)
class Plan:
    """Which models train, with which seeds (``None``: the recipe's), from which change-log."""

    experiments: Any
    models: tuple[Any, ...]     # modelref.ModelSource
    seeds: tuple[int | None, ...]
    notes: tuple[str, ...]   # e.g. a model the change-log does not list (it trains with the default recipe)


def make_plan(experiments: Any, model: Any = None, all_iterations: bool = False,
              seeds: list[int | None] | None = None, model_args: dict[str, Any] | None = None) -> Plan:
    """``model`` (a reference, e.g. ``I3``, ``S1``, ``models.py:Net``; default: the change-log's
    final iteration), or every iteration of it."""
    from mnistkit.models import list_models
    from mnistkit.usermodels.modelref import resolve

    if all_iterations and model is not None:
        raise UsageError("all_iterations trains every iteration; give no model")
    exp = experiments
    if all_iterations:
        models = [exp.model_source(it, model_args) for it in exp.iterations]
    elif model is not None:
        models = [resolve(model, args=model_args, experiments=exp)]
    else:
        models = [exp.model_source(exp.final, model_args) if exp.iterations
                  else resolve(list_models()[-1], args=model_args)]
    def note(source: Any) -> str | None:
        it = exp.iteration_of(source)
        if it is None:
            return f"note: {source.shown} is not in {exp.path}; it trains with the default recipe"
        if it.id.lower() != source.name.lower():   # named by its file, not its id: say whose recipe it takes
            return f"note: {source.shown} is {it.id} in {exp.path}; it trains with {it.id}'s recipe"
        return None

    notes = tuple(n for n in map(note, models) if n)
    return Plan(exp, tuple(models), tuple(seeds or [None]), notes)


def train_plan(plan: Plan, data: DataOptions | None = None, overrides: dict[str, Any] | None = None,
               device: str = "auto", runs_dir: str | Path = DEFAULT_RUNS_DIR,
               run: Callable[..., Any] | None = None,
               on_group: Callable[[str, list[Any]], None] | None = None) -> list[Any]:
    """Train every model of ``plan`` once per seed, each with its iteration's recipe and
    ``overrides`` (recipe keys, ``augment.KEY`` for one augmentation field; ``None`` values
    ignored; applied by ``Recipe.with_settings``, so typed and checked as the change-log is).
    Every recipe is built, and so checked, before the first training. ``run(train, *args,
    **kwargs)`` makes each training (default: calls it; the CLI wraps a progress display around
    it); ``on_group(model, results)`` is told when a model's seeds are done. Returns every result."""
    from mnistkit.experiments import resolve_recipe
    from mnistkit.training.loop import train

    run = run or (lambda fn, *args, **kwargs: fn(*args, **kwargs))
    recipes = [[resolve_recipe(source, plan.experiments).with_settings(
                    {**(overrides or {}), **({"seed": seed} if seed is not None else {})}) for seed in plan.seeds]
               for source in plan.models]
    results: list[Any] = []
    for source, its_recipes in zip(plan.models, recipes):
        group = []
        for recipe in its_recipes:
            group.append(run(train, source, recipe, data or DataOptions(), device=device, runs_dir=runs_dir,
                             experiments=plan.experiments))
        if on_group:
            on_group(source.name, group)
        results += group
    return results
