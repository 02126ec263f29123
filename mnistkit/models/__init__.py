"""The model registry and the registered architectures, one per iteration of the change-log.

Every model takes ``[B, 1, 28, 28]`` images and returns ``[B, 10]`` logits. The parameter
counts are part of the contract (tests pin them); ``mnistkit summary`` shows where they come
from, layer by layer.
"""

from __future__ import annotations

import fnmatch
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from mnistkit.errors import UnknownModelError

__all__ = ["ModelEntry", "register_model", "get_model", "list_models", "model_info"]


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Callable[..., nn.Module]
    description: str


_REGISTRY: dict[str, ModelEntry] = {}


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def register_model(name: str | None = None) -> Callable:
    """Class or function decorator: ``@register_model("I3")`` adds a builder to the registry.

    The description shown by ``mnistkit models`` is the first line of the builder's docstring.
    """

    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or builder.__name__
        if key.lower() in (k.lower() for k in _REGISTRY):
            raise ValueError(f"a model named {key!r} is already registered")
        doc = (builder.__doc__ or "").strip().splitlines()
        _REGISTRY[key] = ModelEntry(key, builder, doc[0].strip() if doc else "")
        return builder

    return decorator


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style ``pattern`` (case-insensitive), sorted."""
    pat = pattern.lower()
    return sorted((n for n in _REGISTRY if fnmatch.fnmatchcase(n.lower(), pat)), key=_natural_key)


def model_info(name: str) -> ModelEntry:
    """The registry entry for ``name`` (case-insensitive); unknown names list the known ones."""
    for key, entry in _REGISTRY.items():
        if key.lower() == str(name).lower():
            return entry
    known = ", ".join(list_models())
    raise UnknownModelError(f"unknown model {name!r}; known models: {known}")


def get_model(name: str, **kwargs) -> nn.Module:
    """Build a fresh, randomly initialised instance of a registered model."""
    return model_info(name).builder(**kwargs)


# --------------------------------------------------------------------------- building blocks


def conv_bn_relu(cin: int, cout: int, padding: int = 1, bias: bool = False) -> nn.Sequential:
    """3x3 convolution, BatchNorm, ReLU. A bias before BN is redundant (BN's shift absorbs it)."""
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(cin, cout, 3, padding=padding, bias=bias),
            bn=nn.BatchNorm2d(cout),
            relu=nn.ReLU(inplace=True),
        )
    )


def conv_relu(cin: int, cout: int, kernel: int = 3, padding: int = 1) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(conv=nn.Conv2d(cin, cout, kernel, padding=padding), relu=nn.ReLU(inplace=True))
    )


def transition(cin: int, cout: int, bias: bool = False) -> nn.Conv2d:
    """1x1 convolution that mixes and narrows channels cheaply (cin*cout weights)."""
    return nn.Conv2d(cin, cout, 1, bias=bias)


def separable(cin: int, cout: int, padding: int = 0) -> nn.Sequential:
    """Depthwise-separable block: a 3x3 depthwise convolution (one filter per channel, 9*cin
    weights), BN, ReLU, then a 1x1 pointwise convolution (cin*cout), BN, ReLU: a 3x3 conv's
    receptive field for a fraction of its 9*cin*cout weights."""
    return nn.Sequential(
        OrderedDict(
            dw=nn.Conv2d(cin, cin, 3, padding=padding, groups=cin, bias=False),
            dw_bn=nn.BatchNorm2d(cin),
            dw_relu=nn.ReLU(inplace=True),
            conv=nn.Conv2d(cin, cout, 1, bias=False),
            bn=nn.BatchNorm2d(cout),
            relu=nn.ReLU(inplace=True),
        )
    )


DROPOUT_AT = ("model", "convs")


def place_dropout(layers: OrderedDict, at: str, p: float) -> OrderedDict:
    """Where Dropout sits: ``"model"`` keeps the model's own places; ``"convs"`` removes them and
    puts one Dropout(p) after every 3x3 conv + BN + ReLU block instead (named ``drop_<block>``).
    Dropout has no parameters, so the count and the state_dict keys are unchanged either way."""
    if at not in DROPOUT_AT:
        raise ValueError(f"dropout_at must be one of {', '.join(DROPOUT_AT)}, not {at!r}")
    if at == "model":
        return layers
    placed: OrderedDict = OrderedDict()
    for name, layer in layers.items():
        if isinstance(layer, nn.Dropout):
            continue
        placed[name] = layer
        if isinstance(layer, nn.Sequential) and isinstance(getattr(layer, "bn", None), nn.BatchNorm2d):
            placed[f"drop_{name}"] = nn.Dropout(p)
    return placed


