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

__all__ = ["Dataset", "Precision", "Backend", "Scheduler", "Interpolation", "Augment", "Recipe", "DataOptions",
           "DEFAULT_BUDGET", "DEFAULT_RUNS_DIR", "MEAN", "STD", "choices", "expand_path", "recorded_recipe"]

MAX_EPOCHS = 10_000   # an MNIST run of a tiny CNN is tens of epochs: more is a typo (--epochs 1e23)

DEFAULT_BUDGET = 20_000  # the assignment's parameter budget (strictly fewer)
DEFAULT_RUNS_DIR = "runs"
MEAN, STD = 0.1307, 0.3081  # MNIST's training-set pixel mean and standard deviation


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


class Backend(_Choice):
    auto = "auto"
    torch = "torch"
    fused = "fused"


class Scheduler(_Choice):
    onecycle = "onecycle"
    step = "step"
    none = "none"


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
    mean: float = MEAN
    std: float = STD
    seed: int = 42
    # bf16 autocast for the training step (the convolutions and the linear layer compute in bf16,
    # and BatchNorm then takes and gives bf16 with fp32 statistics; the loss, the weights and
    # evaluation stay fp32); "auto" picks bf16 where the hardware computes it natively (CUDA,
    # CPUs with AVX512-BF16/AMX), else fp32
    precision: str = "auto"
    channels_last: bool = True
    # how the training step computes (mnistkit/backends): "torch" (PyTorch's own ops), "fused"
    # (BatchNorm -> ReLU pairs trained by mnistkit's C kernel; CPU, channels_last) or "auto"
    # (fused where the kernel builds and passes its self-test, else torch). The run records the
    # resolved one. No figure depends on it beyond rounding: the same network, the same step
    backend: str = "auto"
    # knowledge distillation (Hinton et al., 2015; mnistkit/training/distill.py): a teacher, a finished run's
    # folder or a change-log iteration (its best comparable run), whose softened outputs the model
    # also learns: (1 - alpha) * CE + alpha * T^2 * KL(teacher/T || model/T). "" is no teacher
    teacher: str = ""
    distill_alpha: float = 0.5
    distill_temperature: float = 4.0

    @property
    def step_options(self) -> dict[str, Any]:
        """What ``training.train_step`` takes of the recipe."""
        return {"label_smoothing": self.label_smoothing, "bf16": self.precision == "bf16",
                "channels_last": self.channels_last, "grad_clip": self.grad_clip}

    def __post_init__(self) -> None:
        for key, enum in (("scheduler", Scheduler), ("precision", Precision), ("backend", Backend)):
            object.__setattr__(self, key, check_choice(getattr(self, key), enum, key))
        _check("", [
            ("epochs", 1 <= self.epochs <= MAX_EPOCHS, f"must be a whole number from 1 to {MAX_EPOCHS:,}"),
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
            ("std", self.std > 0, "must be positive"),
            ("seed", 0 <= self.seed < 2**63, "must be a non-negative integer"),
            ("teacher", len(self.teacher) <= 4096 and "\n" not in self.teacher and "\0" not in self.teacher,
             "must be a run folder or an iteration's name"),
            ("distill_alpha", 0 <= self.distill_alpha <= 1, "must be in [0, 1] (the teacher's share of the loss)"),
            ("distill_temperature", 0 < self.distill_temperature <= 100, "must be in (0, 100]"),
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
            if name in REPLACED:
                detail = REPLACED[name]
                raise UsageError(f"{where}: {key} {detail}", key=key, detail=detail)
            if name not in fields:
                detail = f"unknown key; known keys: {', '.join(sorted(fields))}"
                raise UsageError(f"{where}: unknown key {key!r}; known keys: {', '.join(sorted(fields))}",
                                 key=key, detail=detail)
            default = fields[name].default
            if default is dataclasses.MISSING:  # nested dataclass
                out[name] = value
                continue
            expected = type(default)
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, expected) or (expected is not bool and isinstance(value, bool)):
                detail = f"must be {expected.__name__}, not {type(value).__name__} ({value!r})"
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

    def with_settings(self, settings: dict[str, Any]) -> "Recipe":
        """A copy with ``settings`` applied: recipe keys, and ``augment.KEY`` for one field of the
        augmentation (``None`` values are ignored: an option not given). Checked as the
        change-log's recipe is checked, types, ranges and their combinations (momentum_cycle
        against this recipe's momentum), in one line naming the key."""
        data = self.to_dict()
        for key, value in settings.items():
            if value is None:
                continue
            if isinstance(value, Enum):
                value = value.value
            if key.startswith("augment."):
                data["augment"][key[len("augment."):]] = value
            elif key == "augment" and isinstance(value, Augment):
                data["augment"] = dataclasses.asdict(value)
            elif key == "augment" and isinstance(value, dict):
                data["augment"] = {**data["augment"], **value}
            else:
                data[key] = value
        try:
            return Recipe.from_dict(data, where="recipe")
        except UsageError as exc:
            named = exc.key and exc.detail and not exc.detail.startswith("unknown key")
            raise UsageError(f"{exc.key} {exc.detail}" if named else str(exc), key=exc.key, detail=exc.detail) from None


def recorded_recipe(data: dict[str, Any], where: str) -> "Recipe":
    """A recipe as a run recorded it (config.yaml, a checkpoint). Runs of 0.8 and older recorded
    no backend (bn_relu, shards): mnistkit 0.11 is the last version that reads them."""
    if "backend" not in data:
        detail = ("was recorded by mnistkit 0.8 or older (its recipe has no backend); mnistkit 0.11 is the last "
                  "version that reads it: use 0.11 for it, or train it again")
        raise UsageError(f"{where} {detail}", key="backend", detail=detail)
    return Recipe.from_dict(data, where=where)


# recipe keys of earlier versions, and what took their place (a change-log, sweep spec or --set
# that still has one gets this line)
REPLACED = {
    "bn_relu": "was replaced by backend in 0.9 (auto, torch or fused); rename the key",
    "shards": "was removed in 0.9 (sharded steps are gone: they were no faster; see the README's Speed); delete the key",
    "optimizer": "was removed in 0.9 (it was never read: the optimizer is SGD); delete the key",
}


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
        unknown = sorted(str(k) for k in data if k not in known)
        if unknown:   # a typo (vall: 50) would otherwise train on data nobody asked for
            detail = f"unknown key {unknown[0]!r}; known keys: {', '.join(sorted(known))}"
            raise UsageError(f"{where}: {detail}", key=unknown[0], detail=detail)
        return cls(**data)
