"""A sweep spec (YAML): which models, seeds, and grid or random search of recipe keys; loaded,
bounded and validated into the list of trials before anything runs (see mnistkit/sweeps/sweep.py)."""

from __future__ import annotations

import itertools
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mnistkit.errors import MnistkitError, SweepError, UsageError
from mnistkit.recipe import REPLACED, Augment, DataOptions, Recipe
from mnistkit.files.safeio import load_yaml_bounded

MAX_SPEC_BYTES = 1 << 16
MAX_TRIALS = 1000
MAX_NAME_BYTES = 100
_SPEC_KEYS = {"name", "model", "models", "seeds", "grid", "random", "recipe", "data", "experiments"}
_AUGMENT_KEYS = {f"augment.{f}" for f in Augment.__dataclass_fields__}
_RECIPE_KEYS = ({f for f in Recipe.__dataclass_fields__} - {"seed", "augment"}) | _AUGMENT_KEYS
MODEL_ARGS = "model_args."   # grid: {model_args.width: [8, 12]} varies the model's own arguments


def _varies(key: Any) -> bool:
    return key in _RECIPE_KEYS or (isinstance(key, str) and key.startswith(MODEL_ARGS)
                                   and key[len(MODEL_ARGS):].isidentifier())


def trial_recipe(exp: Any, model: Any, fixed: dict[str, Any], overrides: dict[str, Any], seed: int) -> Recipe:
    """The iteration's recipe, then the spec's fixed keys, then the trial's varied ones;
    ``augment.KEY`` (or a fixed ``augment:`` mapping) changes one field of the augmentation."""
    from mnistkit.experiments import resolve_recipe

    values = {k: v for k, v in {**fixed, **overrides}.items() if not k.startswith(MODEL_ARGS) and v is not None}
    augment = values.pop("augment", None) or {}
    if not isinstance(augment, dict):
        raise UsageError(f"augment must be a mapping of augment keys to values, not {augment!r}", key="augment")
    augment = {**augment, **{k.split(".", 1)[1]: values.pop(k) for k in list(values) if k.startswith("augment.")}}
    data = resolve_recipe(model, exp).to_dict()
    data.update(values, seed=seed)
    data["augment"] = {**data["augment"], **augment}
    # the recipe's own validation, types included (dataclasses.replace checked ranges only: epochs 1.5,
    # batch_size true and lr abc passed here and failed as trials); one line naming the key
    try:
        return Recipe.from_dict(data, where="recipe")
    except UsageError as exc:
        named = exc.key and exc.detail and not exc.detail.startswith("unknown key")
        raise UsageError(f"{exc.key} {exc.detail}" if named else str(exc), key=exc.key, detail=exc.detail) from None


@dataclass(frozen=True)
class Trial:
    model: str
    seed: int
    overrides: tuple[tuple[str, Any], ...]  # the varied recipe keys (and model_args.KEY), sorted
    source: Any = None                      # modelref.ModelSource, with the trial's model_args

    @property
    def config(self) -> str:
        """The configuration this trial is one seed of (model and varied values)."""
        return " ".join([self.model] + [f"{k}={_text(v)}" for k, v in self.overrides])

    @property
    def name(self) -> str:
        """The run folder's name: deterministic, so that --resume finds it, and as exact as the
        values (a float's shortest round-trip form: 0.1 and 0.1000001 are two folders)."""
        parts = [self.model] + [f"{k.removeprefix(MODEL_ARGS)}{_text(v)}" for k, v in self.overrides]
        return "-".join(parts + [f"seed{self.seed}"]).replace("/", "_").replace(" ", "_")


def _text(value: Any) -> str:
    """0.8's spelling (``:g``: 0.0 -> 0, 5e-04 -> 0.0005) where it is exact, so that older sweeps
    resume into their folders; the shortest exact form where ``:g`` would round."""
    if isinstance(value, float):
        return f"{value:g}" if float(f"{value:g}") == value else repr(value)
    return str(value)


@dataclass(frozen=True)
class SweepSpec:
    path: Path
    name: str
    trials: tuple[Trial, ...]
    recipe: dict[str, Any]
    data: DataOptions
    experiments: str | None = None
    varied: tuple[str, ...] = ()
    recipes: dict[str, Recipe] = field(default_factory=dict)   # trial name -> the recipe it trains with


def _fail(path: Path, message: str) -> SweepError:
    return SweepError(f"{path}: {message}")


