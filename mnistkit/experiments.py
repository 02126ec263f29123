"""experiments.yaml: the iteration change-log and each iteration's recipe, typed and validated.

Every error names the file, the key and, where YAML gives it, the line.
"""

from __future__ import annotations

import dataclasses
import re
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from mnistkit.errors import ExperimentsError, UsageError
from mnistkit.recipe import Recipe
from mnistkit.files.safeio import load_yaml_bounded, yaml_line

DEFAULT_PATH = Path("experiments.yaml")  # looked for in the current folder
PACKAGED_PATH = Path(__file__).with_name("experiments.yaml")  # the change-log shipped with mnistkit
MAX_BYTES = 1 << 20  # a change-log is a few KiB; anything larger (or endless) is refused

# key -> accepted types; numbers may be written as int or float
_NUM = (int, float)
_TOP = {"version": (int,), "constraints": (dict,), "defaults": (dict,), "iterations": (list,)}
_ITERATION = {"id": (str,), "model": (str,), "model_args": (dict,), "changes": (str,), "target": (str,),
              "analysis": (str,), "reported": (dict,), "recipe": (dict,), "final": (bool,)}
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
    model_args: dict[str, Any] = field(default_factory=dict)
    target: str = ""      # the user's own words (the exercise's Target / Analysis): shown, never written
    analysis: str = ""
    final: bool = False   # marked `final: true`: the iteration handed in, the one `check` gates


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

    @property
    def final(self) -> Iteration | None:
        """The iteration handed in: the one marked ``final: true``, else the last one listed.
        ``check`` gates it; every other iteration is exploratory (shown, never gated)."""
        marked = [it for it in self.iterations if it.final]
        return marked[0] if marked else (self.iterations[-1] if self.iterations else None)

    @property
    def final_marked(self) -> bool:
        """Whether the change-log names its final iteration (else the last one stands for it)."""
        return any(it.final for it in self.iterations)

    def iteration(self, ident: str) -> Iteration:
        for it in self.iterations:
            if it.id.lower() == ident.lower():
                return it
        raise ExperimentsError(f"{self.path}: no iteration {ident!r}; known iterations: "
                               f"{', '.join(it.id for it in self.iterations)}")

    def model_source(self, it: Iteration, args: dict[str, Any] | None = None) -> Any:
        """The model an iteration trains (a ``modelref.ModelSource`` named by the iteration's id):
        its reference taken from the change-log's folder, with its model_args (then ``args``)."""
        from mnistkit.usermodels.modelref import resolve

        return resolve(it.model, base=self.path.parent, args={**it.model_args, **(args or {})} or None,
                       name=it.id)

    def iteration_for_model(self, model: str) -> Iteration | None:
        """The iteration of that id, else the first whose model reference is spelt ``model``."""
        for it in self.iterations:
            if it.id.lower() == model.lower():
                return it
        for it in self.iterations:
            if it.model.lower() == model.lower():
                return it
        return None

    def iteration_of(self, source: Any) -> Iteration | None:
        """The iteration that trains ``source`` (a ``modelref.ModelSource``): the one it was
        resolved from, else one whose model is that registered name, or that file and name."""
        from mnistkit.usermodels.modelref import _path, _split

        for it in self.iterations:
            if it.id.lower() == source.name.lower() and it.model == source.reference:
                return it
        for it in self.iterations:
            target, attr = _split(it.model)
            if source.kind == "registered" and attr is None and it.model.lower() == source.name.lower():
                return it
            if source.kind in ("file", "yaml") and str(_path(target, self.path.parent)) == source.path and \
                    (source.kind == "yaml" or attr == source.attr) and not it.model_args:
                return it
        return None

    def recipe_for(self, it: Iteration | None) -> dict[str, Any]:
        """Shared defaults overridden by the iteration's own recipe (augment merged key by key)."""
        merged = dict(self.defaults)
        if it is not None:
            for key, value in it.recipe.items():
                if key == "augment" and isinstance(value, dict) and isinstance(merged.get("augment"), dict):
                    merged["augment"] = {**merged["augment"], **value}
                else:
                    merged[key] = value
        return merged



class _Checker:
    def __init__(self, path: Path, root: Any) -> None:
        self.path, self.root = path, root

    def fail(self, where: tuple, message: str) -> None:
        line = yaml_line(self.root, where)   # the node's, else the nearest enclosing one's
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
    final: str | None = None
    known_models = {m.lower() for m in list_models()}
    from mnistkit.usermodels.modelref import _check_args, _split
    for n, raw in enumerate(data["iterations"]):
        where = ("iterations", n)
        check.mapping(where, raw, _ITERATION, required=("id",))
        it_id = raw["id"]
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,39}", it_id) or it_id.lower().endswith((".py", ".yaml", ".yml")):
            check.fail(where + ("id",), f"iteration id {it_id!r} must be 1-40 letters, digits, '_', '.' or '-' "
                                        "(e.g. S1, step-3), not a file name")
        if it_id.lower() in seen:
            check.fail(where + ("id",), f"iteration id {it_id!r} appears twice")
        seen.add(it_id.lower())
        if raw.get("final"):
            if final is not None:
                check.fail(where + ("final",), f"{final} and {it_id} are both marked final; mark one iteration "
                                               "final: true (the one handed in)")
            final = it_id
        model = raw.get("model", it_id)
        try:
            target, attr = _split(model.strip())
            model_args = _check_args(raw.get("model_args"), "model_args") and dict(raw.get("model_args"))
        except UsageError as exc:
            check.fail(where + ((exc.key or "model"),), exc.detail.split(": ", 1)[-1])
        if attr is None and not target.lower().endswith((".py", ".yaml", ".yml")) and "/" not in target:
            if target.lower() not in known_models:
                check.fail(where + ("model",), f"model {model!r} is not registered (known models: "
                                               f"{', '.join(list_models())}) nor a FILE.py:Name, "
                                               "package.module:Name or FILE.yaml")
            model = model_info(target).name
        elif target.lower().endswith((".py", ".yaml", ".yml")) or "/" in target:
            file = path.parent / Path(target).expanduser()
            if not file.is_file():
                check.fail(where + ("model",), f"{file} not found (a model file is taken from the change-log's "
                                               "folder)")
        reported = check.mapping(where + ("reported",), raw.get("reported") or {}, _REPORTED)
        recipe = raw.get("recipe") or {}
        it = Iteration(id=it_id, model=model, changes=raw.get("changes", ""), reported=dict(reported),
                       recipe=dict(recipe), model_args=model_args or {}, target=raw.get("target", "").strip(),
                       analysis=raw.get("analysis", "").strip(), final=bool(raw.get("final")))
        merged = Experiments(path, constraints, defaults, (it,)).recipe_for(it)
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


def resolve_recipe(model: Any, experiments: Experiments | str | os.PathLike | None = None,
                   **overrides: Any) -> Recipe:
    """The recipe for ``model`` (a name, or a ``modelref.ModelSource``): its iteration in the
    change-log (``experiments``, loaded or a path, else found as ``find_experiments`` finds it)
    over the Recipe defaults, then ``overrides`` (None values are ignored)."""
    exp = experiments if isinstance(experiments, Experiments) else find_experiments(experiments)
    it = exp.iteration_for_model(model) if isinstance(model, str) else exp.iteration_of(model)
    name = model if isinstance(model, str) else model.name
    return Recipe.from_dict(exp.recipe_for(it), where=f"{exp.path} ({name})").replace(**overrides)
