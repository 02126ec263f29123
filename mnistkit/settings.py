"""Recipe settings from the command line: ``--set KEY=VALUE`` pairs (``train``, ``sweep``,
``lr-find``) read into typed recipe keys, checked as the change-log's recipe is checked.
``Recipe.with_settings`` applies them. Free of torch, as ``recipe`` is."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from mnistkit.errors import UsageError
from mnistkit.recipe import REPLACED, Augment, Recipe

__all__ = ["SETTING_KEYS", "parse_settings"]

# every key a setting (``--set KEY=VALUE``) can name: the recipe's, and each augmentation field as augment.KEY
SETTING_KEYS = tuple(sorted([f.name for f in dataclasses.fields(Recipe) if f.name != "augment"]
                            + [f"augment.{f.name}" for f in dataclasses.fields(Augment)]))


def _scalar(raw: str) -> Any:
    """A setting's value as a YAML scalar (``12``, ``0.1``, ``true``, ``bilinear``), as model
    arguments are read; a number YAML 1.1 leaves as text (``5e-4``: no dot) is a number."""
    import yaml

    text = raw.strip()
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        if math.isfinite(number) and any(c.isdigit() for c in value):
            return int(value) if re.fullmatch(r"[-+]?\d+", value.strip()) else number
    return value


def parse_settings(pairs: list[str]) -> dict[str, Any]:
    """``["weight_decay=5e-4", "augment.degrees=7", "channels_last=false"]`` ->
    ``{"weight_decay": 0.0005, "augment.degrees": 7.0, "channels_last": False}``: each KEY a recipe
    key (``SETTING_KEYS``), each VALUE a YAML scalar, typed as the change-log types it (an int
    where a float is expected is a float). Ranges and combinations are checked when the settings
    are applied to a recipe (``Recipe.with_settings``). Every error is one line naming the key."""
    out: dict[str, Any] = {}
    given: dict[str, str] = {}
    for pair in pairs:
        key, sep, raw = str(pair).partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"setting {pair!r} is not KEY=VALUE (e.g. weight_decay=0.0005 or augment.degrees=7)",
                             key="settings", detail="is not KEY=VALUE")
        if key in REPLACED:
            raise UsageError(f"{key} {REPLACED[key]}", key=key, detail=REPLACED[key])
        if key == "augment":
            detail = ("is a group: set its keys one at a time, e.g. augment.degrees=7 (augment.enabled=false "
                      "turns it off)")
            raise UsageError(f"augment {detail}", key=key, detail=detail)
        if key not in SETTING_KEYS:
            detail = f"is not a recipe key; known keys: {', '.join(SETTING_KEYS)}"
            raise UsageError(f"{key!r} {detail}", key=key, detail=detail)
        if key in out:
            raise UsageError(f"{key} is set twice ({given[key]} and {pair}); set it once", key=key,
                             detail="is set twice")
        value = _scalar(raw)
        cls, name, prefix = (Augment, key[len("augment."):], "augment.") if key.startswith("augment.") \
            else (Recipe, key, "")
        try:
            typed = Recipe._typed(cls, {name: value}, "setting", prefix)
        except UsageError as exc:
            raise UsageError(f"{exc.key} {exc.detail}", key=exc.key, detail=exc.detail) from None
        out[key], given[key] = typed[name], str(pair)
    return out
