"""The settings of a training run: ``Recipe`` (every hyperparameter), ``Augment`` (its
RandomAffine) and ``DataOptions`` (which data). Typed, ranged, and free of torch, so that the
CLI, the change-log loader and run folders share them without paying for an import.

This module owns every default: the CLI's help texts and the change-log read them from here.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from mnistkit.errors import UsageError

__all__ = ["Dataset", "Precision", "BnRelu", "Scheduler", "Optimizer", "Interpolation", "Augment", "Recipe", "DataOptions",
           "DEFAULT_BUDGET", "DEFAULT_RUNS_DIR", "choices", "expand_path"]

DEFAULT_BUDGET = 20_000  # the assignment's parameter budget (strictly fewer)
DEFAULT_RUNS_DIR = "runs"


class _Choice(str, Enum):
    def __str__(self) -> str:
        return self.value


class Dataset(_Choice):
    mnist = "mnist"
    synthetic = "synthetic"


class Precision(_Choice):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"


class BnRelu(_Choice):
    auto = "auto"
    fused = "fused"
    torch = "torch"


class Scheduler(_Choice):
    onecycle = "onecycle"
    step = "step"
    none = "none"


class Optimizer(_Choice):
    sgd = "sgd"


class Interpolation(_Choice):
    nearest = "nearest"
    bilinear = "bilinear"


def choices(enum: type[Enum]) -> tuple[str, ...]:
    return tuple(e.value for e in enum)


def check_choice(value: str, enum: type[Enum], key: str) -> str:
    """``value`` as the enum's canonical (lower-case) spelling; any case is accepted."""
    text = str(value.value if isinstance(value, Enum) else value)
    for option in choices(enum):
        if option == text.lower():
            return option
    detail = f"must be one of {', '.join(choices(enum))}, not {text!r}"
    raise UsageError(f"{key} {detail}", key=key, detail=detail)


def expand_path(path: str | os.PathLike) -> str:
    """``~`` expanded first, then made absolute: ``~/mnist`` never becomes ``<cwd>/~/mnist``."""
    return os.path.abspath(os.path.expanduser(os.fspath(path)))


@dataclass(frozen=True)
class Augment:
    """RandomAffine parameters, as torchvision's ``RandomAffine(degrees, translate, scale)``."""

    degrees: float = 10.0
    translate: float = 0.05
    scale_min: float = 0.98
    scale_max: float = 1.02
    interpolation: str = "nearest"  # RandomAffine's default; "bilinear" is smoother
    enabled: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "interpolation", check_choice(self.interpolation, Interpolation,
                                                               "augment.interpolation"))
        _check("augment", [
            ("degrees", 0 <= self.degrees <= 180, "must be in [0, 180]"),
            ("translate", 0 <= self.translate < 1, "must be in [0, 1)"),
            ("scale_min", 0 < self.scale_min <= self.scale_max, "must be positive and at most scale_max"),
        ], self)


def _check(prefix: str, checks: list[tuple[str, bool, str]], obj: Any) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            checks.insert(0, (f.name, False, "must be a finite number"))
    for key, ok, detail in checks:
        if not ok:
            name = f"{prefix}.{key}" if prefix else key
            raise UsageError(f"{name} {detail}", key=name, detail=detail)