def load_spec(path: str | os.PathLike, settings: dict[str, Any] | None = None) -> SweepSpec:
    """Read and check a sweep spec, and expand its trials; every trial's recipe is built (and
    so validated) here, before anything runs. ``settings`` (recipe keys, ``augment.KEY``; as
    ``settings.parse_settings`` gives them) are fixed for every trial over the spec's ``recipe:``;
    a key the spec varies cannot be fixed."""
    from mnistkit.experiments import find_experiments
    from mnistkit.usermodels.modelref import build, resolve

    path = Path(path)
    data, _ = load_yaml_bounded(path, MAX_SPEC_BYTES, SweepError, "a sweep spec")
    if not isinstance(data, dict):
        raise _fail(path, "a sweep spec is a mapping (name, models, seeds, grid or random, recipe, data)")
    unknown = set(data) - _SPEC_KEYS
    if unknown:
        raise _fail(path, f"unknown key {sorted(unknown)[0]!r}; known keys: {', '.join(sorted(_SPEC_KEYS))}")
    name = data.get("name")
    if not isinstance(name, str) or not name or any(c in name for c in "/\\\0") or name in (".", ".."):
        raise _fail(path, "name must be a folder name, e.g. name: i3-lr")
    if len(name.encode("utf-8", "replace")) > MAX_NAME_BYTES:   # file systems allow 255 bytes a name
        raise _fail(path, f"name is {len(name.encode('utf-8', 'replace'))} bytes; a sweep's name is at most "
                          f"{MAX_NAME_BYTES} bytes (it names a folder)")
    models = data.get("models", [data["model"]] if "model" in data else None)
    if not isinstance(models, list) or not models or not all(isinstance(m, str) for m in models) or len(models) > 100:
        raise _fail(path, "models must be a list of models (names, FILE.py:Name or FILE.yaml), e.g. models: [I3]")
    experiments = data.get("experiments")
    if experiments is not None and not isinstance(experiments, str):
        raise _fail(path, "experiments must be the path of a change-log file")
    if experiments is not None and not os.path.isabs(experiments):
        experiments = str(path.parent / experiments)
    exp = find_experiments(experiments)
    try:   # a model file is taken from the spec's folder
        sources = [resolve(m, base=path.parent, experiments=exp) for m in models]
    except MnistkitError as exc:
        raise _fail(path, str(exc)) from None
    from mnistkit.training.plan import parse_seeds

    try:
        seeds = parse_seeds([] if isinstance(data.get("seeds"), str) else data.get("seeds", [42]))
    except UsageError:
        raise _fail(path, "seeds must be a count (1 to 100) or a list of distinct non-negative integers") from None
    fixed = data.get("recipe") or {}
    if not isinstance(fixed, dict):
        raise _fail(path, "recipe must be a mapping of recipe keys to values")
    for key in fixed:
        if key in REPLACED:
            raise _fail(path, f"recipe: {key} {REPLACED[key]}")
    settings = {k: v for k, v in (settings or {}).items() if v is not None}
    if settings:
        fixed = {**fixed, **settings}
    grid, search = data.get("grid"), data.get("random")
    if grid is not None and search is not None:
        raise _fail(path, "give grid or random, not both")
    configs = [()]
    varied: tuple[str, ...] = ()
    if isinstance(grid, dict) and all(isinstance(v, list) for v in grid.values()):
        count = len(models) * len(seeds) * math.prod(len(v) for v in grid.values())
        if count > MAX_TRIALS:   # counted before anything is built: a 4 KB spec can ask for 10**100
            raise _fail(path, f"{count:,} trials; a sweep runs at most {MAX_TRIALS:,}")
    if grid is not None:
        if not isinstance(grid, dict) or not grid:
            raise _fail(path, "grid must map recipe keys to lists of values, e.g. grid: {lr: [0.1, 0.2]}")
        for key, values in grid.items():
            if key in REPLACED:
                raise _fail(path, f"grid: {key} {REPLACED[key]}")
            if not _varies(key):
                raise _fail(path, f"grid: {key!r} is not a recipe key that can vary (or model_args.NAME); known: "
                                  f"{', '.join(sorted(_RECIPE_KEYS))}")
            if not isinstance(values, list) or not values:
                raise _fail(path, f"grid: {key} must be a non-empty list")
        varied = tuple(sorted(grid))
        configs = [tuple(zip(varied, combo)) for combo in itertools.product(*(grid[k] for k in varied))]
    elif search is not None:
        configs, varied = _random_configs(path, search)
    varies = set(varied) & set(settings) | ({"seed"} & set(settings))
    if varies:
        key = sorted(varies)[0]
        what = "seeds" if key == "seed" else "grid" if grid is not None else "random search"
        raise _fail(path, f"{key} is varied by the spec's {what}; a setting cannot fix it (drop it, or edit the spec)")
    if len(sources) * len(configs) * len(seeds) > MAX_TRIALS:
        raise _fail(path, f"{len(sources) * len(configs) * len(seeds):,} trials; a sweep runs at most {MAX_TRIALS:,}")
    trials = tuple(Trial(src.name, s, c, _with_args(src, c, path)) for src in sources for c in configs for s in seeds)
    try:
        options = DataOptions.from_dict(data.get("data") or {}, where="data")
    except (UsageError, TypeError) as exc:
        raise _fail(path, str(exc) if str(exc).startswith("data:") else f"data: {exc}") from None
    seen: dict[Any, Trial] = {}
    recipes: dict[str, Recipe] = {}
    built: set[Any] = set()
    names: dict[str, Trial] = {}
    for t in trials:  # every recipe is built now: a bad value is one line before anything runs
        try:
            recipe = trial_recipe(exp, t.source, fixed, dict(t.overrides), t.seed)
            if (t.source, recipe.dropout, recipe.dropout_at) not in built:   # its model builds, with its arguments
                build(t.source, recipe.model_kwargs())
                built.add((t.source, recipe.dropout, recipe.dropout_at))
        except (MnistkitError, TypeError) as exc:
            raise _fail(path, f"trial {t.name}: {exc}") from None
        key = (t.source, recipe)   # the settings the trial trains with, whatever their spelling (1 == 1.0)
        if key in seen:
            raise _fail(path, f"trials {seen[key].config} and {t.config} (seed {t.seed}) train the same recipe; "
                              "give each value once")
        if t.name in names:
            raise _fail(path, f"trials {names[t.name].config} and {t.config} would share the run folder {t.name}; "
                              "make their values differ in what they print")
        seen[key], names[t.name], recipes[t.name] = t, t, recipe
    return SweepSpec(path, name, trials, dict(fixed), options, experiments, varied, recipes)