class _Net(nn.Module):
    """A model is one named ``nn.Sequential``; the names show up in ``mnistkit summary``."""

    def __init__(self, layers: OrderedDict, dropout_at: str = "model", dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(place_dropout(layers, dropout_at, dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# --------------------------------------------------------------------------- the iterations


@register_model("I0")
class I0(_Net):
    """Baseline: plain conv-ReLU stacks, no BatchNorm or Dropout, fully connected head."""

    def __init__(self, dropout: float = 0.0, dropout_at: str = "model") -> None:  # both accepted for a uniform API; unused
        super().__init__(
            OrderedDict(
                c1=conv_relu(1, 8),
                c2=conv_relu(8, 28),
                pool1=nn.MaxPool2d(2),
                c3=conv_relu(28, 30),
                pool2=nn.MaxPool2d(2),
                t1=conv_relu(30, 16, kernel=1, padding=0),
                flatten=nn.Flatten(),
                fc=nn.Linear(16 * 7 * 7, 10),
            )
        )
        # Without BN, PyTorch's default init shrinks the signal at every ReLU layer and SGD at
        # lr 0.1 stalls for most of the single epoch; He init keeps the variance constant.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)


@register_model("I1")
class I1(_Net):
    """Adds BatchNorm after each 3x3 conv and Dropout after each 1x1: faster, steadier training."""

    def __init__(self, dropout: float = 0.05, dropout_at: str = "model") -> None:
        super().__init__(
            OrderedDict(
                c1=conv_bn_relu(1, 16, bias=True),
                c2=conv_bn_relu(16, 16, bias=True),
                pool1=nn.MaxPool2d(2),
                t1=transition(16, 12, bias=True),
                drop1=nn.Dropout(dropout),
                c3=conv_bn_relu(12, 24, bias=True),
                c4=conv_bn_relu(24, 24, bias=True),
                pool2=nn.MaxPool2d(2),
                t2=transition(24, 20, bias=True),
                drop2=nn.Dropout(dropout),
                flatten=nn.Flatten(),
                fc=nn.Linear(20 * 7 * 7, 10),
            ),
            dropout_at, dropout,
        )


@register_model("I2")
class I2(_Net):
    """1x1 transitions and retuned widths; drops the biases BN makes redundant, to fit the budget."""

    def __init__(self, dropout: float = 0.05, dropout_at: str = "model") -> None:
        super().__init__(
            OrderedDict(
                c1=conv_bn_relu(1, 8),
                c2=conv_bn_relu(8, 16),
                pool1=nn.MaxPool2d(2),
                t1=transition(16, 12),
                drop1=nn.Dropout(dropout),
                c3=conv_bn_relu(12, 32),
                c4=conv_bn_relu(32, 32),
                pool2=nn.MaxPool2d(2),
                t2=transition(32, 10),
                drop2=nn.Dropout(dropout),
                flatten=nn.Flatten(),
                fc=nn.Linear(10 * 7 * 7, 10),
            ),
            dropout_at, dropout,
        )


@register_model("I3")
class I3(_Net):
    """GAP head with a 1x1 classifier replaces the FC head; the savings buy depth."""

    def __init__(self, dropout: float = 0.05, dropout_at: str = "model") -> None:
        super().__init__(
            OrderedDict(
                c1=conv_bn_relu(1, 10, padding=0),
                c2=conv_bn_relu(10, 26, padding=0),
                t1=transition(26, 10),
                pool1=nn.MaxPool2d(2),
                drop1=nn.Dropout(dropout),
                c3=conv_bn_relu(10, 18, padding=0),
                c4=conv_bn_relu(18, 18, padding=0),
                c5=conv_bn_relu(18, 20, padding=0),
                drop2=nn.Dropout(dropout),
                c6=conv_bn_relu(20, 20, padding=1),
                gap=nn.AdaptiveAvgPool2d(1),
                classifier=nn.Conv2d(20, 10, 1),
                flatten=nn.Flatten(),
            ),
            dropout_at, dropout,
        )


@register_model("I4")
class I4(_Net):
    """I3's shape at about a third of the parameters: narrower convs, one 1x1 transition, GAP head."""

    def __init__(self, dropout: float = 0.03, widths: tuple[int, ...] = (6, 12, 6, 12, 14, 14),
                 dropout_at: str = "model") -> None:
        w1, w2, t, w3, w4, w5 = widths
        super().__init__(
            OrderedDict(
                c1=conv_bn_relu(1, w1, padding=0),     # 26x26, RF 3
                c2=conv_bn_relu(w1, w2, padding=0),    # 24x24, RF 5
                t1=transition(w2, t),                  # mix and narrow before pooling
                pool1=nn.MaxPool2d(2),                 # 12x12, RF 6
                drop1=nn.Dropout(dropout),
                c3=conv_bn_relu(t, w3, padding=0),     # 10x10, RF 10
                c4=conv_bn_relu(w3, w4, padding=0),    # 8x8, RF 14
                drop2=nn.Dropout(dropout),
                c5=conv_bn_relu(w4, w5, padding=0),    # 6x6, RF 18
                gap=nn.AdaptiveAvgPool2d(1),
                classifier=nn.Conv2d(w5, 10, 1),
                flatten=nn.Flatten(),
            ),
            dropout_at, dropout,
        )


@register_model("I5")
class I5(_Net):
    """Under 3,000 params: two 3x3 convs, a 1x1 transition, four depthwise-separable blocks, GAP."""

    def __init__(self, dropout: float = 0.01, dropout_at: str = "model") -> None:
        # examples/i5/c-sep16.yaml, layer for layer (the same parameters, created in the same
        # order, so a seed initialises both alike); chosen by examples/sweep-i5-*.yaml
        super().__init__(
            OrderedDict(
                c1=conv_bn_relu(1, 8, padding=0),      # 26x26, RF 3
                c2=conv_bn_relu(8, 12, padding=0),     # 24x24, RF 5
                t1=transition(12, 8),                  # mix and narrow before pooling
                pool1=nn.MaxPool2d(2),                 # 12x12, RF 6
                drop1=nn.Dropout(dropout),
                c3=separable(8, 16),                   # 10x10, RF 10
                c4=separable(16, 16),                  # 8x8, RF 14
                drop2=nn.Dropout(dropout),
                c5=separable(16, 16),                  # 6x6, RF 18
                c6=separable(16, 16, padding=1),       # 6x6, RF 22
                gap=nn.AdaptiveAvgPool2d(1),
                classifier=nn.Conv2d(16, 10, 1),
                flatten=nn.Flatten(),
            ),
            dropout_at, dropout,
        )
