"""experiments.yaml: the iteration change-log and each iteration's recipe, typed and validated.

Every error names the file, the key and, where YAML gives it, the line.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mnistkit.errors import ExperimentsError, UsageError
from mnistkit.recipe import Recipe
from mnistkit.safeio import load_yaml_bounded

DEFAULT_PATH = Path("experiments.yaml")  # looked for in the current folder
PACKAGED_PATH = Path(__file__).with_name("experiments.yaml")  # the change-log shipped with mnistkit
MAX_BYTES = 1 << 20  # a change-log is a few KiB; anything larger (or endless) is refused

# key -> accepted types; numbers may be written as int or float
_NUM = (int, float)
_TOP = {"version": (int,), "constraints": (dict,), "defaults": (dict,), "iterations": (list,)}
_ITERATION = {"id": (str,), "model": (str,), "changes": (str,), "reported": (dict,), "recipe": (dict,)}
_CONSTRAINTS = {"max_params": (int,), "batchnorm": (bool,), "dropout": (bool,), "gap_head": (bool,),
                "max_epochs": (int,), "min_test_acc": _NUM}
_REPORTED = {"params": (int,), "train_acc": _NUM, "test_acc": _NUM, "epochs": (int,), "lr_scheduler": (str,)}


@dataclass(frozen=True)
class Iteration:
    id: str
    model: str
    changes: str = ""
    reported: dict[str, Any] = field(default_factory=dict)
    recipe: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Experiments:
    path: Path
    constraints: dict[str, Any]
    defaults: dict[str, Any]
    iterations: tuple[Iteration, ...]
    source: str = "given"  # given (a path was named), current folder, or packaged

    @property
    def described(self) -> str:
        """One line for a user: which change-log a command is using, and why."""
        why = {"given": "as given", "current folder": "found in the current folder",
               "packaged": "the one shipped with mnistkit; no ./experiments.yaml here"}[self.source]
        return f"change-log: {self.path} ({why})"

    def iteration(self, ident: str) -> Iteration:
        for it in self.iterations:
            if it.id.lower() == ident.lower():
                return it
        raise ExperimentsError(f"{self.path}: no iteration {ident!r}; known iterations: "
                               f"{', '.join(it.id for it in self.iterations)}")

    def iteration_for_model(self, model: str) -> Iteration | None:
        for it in self.iterations:
            if it.model.lower() == model.lower() or it.id.lower() == model.lower():
                return it
        return None

    def recipe_dict(self, model: str) -> dict[str, Any]:
        """Shared defaults overridden by the iteration's own recipe (augment merged key by key)."""
        merged = dict(self.defaults)
        it = self.iteration_for_model(model)
        if it is not None:
            for key, value in it.recipe.items():
                if key == "augment" and isinstance(value, dict) and isinstance(merged.get("augment"), dict):
                    merged["augment"] = {**merged["augment"], **value}
                else:
                    merged[key] = value
        return merged


