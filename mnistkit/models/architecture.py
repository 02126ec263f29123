"""A model architecture as pure data: a YAML file that lists layers top to bottom. Building it
runs no code from the file (safe YAML: no tags, aliases capped), and every size is checked by
arithmetic on (channels, height, width) before anything is allocated. ::

    # s1.yaml
    description: Three conv blocks, 1x1 transition, GAP head   # optional, one line
    layers:                          # top to bottom; the input is 1x28x28
      - conv: {channels: 8, kernel: 3}
      - bn
      - relu
      - conv: {channels: 16, padding: 1, bias: false}
      - bn
      - relu
      - maxpool: 2
      - transition: 10
      - dropout                      # the recipe's dropout; "dropout: 0.1" fixes it
      - conv: 16
      - bn
      - relu
      - gap
      - conv: {channels: 10, kernel: 1}
      - flatten

A row is a layer type alone (``relu``), a type and its arguments (``conv: {channels: 8}``), or
a type and its main argument (``conv: 8``, ``maxpool: 2``, ``dropout: 0.1``, ``linear: 10``).
In-channels and in-features are inferred from the layer above. Defaults are PyTorch's:

    conv        Conv2d: channels (required, 1-1024), kernel 3 (1-28), stride 1 (1-28), padding 0
                (0-14), dilation 1 (1-14), groups 1 (must divide the in and out channels), bias true
    transition  1x1 Conv2d: channels (required, 1-1024), bias false
    bn          BatchNorm2d over the current channels (also written "batchnorm")
    relu        ReLU
    maxpool     MaxPool2d: kernel 2 (1-28), stride the kernel's (1-28), padding 0 (at most kernel/2)
    avgpool     AvgPool2d: as maxpool
    dropout     Dropout: p, from 0 to below 1; left out, the recipe's dropout
    gap         AdaptiveAvgPool2d(1): global average pooling
    flatten     Flatten: the image becomes channels x height x width features
    linear      Linear: features (required, 1-4096), bias true; needs a flatten above it

The model must end in 10 class scores per image: ``gap``, a 1x1 ``conv`` to 10 channels and
``flatten``, or ``flatten`` and ``linear: 10``. Layers are named by type and count (conv1, bn1,
relu1, t1 for a transition, pool1, drop1, gap, flatten, fc1), in one flat ``nn.Sequential``:
``mnistkit summary`` shows the names, the state_dict keys follow (``net.conv1.weight``). Limits:
256 layers, 5,000,000 parameters, 4,194,304 values per image out of any layer. Every error is
one ``UsageError`` line naming the file, the line and the layer (``layers[3] (conv)``, from 0).
"""

from __future__ import annotations

import difflib
import hashlib
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
import yaml
from torch import nn

from mnistkit.errors import UsageError
from mnistkit.files.safeio import parse_yaml_bounded, read_bytes_bounded, yaml_line

__all__ = ["Architecture", "YamlNet", "load_architecture", "parse_architecture", "LAYER_TYPES"]

MAX_BYTES = 256 * 1024        # an architecture is a few hundred bytes; comments are welcome
MAX_LAYERS = 256
MAX_PARAMS = 5_000_000
MAX_VALUES = 1 << 22          # values per image out of one layer (1024x64x64)
MAX_TOTAL_VALUES = 1 << 23    # out of all layers together: the forward pass's memory per image (32 MiB in fp32)
INPUT = (1, 28)               # channels, side: MNIST digits are 1x28x28
CLASSES = 10
WHAT = "a YAML architecture"