@dataclass(frozen=True)
class Recipe:
    """Every training hyperparameter. Built from the change-log, overridden by options, and
    written into the run folder so that the run can be reproduced from it alone."""

    epochs: int = 15
    batch_size: int = 256
    test_batch_size: int = 1024
    optimizer: str = "sgd"
    lr: float = 0.2  # the maximum LR for OneCycleLR, the initial LR for StepLR
    momentum: float = 0.9
    # OneCycleLR cycles the momentum against the LR, between momentum - momentum_cycle (at the
    # LR's peak) and momentum + momentum_cycle (PyTorch's 0.85-0.95 for 0.9); 0 keeps it constant,
    # as does momentum 0.
    # Before 0.6 OneCycleLR silently replaced any recipe momentum with PyTorch's 0.85-0.95.
    momentum_cycle: float = 0.05
    nesterov: bool = False
    weight_decay: float = 0.0
    scheduler: str = "onecycle"
    pct_start: float = 0.2
    div_factor: float = 10.0
    final_div_factor: float = 100.0
    step_size: int = 1
    gamma: float = 0.1
    dropout: float = 0.05
    # where Dropout sits: "model" (the model's own places, e.g. after I1's 1x1 transitions) or
    # "convs" (after every 3x3 conv + BN + ReLU block instead); no parameter changes
    dropout_at: str = "model"
    label_smoothing: float = 0.0
    grad_clip: float = 0.0  # clip the gradients' global norm to this (0: no clipping)
    # decay of an exponential moving average of the weights (and BN statistics), updated every
    # step; when > 0 the average is what is evaluated, selected and saved (0: off)
    ema: float = 0.0
    # BatchNorm's running-statistics momentum (PyTorch's default 0.1): each training batch's
    # weight in the statistics that evaluation uses
    bn_momentum: float = 0.1
    augment: Augment = field(default_factory=Augment)
    mean: float = 0.1307
    std: float = 0.3081
    seed: int = 42
    # bf16 autocast for the training step (the convolutions and the linear layer compute in bf16,
    # and BatchNorm then takes and gives bf16 with fp32 statistics; the loss, the weights and
    # evaluation stay fp32); "auto" picks bf16 where the hardware computes it natively (CUDA,
    # CPUs with AVX512-BF16/AMX), else fp32
    precision: str = "auto"
    channels_last: bool = True
    # what trains BatchNorm + ReLU in an unsharded step: "torch" (PyTorch's two ops), "fused"
    # (mnistkit's C kernel, CPU and channels_last only; see mnistkit/fused.py) or "auto" (fused
    # where it can be built); a run records the resolved value, and runs recorded before 0.4 read
    # as "torch". A sharded step (shards > 1) always uses the kernel, and records "fused". On the
    # validation split the kernel's accuracy did not differ from PyTorch's beyond noise (I3, 12
    # paired seeds: -0.015 point, standard error 0.016; I4, 8 pairs: +0.045, SE 0.030)
    bn_relu: str = "torch"
    # data-parallel shards per training step on the CPU (mnistkit/parallel.py): each batch is
    # split into this many row blocks, each trained by its own thread with a share of the
    # intra-op threads, BatchNorm's statistics taken over the whole batch (in the fused kernel,
    # which it needs); Dropout's masks come from one generator per shard, so a sharded run is its
    # own run (the same for the same number of shards and threads). "auto": 2 where the process
    # has 2 or more threads, the device is the CPU, channels_last is on and the kernel builds,
    # else 1 (one thread over the whole batch, as before 0.7); a run records the resolved number
    shards: int | str = "auto"

    def __post_init__(self) -> None:
        for key, enum in (("optimizer", Optimizer), ("scheduler", Scheduler), ("precision", Precision),
                          ("bn_relu", BnRelu)):
            object.__setattr__(self, key, check_choice(getattr(self, key), enum, key))
        _check("", [
            ("epochs", self.epochs >= 1, "must be at least 1"),
            ("batch_size", self.batch_size >= 1, "must be at least 1"),
            ("test_batch_size", self.test_batch_size >= 1, "must be at least 1"),
            ("lr", self.lr > 0, "must be a positive number"),
            ("dropout", 0 <= self.dropout < 1, "must be in [0, 1)"),
            ("dropout_at", self.dropout_at in ("model", "convs"), "must be model or convs"),
            ("pct_start", 0 < self.pct_start < 1, "must be in (0, 1)"),
            ("div_factor", self.div_factor > 0, "must be positive"),
            ("final_div_factor", self.final_div_factor > 0, "must be positive"),
            ("step_size", self.step_size >= 1, "must be at least 1"),
            ("gamma", self.gamma > 0, "must be positive"),
            ("momentum", self.momentum >= 0, "must be >= 0"),
            ("momentum_cycle", self.momentum_cycle >= 0, "must be >= 0 (0: constant momentum)"),
            ("momentum_cycle", self.scheduler != "onecycle" or self.momentum == 0 or self.momentum_cycle <= self.momentum,
             f"must be at most momentum ({self.momentum}): the cycle's low end is momentum - momentum_cycle"),
            ("momentum", self.scheduler != "onecycle" or self.momentum + self.momentum_cycle < 1,
             f"plus momentum_cycle ({self.momentum_cycle}) must be below 1: the cycle's high end"),
            ("weight_decay", self.weight_decay >= 0, "must be >= 0"),
            ("label_smoothing", 0 <= self.label_smoothing < 1, "must be in [0, 1)"),
            ("grad_clip", self.grad_clip >= 0, "must be >= 0 (0: no clipping)"),
            ("ema", 0 <= self.ema < 1, "must be in [0, 1) (0: no moving average)"),
            ("bn_momentum", 0 < self.bn_momentum <= 1, "must be in (0, 1]"),
            ("shards", self.shards == "auto" or (isinstance(self.shards, int) and not isinstance(self.shards, bool)
                        and 1 <= self.shards <= 64), "must be auto or a whole number in [1, 64] (1: no sharding)"),
            ("std", self.std > 0, "must be positive"),
            ("seed", 0 <= self.seed < 2**63, "must be a non-negative integer"),
        ], self)

    def model_kwargs(self) -> dict[str, Any]:
        """What a registered model's builder takes from the recipe."""
        return {"dropout": self.dropout, "dropout_at": self.dropout_at}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def _typed(cls: type, data: dict[str, Any], where: str, prefix: str = "") -> dict[str, Any]:
        """Check keys and types of ``data`` against dataclass ``cls``; ints are accepted as floats."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        out = {}
        for name, value in data.items():
            key = prefix + str(name)
            if name not in fields:
                detail = f"unknown key; known keys: {', '.join(sorted(fields))}"
                raise UsageError(f"{where}: unknown key {key!r}; known keys: {', '.join(sorted(fields))}",
                                 key=key, detail=detail)
            default = fields[name].default
            if default is dataclasses.MISSING:  # nested dataclass
                out[name] = value
                continue
            expected = type(default)
            if name in _INT_OR_AUTO and isinstance(value, int) and not isinstance(value, bool):
                expected = int
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, expected) or (expected is not bool and isinstance(value, bool)):
                kind = "auto or a whole number" if name in _INT_OR_AUTO else expected.__name__
                detail = f"must be {kind}, not {type(value).__name__} ({value!r})"
                raise UsageError(f"{where}: {key} {detail}", key=key, detail=detail)
            out[name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "recipe") -> "Recipe":
        if not isinstance(data, dict):
            raise UsageError(f"{where} must be a mapping", key=None, detail="must be a mapping")
        values = cls._typed(cls, data, where)
        try:
            if "augment" in values and not isinstance(values["augment"], Augment):
                aug = values["augment"]
                if not isinstance(aug, dict):
                    raise UsageError("augment must be a mapping", key="augment", detail="must be a mapping")
                values["augment"] = Augment(**cls._typed(Augment, aug, where, prefix="augment."))
            return cls(**values)
        except UsageError as exc:
            message = str(exc) if str(exc).startswith(where) else f"{where}: {exc}"
            raise UsageError(message, key=exc.key, detail=exc.detail) from None

    def replace(self, **changes: Any) -> "Recipe":
        """A copy with ``changes`` applied; ``None`` values are ignored (an option not given)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


