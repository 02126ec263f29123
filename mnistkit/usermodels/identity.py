"""A model's identity: its architecture, as the summary traces it, not its file's bytes or path.

A run counts for an iteration while its model computes the same thing: every layer and
functional op in forward order with its hyper-parameters (a module's own settings, Dropout's p,
kernel, stride, padding; not BatchNorm's momentum, which the recipe sets, nor ``inplace``) and its input and output shapes, then every parameter and buffer by
name and shape. A docstring, a comment, another class in the same file, reformatting, moving or
copying the project keep that; a channel, a kernel, an op, a dropout p or a renamed layer change
it, and ``first_difference`` names the first layer that differs.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

__all__ = ["architecture", "fingerprint", "first_difference"]

_NOT_COMPUTED = re.compile(r"(momentum|inplace)=[^,)]*(, )?")   # the recipe sets momentum; inplace computes the same
MAX_LINES = 4000      # a recorded architecture is read back from a run folder: bounded
MAX_LINE = 400


def architecture(model: Any, summary: Any = None) -> list[str]:
    """One line per traced row, then one per state_dict entry (``summary``: the model's
    ``summarize`` result when the caller has it; else the model is traced once here)."""
    if summary is None:
        from mnistkit.introspect.summary import summarize

        summary = summarize(model)
    modules = dict(model.named_modules())
    lines = []
    for row in summary.layers:
        module = modules.get(row.name)
        hyper = module.extra_repr() if module is not None and row.input_shape is not None else ""
        hyper = _NOT_COMPUTED.sub("", hyper)
        geometry = "".join(f" {k}{v}" for k, v in (("k", row.kernel), ("s", row.stride), ("p", row.padding)) if v)
        lines.append(f"{row.name}: {row.type}({hyper}){geometry} {row.input_shape} -> {row.output_shape}"[:MAX_LINE])
    lines += [f"{key} {list(value.shape)}"[:MAX_LINE] for key, value in model.state_dict().items()]
    return lines


def fingerprint(lines: list[str], args: dict[str, Any] | None = None) -> str:
    text = "\n".join(lines) + "\nargs " + repr(sorted((args or {}).items()))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def first_difference(recorded: list[str], now: list[str]) -> str:
    """``conv2: Conv2d(8, 16, ...) ... (now: Conv2d(8, 12, ...) ...)``: the first layer that differs."""
    for old, new in zip(recorded, now):
        if old != new:
            return f"{old} (now: {new.split(': ', 1)[-1]})"
    if len(recorded) != len(now):
        longer = recorded if len(recorded) > len(now) else now
        extra = longer[min(len(recorded), len(now))]
        return f"{'the run had' if longer is recorded else 'the model now has'} {extra}"
    return "the model arguments"