_REQUIRED = object()
_POOL = {"kernel": 2, "stride": None, "padding": 0}
_ARGS: dict[str, dict[str, Any]] = {  # type -> argument -> default
    "conv": {"channels": _REQUIRED, "kernel": 3, "stride": 1, "padding": 0, "dilation": 1, "groups": 1, "bias": True},
    "transition": {"channels": _REQUIRED, "bias": False},
    "bn": {}, "relu": {}, "maxpool": _POOL, "avgpool": _POOL, "dropout": {"p": None}, "gap": {}, "flatten": {},
    "linear": {"features": _REQUIRED, "bias": True},
}
LAYER_TYPES = tuple(sorted(_ARGS))
_ALIASES = {"batchnorm": "bn"}
_MAIN = {"conv": "channels", "transition": "channels", "maxpool": "kernel", "avgpool": "kernel", "dropout": "p",
         "linear": "features"}
_RANGE = {"channels": (1, 1024), "kernel": (1, 28), "stride": (1, 28), "padding": (0, 14), "dilation": (1, 14),
          "groups": (1, 1024), "features": (1, 4096)}
_PREFIX = {"conv": "conv", "transition": "t", "bn": "bn", "relu": "relu", "maxpool": "pool", "avgpool": "pool",
           "dropout": "drop", "gap": "gap", "flatten": "flatten", "linear": "fc"}
_HINT = "end with gap, a 1x1 conv to 10 channels and flatten, or flatten and linear: 10"


