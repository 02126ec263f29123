"""experiments.yaml: the iteration change-log and each iteration's recipe, typed and validated."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mnistkit.errors import MnistkitError, UsageError

DEFAULT_PATH = Path("experiments.yaml")
_TOP_KEYS = {"version", "constraints", "defaults", "iterations"}
_ITERATION_KEYS = {"id", "model", "changes", "reported", "recipe"}


class ExperimentsError(MnistkitError):
    """experiments.yaml is missing or malformed."""


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


def _line(node_map: dict, key: str) -> str:
    line = node_map.get(key)
    return f" (line {line})" if line else ""


def _key_lines(text: str) -> dict[str, int]:
    """First line number of each mapping key, for error messages."""
    lines: dict[str, int] = {}
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines
    stack = [root]
    while stack:
        node = stack.pop()
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                lines.setdefault(str(k.value), k.start_mark.line + 1)
                stack.append(v)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
    return lines


def load_experiments(path: str | os.PathLike = DEFAULT_PATH) -> Experiments:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ExperimentsError(f"{path} not found; pass --experiments FILE or run from the project folder") from None
    except OSError as exc:
        raise ExperimentsError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ExperimentsError(f"{path} is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    lines = _key_lines(text)
    if data is None:
        raise ExperimentsError(f"{path} is empty; it needs 'defaults' and 'iterations'")
    if not isinstance(data, dict):
        raise ExperimentsError(f"{path}: the top level must be a mapping with 'defaults' and 'iterations'")
    for key in data:
        if key not in _TOP_KEYS:
            raise ExperimentsError(f"{path}: unknown key {key!r}{_line(lines, key)}; known keys: "
                                   f"{', '.join(sorted(_TOP_KEYS))}")
    defaults = data.get("defaults") or {}
    constraints = data.get("constraints") or {}
    for key, value in (("defaults", defaults), ("constraints", constraints)):
        if not isinstance(value, dict):
            raise ExperimentsError(f"{path}: '{key}'{_line(lines, key)} must be a mapping")
    raw_iterations = data.get("iterations") or []
    if not isinstance(raw_iterations, list):
        raise ExperimentsError(f"{path}: 'iterations'{_line(lines, 'iterations')} must be a list")

    from mnistkit.models import list_models, model_info
    from mnistkit.training import Recipe

    try:
        Recipe.from_dict(defaults)
    except UsageError as exc:
        raise ExperimentsError(f"{path}: defaults: {exc}".replace("recipe: ", "").replace(": recipe", "")) from None

    iterations: list[Iteration] = []
    seen: set[str] = set()
    for n, raw in enumerate(raw_iterations):
        if not isinstance(raw, dict):
            raise ExperimentsError(f"{path}: iterations[{n}] must be a mapping")
        unknown = sorted(set(raw) - _ITERATION_KEYS)
        if unknown:
            raise ExperimentsError(f"{path}: iterations[{n}]: unknown key {unknown[0]!r}{_line(lines, unknown[0])}; "
                                   f"known keys: {', '.join(sorted(_ITERATION_KEYS))}")
        it_id = raw.get("id")
        if not isinstance(it_id, str) or not it_id:
            raise ExperimentsError(f"{path}: iterations[{n}] needs an 'id' string")
        if it_id.lower() in seen:
            raise ExperimentsError(f"{path}: iteration id {it_id!r} appears twice")
        seen.add(it_id.lower())
        model = raw.get("model", it_id)
        if not isinstance(model, str) or model.lower() not in (m.lower() for m in list_models()):
            raise ExperimentsError(f"{path}: iteration {it_id}: model {model!r} is not registered; known models: "
                                   f"{', '.join(list_models())}")
        recipe = raw.get("recipe") or {}
        if not isinstance(recipe, dict):
            raise ExperimentsError(f"{path}: iteration {it_id}: 'recipe' must be a mapping")
        it = Iteration(id=it_id, model=model_info(model).name, changes=str(raw.get("changes", "")),
                       reported=dict(raw.get("reported") or {}), recipe=recipe)
        iterations.append(it)
    exp = Experiments(path, constraints, defaults, tuple(iterations))
    for it in iterations:  # every iteration's merged recipe must be valid
        try:
            Recipe.from_dict(exp.recipe_dict(it.model), where=f"iteration {it.id} recipe")
        except UsageError as exc:
            raise ExperimentsError(f"{path}: {exc}") from None
    return exp


def resolve_recipe(model: str, experiments: str | os.PathLike | None = None, **overrides: Any):
    """The recipe for ``model``: experiments.yaml (``experiments``, else ./experiments.yaml when
    present, else built-in defaults), then ``overrides`` (None values are ignored)."""
    from mnistkit.training import Recipe

    if experiments is None and not DEFAULT_PATH.exists():
        base = Recipe()
    else:
        exp = load_experiments(experiments or DEFAULT_PATH)
        base = Recipe.from_dict(exp.recipe_dict(model), where=f"{exp.path} ({model})")
    return base.replace(**overrides)
