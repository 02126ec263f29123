"""JSON as the standard defines it: NaN and Infinity are not JSON (Python's ``json`` writes
them by default, and strict parsers reject the result). Every JSON mnistkit writes goes
through ``dumps``: a non-finite number becomes ``null``, which means "no such figure"."""

from __future__ import annotations

import dataclasses
import json
import math
from enum import Enum
from pathlib import PurePath
from typing import Any


def sanitize(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): sanitize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [sanitize(v) for v in obj]
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, PurePath):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sanitize(obj.to_dict() if hasattr(obj, "to_dict") else dataclasses.asdict(obj))
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    return json.dumps(sanitize(obj), allow_nan=False, **kwargs)


def loads(text: str, allow_nan: bool = False) -> Any:
    """Parse strictly: NaN, Infinity and -Infinity are refused (unless ``allow_nan``). Every
    failure is a ValueError, JSON nested too deeply for the parser's recursion included (a
    line of 200,000 ``[`` from a hostile file is damage, not a crash)."""
    def refuse(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    try:
        return json.loads(text) if allow_nan else json.loads(text, parse_constant=refuse)
    except RecursionError:
        raise ValueError("nested too deeply") from None