class YamlNet(nn.Module):
    """A model built from a YAML architecture: one flat, named ``nn.Sequential`` of plain layers."""

    def __init__(self, layers: OrderedDict[str, nn.Module]) -> None:
        super().__init__()
        self.net = nn.Sequential(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@dataclass(frozen=True)
class Architecture:
    """A validated architecture: its source as read (``text``, the ``sha256`` of those bytes), the
    loaded ``data``, and ``layers``: one plain dict per row, ``type`` (canonical), ``name`` and
    every argument resolved, with the inferred ``in_channels`` / ``in_features``. ``params`` is
    the exact trainable parameter count, computed before anything is allocated."""

    path: str                 # the file, or parse_architecture's ``where``
    text: str
    sha256: str
    data: dict[str, Any]
    description: str
    layers: tuple[dict[str, Any], ...]
    params: int

    def build(self, dropout: float = 0.05) -> YamlNet:
        """A fresh, randomly initialised model; ``dropout`` is the p of each bare ``dropout`` row."""
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise UsageError(f"{self.path}: dropout must be a number from 0 to below 1, not {_show(dropout)}",
                             key="dropout")
        modules: OrderedDict[str, nn.Module] = OrderedDict()
        made = False   # a layer above made a new tensor: an in-place ReLU cannot touch the caller's input
        for row in self.layers:
            modules[row["name"]] = _module(row, float(dropout), made)
            made = made or row["type"] not in ("dropout", "flatten")
        return YamlNet(modules)


def _module(row: dict[str, Any], dropout: float, inplace: bool) -> nn.Module:
    """The torch layer of one resolved row."""
    kind = row["type"]
    if kind == "conv":
        return nn.Conv2d(row["in_channels"], row["channels"], row["kernel"], stride=row["stride"],
                         padding=row["padding"], dilation=row["dilation"], groups=row["groups"], bias=row["bias"])
    if kind == "transition":
        return nn.Conv2d(row["in_channels"], row["channels"], 1, bias=row["bias"])
    if kind in ("maxpool", "avgpool"):
        pool = nn.MaxPool2d if kind == "maxpool" else nn.AvgPool2d
        return pool(row["kernel"], stride=row["stride"], padding=row["padding"])
    if kind == "linear":
        return nn.Linear(row["in_features"], row["features"], bias=row["bias"])
    if kind == "dropout":
        return nn.Dropout(dropout if row["p"] is None else row["p"])
    if kind == "bn":
        return nn.BatchNorm2d(row["channels"])
    return nn.ReLU(inplace=inplace) if kind == "relu" else nn.AdaptiveAvgPool2d(1) if kind == "gap" else nn.Flatten()


def load_architecture(path: str | os.PathLike) -> Architecture:
    """Read a YAML architecture file once (bounded), hash those bytes and parse them."""
    return _parse(read_bytes_bounded(path, MAX_BYTES, UsageError, WHAT), str(path))


def parse_architecture(text: str | bytes, where: str) -> Architecture:
    """An architecture from text held elsewhere (a run folder's copy, a worker's task), validated as
    a file is; ``where`` names the source in messages. The sha256 is of its UTF-8 bytes."""
    if isinstance(text, str):
        try:
            text = text.encode("utf-8")
        except UnicodeEncodeError:
            raise UsageError(f"{where} is not UTF-8 text; it is not {WHAT}", key="model") from None
    if len(text) > MAX_BYTES:
        raise UsageError(f"{where} is larger than {MAX_BYTES // 1024:,} KiB; it is not {WHAT}", key="model")
    return _parse(bytes(text), str(where))


class _ModelError(UsageError):
    """A YAML architecture that cannot be read: a bad ``model`` (exit code 2)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, key="model")


def _parse(raw: bytes, where: str) -> Architecture:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{where} is not UTF-8 text; it is not {WHAT} file", key="model") from None
    data, root = parse_yaml_bounded(text, where, _ModelError, WHAT)
    description, layers, params = _check(data, _Source(where, root))
    return Architecture(where, text, hashlib.sha256(raw).hexdigest(), data, description, layers, params)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass(frozen=True)
class _Source:
    """Messages about one source: the file, the line YAML gives for a path of keys, the layer."""

    where: str
    root: Any   # the composed YAML node tree, for line numbers

    def line(self, path: tuple) -> int | None:
        return yaml_line(self.root, path)

    def fail(self, path: tuple, message: str) -> NoReturn:
        line = self.line(path)
        raise UsageError(f"{self.where}{f', line {line}' if line else ''}: {message}", key="model", detail=message)


def _check(data: Any, src: _Source) -> tuple[str, tuple[dict[str, Any], ...], int]:
    """(description, resolved rows, parameter count), or one UsageError."""
    if data is None:
        src.fail((), "the file is empty; it needs 'layers', the model's layers top to bottom")
    if not isinstance(data, dict):
        src.fail((), f"must be a mapping with 'layers' (and 'description'), not {type(data).__name__}")
    for key in data:
        if key not in ("description", "layers"):
            src.fail((str(key),), f"unknown key {_show(key)}; known keys: description, layers")
    description = "" if data.get("description") is None else data["description"]
    if not isinstance(description, str) or "\n" in description.strip() or len(description.strip()) > 200:
        src.fail(("description",), f"description must be one line of text (up to 200 characters), not "
                                   f"{_show(description)}")
    if "layers" not in data:
        src.fail((), "no 'layers': list the model's layers top to bottom (layers: [conv: 8, bn, relu, ...])")
    layers = data["layers"]
    if not isinstance(layers, list) or not layers:
        src.fail(("layers",), f"layers must be a non-empty list of layers, top to bottom, not {_show(layers)}")
    if len(layers) > MAX_LAYERS:
        src.fail(("layers",), f"{len(layers)} layers; mnistkit builds models of up to {MAX_LAYERS} layers")
    return description.strip(), *_walk(layers, src)


def _walk(layers: list, src: _Source) -> tuple[tuple[dict[str, Any], ...], int]:
    """Follow (channels, side) down the rows: infer in-channels, count parameters, check sizes."""
    channels, side = INPUT
    flat_at: int | None = None   # the row that flattened the image (then ``channels`` counts features)
    rows: list[dict[str, Any]] = []
    counts: dict[str, int] = {}
    params, biggest, total = 0, (0, 0), 0
    for i, raw in enumerate(layers):
        kind, args, at = _row(raw, i, src)
        label, here = f"layers[{i}] ({kind})", ("layers", i)
        if flat_at is not None and kind in ("conv", "transition", "bn", "maxpool", "avgpool", "gap"):
            src.fail(here, f"{label}: {kind} needs an image (channels x height x width), not the {channels:,} "
                           f"features after layers[{flat_at}] (flatten): put it before the flatten")
        if kind == "linear" and flat_at is None:
            src.fail(here, f"{label}: linear needs a flatten (or gap + flatten) before it")
        prefix = _PREFIX[kind]
        counts[prefix] = number = counts.get(prefix, 0) + 1
        row: dict[str, Any] = {"type": kind, "name": prefix + ("" if prefix in ("gap", "flatten") and number == 1
                                                               else str(number)), **args}
        n = 0
        if kind in ("conv", "transition"):
            k, stride, pad, dil, groups = (args.get(a, d) for a, d in (("kernel", 1), ("stride", 1), ("padding", 0),
                                                                       ("dilation", 1), ("groups", 1)))
            out, window = args["channels"], dil * (k - 1) + 1
            if channels % groups or out % groups:
                src.fail(at + ("groups",), f"{label}: groups {groups} must divide the in channels ({channels}) "
                                           f"and the out channels ({out})")
            side = _slide(side, window, stride, pad, src, here, label, f" (kernel {k}, dilation {dil})" * (dil > 1))
            row["in_channels"], n = channels, out * (channels // groups) * k * k + (out if args["bias"] else 0)
            channels = out
        elif kind == "bn":
            row["channels"], n = channels, 2 * channels
        elif kind in ("maxpool", "avgpool"):
            k, pad = args["kernel"], args["padding"]
            row["stride"] = stride = args["stride"] or k
            if 2 * pad > k:
                src.fail(at + ("padding",), f"{label}: padding {pad} is more than half the {k}x{k} window")
            side = _slide(side, k, stride, pad, src, here, label)
        elif kind == "gap":
            side = 1
        elif kind == "flatten" and flat_at is None:
            channels, side, flat_at = channels * side * side, 1, i
        elif kind == "linear":
            out = args["features"]
            row["in_features"], n = channels, channels * out + (out if args["bias"] else 0)
            channels = out
        if channels * side * side > MAX_VALUES:
            src.fail(here, f"{label}: its output, {channels}x{side}x{side} = {channels * side * side:,} values per "
                           f"image, is more than mnistkit builds ({MAX_VALUES:,})")
        if (total := total + channels * side * side) > MAX_TOTAL_VALUES:   # by arithmetic, before any allocation
            src.fail(here, f"{label}: up to here the layers output {total:,} values per image in all, more than "
                           f"mnistkit builds ({MAX_TOTAL_VALUES:,}): use fewer channels, less padding or fewer layers")
        rows.append(row)
        params, biggest = params + n, max(biggest, (n, i))
    if flat_at is None or channels != CLASSES:
        shape = f"{channels:,}" if flat_at is not None else f"{channels}x{side}x{side}"
        hint = "end with flatten" if flat_at is None and (channels, side) == (CLASSES, 1) else \
            "end with linear: 10" if flat_at is not None else _HINT
        last = len(layers) - 1
        src.fail(("layers", last), f"layers[{last}] ({rows[-1]['type']}): the architecture ends in {shape} values per "
                                   f"image, not {CLASSES} class scores: {hint}")
    if params > MAX_PARAMS:
        n, i = biggest
        src.fail(("layers", i), f"the architecture has {params:,} parameters; mnistkit builds models up to "
                                f"{MAX_PARAMS:,} (layers[{i}] ({rows[i]['type']}) has {n:,} of them)")
    return tuple(rows), params


def _slide(side: int, window: int, stride: int, pad: int, src: _Source, path: tuple, label: str, why: str = "") -> int:
    """The side out of a sliding window (PyTorch's floor rule); a window larger than its input fails."""
    if side + 2 * pad < window:
        src.fail(path, f"{label}: its {side}x{side} input{f', padded by {pad},' if pad else ''} is too small "
                       f"for a {window}x{window} window{why}")
    return (side + 2 * pad - window) // stride + 1


def _row(raw: Any, i: int, src: _Source) -> tuple[str, dict[str, Any], tuple]:
    """(canonical type, every argument resolved, the YAML path of its arguments) of one row."""
    path = ("layers", i)
    if isinstance(raw, dict) and len(raw) > 1:
        _several(raw, i, src)
    if isinstance(raw, str) or isinstance(raw, dict) and len(raw) == 1:
        name, given = (raw, None) if isinstance(raw, str) else next(iter(raw.items()))
    else:
        src.fail(path, f"layers[{i}] must be a layer such as relu or conv: {{channels: 8}}, not "
                       f"{type(raw).__name__} ({_show(raw)})")
    kind = _ALIASES.get(name, name) if isinstance(name, str) else name
    if kind not in _ARGS:
        src.fail(path, f"layers[{i}]: unknown layer {_show(name)}{_suggest(name)}; known layers: "
                       f"{', '.join(LAYER_TYPES)}")
    at, label, schema = path + (str(name),), f"layers[{i}] ({kind})", _ARGS[kind]
    if given is None:
        given = {}
    elif not isinstance(given, dict):
        if kind not in _MAIN:
            src.fail(at, f"{label}: {kind} takes no arguments, not {_show(given)}")
        given = {_MAIN[kind]: given}
    for key in given:
        if key not in schema:
            takes = f"{kind} takes: {', '.join(schema)}" if schema else f"{kind} takes no arguments"
            src.fail(at + (str(key),), f"{label}: unknown argument {_show(key)}; {takes}")
    args = {}
    for key, default in schema.items():
        value = given.get(key, default)
        if value is _REQUIRED:
            src.fail(at, f"{label}: {kind} needs {key}, e.g. {kind}: {{{key}: 16}} (or {kind}: 16)")
        args[key] = None if value is None and default is None else _value(key, value, src, at + (key,), label)
    return kind, args, at


def _value(key: str, value: Any, src: _Source, path: tuple, label: str) -> Any:
    """A given argument, checked: bias a bool, p a probability, every size a whole number in range."""
    if key == "bias" and not isinstance(value, bool):
        src.fail(path, f"{label}: bias must be true or false, not {_show(value)}")
    if key == "p":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            src.fail(path, f"{label}: dropout p must be a number from 0 to below 1, not {_show(value)}")
        return float(value)
    if key in _RANGE:
        lo, hi = _RANGE[key]
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            src.fail(path, f"{label}: {key} must be a whole number from {lo} to {hi}, not {_show(value)}")
    return value


def _several(raw: dict, i: int, src: _Source) -> NoReturn:
    """A row of several keys: most often a layer's arguments not indented under it."""
    kinds = [k for k in raw if isinstance(k, str) and _ALIASES.get(k, k) in _ARGS]
    if len(kinds) == 1 and raw[kinds[0]] is None:
        extra = [str(k) for k in raw if k != kinds[0]]
        if all(k in _ARGS[_ALIASES.get(kinds[0], kinds[0])] for k in extra):
            src.fail(("layers", i), f"layers[{i}] ({kinds[0]}): {', '.join(extra)} belong{'s' * (len(extra) == 1)} "
                                    f"to {kinds[0]}: indent {'it' if len(extra) == 1 else 'them'} under "
                                    f"'{kinds[0]}:', or write {kinds[0]}: {{{extra[0]}: ...}}")
    src.fail(("layers", i), f"layers[{i}] is one layer, e.g. conv: {{channels: 8}}, not {len(raw)} keys "
                            f"({', '.join(_show(k) for k in raw)}); is a '-' missing?")


def _suggest(name: Any) -> str:
    if not isinstance(name, str):
        return ""
    low = name.lower().removesuffix("2d")
    known = [*LAYER_TYPES, *_ALIASES]
    close = [low] if low in known else difflib.get_close_matches(low, known, n=1, cutoff=0.75)
    return f" (did you mean {_ALIASES.get(close[0], close[0])}?)" if close else ""