def _key_lines(root: Any) -> dict[tuple, int]:
    """Line number of every mapping key and sequence item, by its path from the root node."""
    lines: dict[tuple, int] = {}
    stack: list[tuple[tuple, Any]] = [((), root)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                lines[path + (str(k.value),)] = k.start_mark.line + 1
                stack.append((path + (str(k.value),), v))
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                lines[path + (i,)] = v.start_mark.line + 1
                stack.append((path + (i,), v))
    return lines


class _Checker:
    def __init__(self, path: Path, root: Any) -> None:
        self.path, self.lines = path, _key_lines(root)

    def fail(self, where: tuple, message: str) -> None:
        line = None
        for n in range(len(where), -1, -1):  # the nearest enclosing node YAML knows
            line = self.lines.get(where[:n])
            if line:
                break
        name = ".".join(str(p) if isinstance(p, str) else f"[{p}]" for p in where).replace(".[", "[")
        at = f", line {line}" if line else ""
        raise ExperimentsError(f"{self.path}{at}: {name + ': ' if name else ''}{message}")

    def mapping(self, where: tuple, value: Any, schema: dict[str, tuple], required: tuple = ()) -> dict:
        if not isinstance(value, dict):
            self.fail(where, f"must be a mapping, not {type(value).__name__}")
        for key, item in value.items():
            if key not in schema:
                self.fail(where + (str(key),), f"unknown key; known keys: {', '.join(sorted(schema))}")
            types = schema[key]
            if not isinstance(item, types) or (isinstance(item, bool) and bool not in types):
                want = " or ".join(t.__name__ for t in types)
                self.fail(where + (key,), f"must be {want}, not {type(item).__name__} ({item!r})")
        for key in required:
            if key not in value:
                self.fail(where, f"missing required key {key!r}")
        return value


def load_experiments(path: str | os.PathLike = DEFAULT_PATH) -> Experiments:
    from mnistkit.models import list_models, model_info

    path = Path(path)
    data, root = load_yaml_bounded(path, MAX_BYTES, ExperimentsError, "a change-log")
    check = _Checker(path, root)
    if data is None:
        check.fail((), "the file is empty; it needs 'defaults' and 'iterations'")
    check.mapping((), data, _TOP, required=("iterations",))
    constraints = check.mapping(("constraints",), data.get("constraints") or {}, _CONSTRAINTS)
    defaults = data.get("defaults") or {}

    def recipe_check(where: tuple, recipe: dict) -> None:
        try:
            Recipe.from_dict(recipe, where="recipe")
        except UsageError as exc:
            check.fail(where + tuple((exc.key or "").split(".")) if exc.key else where, exc.detail)

    recipe_check(("defaults",), defaults)
    iterations: list[Iteration] = []
    seen: set[str] = set()
    known_models = {m.lower() for m in list_models()}
    for n, raw in enumerate(data["iterations"]):
        where = ("iterations", n)
        check.mapping(where, raw, _ITERATION, required=("id",))
        it_id = raw["id"]
        if it_id.lower() in seen:
            check.fail(where + ("id",), f"iteration id {it_id!r} appears twice")
        seen.add(it_id.lower())
        model = raw.get("model", it_id)
        if model.lower() not in known_models:
            check.fail(where + ("model",), f"model {model!r} is not registered; known models: "
                                           f"{', '.join(list_models())}")
        reported = check.mapping(where + ("reported",), raw.get("reported") or {}, _REPORTED)
        recipe = raw.get("recipe") or {}
        it = Iteration(id=it_id, model=model_info(model).name, changes=raw.get("changes", ""),
                       reported=dict(reported), recipe=dict(recipe))
        merged = Experiments(path, constraints, defaults, (it,)).recipe_dict(it.model)
        recipe_check(where + ("recipe",), merged)
        iterations.append(it)
    return Experiments(path, dict(constraints), dict(defaults), tuple(iterations))


def find_experiments(path: str | os.PathLike | None = None) -> Experiments:
    """The change-log a command uses: ``path`` when given (it must exist), else
    ./experiments.yaml when present, else the one shipped with mnistkit. ``described`` says
    which."""
    if path is not None:
        exp, source = load_experiments(path), "given"
    elif DEFAULT_PATH.exists():
        exp, source = load_experiments(DEFAULT_PATH), "current folder"
    else:
        exp, source = load_experiments(PACKAGED_PATH), "packaged"
    return dataclasses.replace(exp, source=source)


def resolve_recipe(model: str, experiments: Experiments | str | os.PathLike | None = None,
                   **overrides: Any) -> Recipe:
    """The recipe for ``model``: its iteration in the change-log (``experiments``, loaded or a
    path, else found as ``find_experiments`` finds it) over the Recipe defaults, then
    ``overrides`` (None values are ignored)."""
    exp = experiments if isinstance(experiments, Experiments) else find_experiments(experiments)
    return Recipe.from_dict(exp.recipe_dict(model), where=f"{exp.path} ({model})").replace(**overrides)