# recipe keys that take a whole number or "auto" (their default)
_INT_OR_AUTO = {"shards"}


@dataclass(frozen=True)
class DataOptions:
    """Which data a run trains on. ``data_dir`` is stored absolute (``~`` expanded);
    ``None`` means $MNISTKIT_DATA, else the per-user cache folder."""

    dataset: str = "mnist"
    data_dir: str | None = None
    limit: int | None = None
    val: int = 0  # training images held out for validation (choosing the best epoch)
    val_seed: int = 0  # which images: a fixed, seeded draw, the same for every training seed

    def __post_init__(self) -> None:
        for key in ("val", "val_seed"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise UsageError(f"{key} must be a non-negative integer, not {value!r}", key=key,
                                 detail="must be a non-negative integer")
        object.__setattr__(self, "dataset", check_choice(self.dataset, Dataset, "dataset"))
        if self.data_dir is not None:
            object.__setattr__(self, "data_dir", expand_path(self.data_dir))
        if self.limit is not None and (isinstance(self.limit, bool) or not isinstance(self.limit, int)
                                       or self.limit < 1):
            raise UsageError(f"limit must be a positive number of training samples, not {self.limit!r}",
                             key="limit", detail="must be a positive number of training samples")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str = "data") -> "DataOptions":
        if not isinstance(data, dict):
            raise UsageError(f"{where} must be a mapping")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