def _with_args(source: Any, config: tuple, path: Path) -> Any:
    """The trial's model: the spec's, with the config's model_args.KEY values over its own."""
    from mnistkit.usermodels.modelref import resolve

    args = {k[len(MODEL_ARGS):]: v for k, v in config if k.startswith(MODEL_ARGS)}
    if not args:
        return source
    if source.kind == "yaml":
        raise _fail(path, f"{source.reference} is a YAML architecture, which takes no model_args "
                          f"({', '.join(args)}): list one YAML file per variant under models: instead")
    try:
        return resolve(source, args={**source.kwargs, **args})
    except MnistkitError as exc:
        raise _fail(path, str(exc)) from None


def _random_configs(path: Path, search: Any) -> tuple[list[tuple], tuple[str, ...]]:
    if not isinstance(search, dict) or not isinstance(search.get("n"), int) or not 1 <= search["n"] <= MAX_TRIALS:
        raise _fail(path, "random needs n (1 to 1000) and ranges, e.g. random: {n: 4, lr: {min: 0.05, max: 0.4}}")
    seed = search.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise _fail(path, f"random: seed must be a whole number, not {seed!r}")
    rng = random.Random(seed)
    ranges = {k: v for k, v in search.items() if k not in ("n", "seed")}
    if not ranges:
        raise _fail(path, "random: give at least one range, e.g. lr: {min: 0.05, max: 0.4, log: true}")
    for key, r in ranges.items():
        ok = (_varies(key) and isinstance(r, dict)
              and all(isinstance(r.get(b), (int, float)) and not isinstance(r.get(b), bool)
                      and math.isfinite(r[b]) for b in ("min", "max"))
              and r["min"] <= r["max"] and (not r.get("log") or r["min"] > 0))
        if not ok:
            raise _fail(path, f"random: {key} must be a recipe key with a range {{min: A, max: B}} of finite "
                                  "numbers (log: true needs A > 0)")
    varied = tuple(sorted(ranges))
    configs = []
    for _ in range(search["n"]):
        values = []
        for key in varied:
            r = ranges[key]
            if r.get("log"):
                v = math.exp(rng.uniform(math.log(r["min"]), math.log(r["max"])))
            else:
                v = rng.uniform(r["min"], r["max"])
            whole = all(isinstance(r[b], int) for b in ("min", "max")) if key.startswith(MODEL_ARGS) else \
                key in Recipe.__dataclass_fields__ and isinstance(Recipe.__dataclass_fields__[key].default, int)
            if whole:
                v = int(round(v))
            else:
                v = float(f"{v:.4g}")
            values.append((key, v))
        configs.append(tuple(values))
    return configs, varied
