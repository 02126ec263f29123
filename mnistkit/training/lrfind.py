"""The LR range test (Leslie Smith's, as fastai's ``lr_find`` runs it): a fresh copy of the model
trains for a bounded number of steps with the recipe's batch size, augmentation, precision,
optimizer, momentum and weight decay, while the LR rises exponentially from ``start_lr`` to
``end_lr``; the test stops early when the loss's running average exceeds ``diverge`` times its
lowest, or a loss is not finite. The suggestion for OneCycleLR's max_lr is a tenth of the LR at the
smoothed loss's minimum (``suggest``; docs/commands.md says why).

Nothing of the caller's is trained or written: a reference is built anew, a model object is
copied, no run folder is made. The session is built by ``Session.build`` (the data, the model's
layout and backend, the optimizer, as ``train`` builds them) and every step is ``train_step``.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from mnistkit.errors import UsageError
from mnistkit.recipe import DataOptions, Recipe

__all__ = ["lr_find", "LRFind", "LRPoint", "Suggestion", "Curve", "smooth", "smooth_centered", "suggest", "lr_schedule",
           "RULE", "check_options", "DEFAULT_STEPS", "DEFAULT_START", "DEFAULT_END", "DEFAULT_DIVERGE",
           "DEFAULT_BETA"]

DEFAULT_STEPS = 200      # 40 steps a decade over 1e-4..10: less than half an epoch of MNIST at batch 128
DEFAULT_START = 1e-4     # SGD with momentum moves nothing below this in 200 steps
DEFAULT_END = 10.0
DEFAULT_DIVERGE = 4.0    # stop when the running average of the loss is 4x its lowest (fastai's rule)
DEFAULT_BETA = 0.9       # the smoothing's memory: about 10 steps, a quarter of a decade
MAX_STEPS = 10_000
RULE = "min/10"
RULE_TEXT = "a tenth of the LR where the smoothed loss is lowest"


@dataclass(frozen=True)
class LRPoint:
    step: int          # from 1
    lr: float
    loss: float        # this step's training loss (before the step's update)
    smoothed: float    # the losses smoothed both ways (``smooth_centered``; the progress display: the running average)


@dataclass(frozen=True)
class Suggestion:
    """What ``suggest`` makes of a curve: ``lr`` (``None`` when the curve gives none, ``note``
    says why), the rule, and the LR and step of the smoothed minimum it came from."""

    lr: float | None
    rule: str = RULE
    min_loss_lr: float | None = None
    min_step: int | None = None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"lr": self.lr, "rule": self.rule, "rule_text": RULE_TEXT, "min_loss_lr": self.min_loss_lr,
                "min_step": self.min_step, "note": self.note}


@dataclass
class LRFind:
    model: str
    params: int
    device: str
    recipe: Recipe                 # as it ran: precision, backend and layout resolved
    measured_on: dict[str, Any]
    points: list[LRPoint]
    suggestion: Suggestion
    steps: int                     # asked for
    start_lr: float
    end_lr: float
    momentum: float                # constant through the test: OneCycleLR's at its peak LR
    stopped: str                   # why the test ended before its last step ("" when it did not)
    seconds: float
    threads: int
    beta: float = DEFAULT_BETA
    skip: int = 0                  # the first steps, left out of the minimum and of the stop rule
    images: int = 0                # training images the steps drew (with repeats where the set is smaller)
    notes: list[str] = field(default_factory=list)

    def recipe_line(self, recipe: dict[str, Any] | None = None, settings: dict[str, Any] | None = None) -> str | None:
        """The change-log line that trains with the suggestion: ``recipe: {lr: 0.12}``; given the
        iteration's own ``recipe`` mapping and the ``settings`` the test ran with (``augment.KEY``
        too), that mapping with them and the suggested lr. Never written anywhere."""
        if self.suggestion.lr is None:
            return None
        import yaml

        mapping = dict(recipe or {})
        for key, value in {**(settings or {}), "lr": self.suggestion.lr}.items():
            if key.startswith("augment."):
                augment = mapping.get("augment")
                mapping["augment"] = {**(augment if isinstance(augment, dict) else {}), key[len("augment."):]: value}
            elif value is not None:
                mapping[key] = value
        return "recipe: " + yaml.safe_dump(mapping, default_flow_style=True, sort_keys=False, width=10_000).strip()

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "params": self.params, "device": self.device, "threads": self.threads,
                "measured_on": self.measured_on, "recipe": self.recipe.to_dict(),
                "test": {"steps": self.steps, "steps_done": len(self.points), "start_lr": self.start_lr,
                         "end_lr": self.end_lr, "momentum": self.momentum, "smoothing_beta": self.beta,
                         "skipped_steps": self.skip, "images": self.images, "stopped": self.stopped},
                "suggestion": self.suggestion.to_dict(), "recipe_line": self.recipe_line(),
                "current_lr": self.recipe.lr, "seconds": round(self.seconds, 2), "notes": list(self.notes),
                "curve": [{"step": p.step, "lr": p.lr, "loss": p.loss, "smoothed": p.smoothed} for p in self.points]}


def lr_schedule(start_lr: float, end_lr: float, steps: int) -> list[float]:
    """``steps`` LRs rising exponentially from ``start_lr`` to ``end_lr`` (both included)."""
    if steps == 1:
        return [start_lr]
    ratio = end_lr / start_lr
    return [start_lr * ratio ** (i / (steps - 1)) for i in range(steps)]


def smooth(losses: Sequence[float], beta: float = DEFAULT_BETA) -> list[float]:
    """The running average the stop rule reads: a debiased exponential moving average (Adam's
    bias correction: the first value is the first loss, not a tenth of it). It only looks back,
    so it lags the losses by about ``beta / (1 - beta)`` steps."""
    avg, out = 0.0, []
    for i, loss in enumerate(losses, 1):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta ** i))
    return out


def smooth_centered(losses: Sequence[float], beta: float = DEFAULT_BETA) -> list[float]:
    """The curve drawn and read for the suggestion: the mean of the running average forward and
    the running average backward (from the last step), so that it does not lag: its minimum
    sits where the losses' valley is, not ``beta / (1 - beta)`` steps (a quarter of a decade
    of LR by default) after it."""
    forward, backward = smooth(losses, beta), smooth(losses[::-1], beta)[::-1]
    return [(f + b) / 2 for f, b in zip(forward, backward)]


def skipped(steps: int) -> int:
    """How many first steps the minimum and the stop rule ignore: the smoothing has seen too few
    losses there (one batch's loss can spike)."""
    return max(3, steps // 20)


def suggest(lrs: Sequence[float], smoothed: Sequence[float], skip: int = 0, stopped: bool = True) -> Suggestion:
    """OneCycleLR's max_lr from a smoothed curve: a tenth of the LR at its minimum over the steps
    after the first ``skip``. A spike at the start only raises the loss, so it cannot be the
    minimum (and ``skip`` keeps it from stopping the test). ``stopped``: whether the test ended
    by divergence (if not, and the minimum is the last point, the loss was still falling: a note
    says so)."""
    n = len(smoothed)
    if len(lrs) != n:
        raise ValueError("lrs and smoothed differ in length")
    first = min(skip, max(n - 1, 0))
    tail = [(smoothed[i], i) for i in range(first, n) if math.isfinite(smoothed[i])]
    if len(tail) < 2:
        return Suggestion(None, note=f"only {n} step{'s' * (n != 1)}: too few to read a curve from; give more steps")
    _, i_min = min(tail)
    if i_min == first:
        return Suggestion(None, min_loss_lr=lrs[i_min], min_step=i_min + 1,
                          note="the smoothed loss never fell below its value at the start: start lower (start_lr), "
                               "or check that the model learns")
    note = ""
    if i_min == n - 1 and not stopped:
        note = "the loss was still falling at the last LR: the minimum may lie beyond it; raise end_lr"
    return Suggestion(float(f"{lrs[i_min] / 10:.2g}"), min_loss_lr=lrs[i_min], min_step=i_min + 1, note=note)


class Curve:
    """The test's bookkeeping, apart from training (so that a hand-made sequence of losses can
    be fed to it). ``add`` returns why the test stops ("" to go on): a loss that is not finite,
    or, after the first ``skip`` steps, the running average (``smooth``: it can only look back)
    above ``diverge`` times its lowest since then. ``points()``: the curve, smoothed both ways."""

    def __init__(self, beta: float = DEFAULT_BETA, diverge: float = DEFAULT_DIVERGE, skip: int = 0) -> None:
        self.beta, self.diverge, self.skip = beta, diverge, skip
        self.lrs: list[float] = []
        self.losses: list[float] = []
        self.running: list[float] = []
        self._avg, self._best = 0.0, math.inf

    def add(self, lr: float, loss: float) -> str:
        step = len(self.losses) + 1
        if not math.isfinite(loss):
            return f"the loss became {loss} at step {step} (LR {lr:.3g})"
        self._avg = self.beta * self._avg + (1 - self.beta) * loss
        self.lrs.append(lr)
        self.losses.append(loss)
        self.running.append(self._avg / (1 - self.beta ** step))
        if step > self.skip:
            self._best = min(self._best, self.running[-1])
            if self.running[-1] > self.diverge * self._best:
                return (f"the loss's running average reached {self.running[-1]:.3g}, over {self.diverge:g}x its "
                        f"lowest {self._best:.3g}, at step {step} (LR {lr:.3g})")
        return ""

    def points(self) -> list[LRPoint]:
        centered = smooth_centered(self.losses, self.beta)
        return [LRPoint(i, lr, loss, sm) for i, (lr, loss, sm) in enumerate(zip(self.lrs, self.losses, centered), 1)]


def peak_momentum(recipe: Recipe) -> float:
    """The momentum OneCycleLR gives at its peak LR (the LR this test looks for); a recipe
    without a cycle keeps its momentum."""
    if recipe.scheduler == "onecycle" and recipe.momentum > 0 and recipe.momentum_cycle > 0:
        return round(recipe.momentum - recipe.momentum_cycle, 12)
    return recipe.momentum


def lr_find(model: Any, recipe: Recipe | None = None, data: DataOptions | None = None, device: str = "auto",
            steps: int = DEFAULT_STEPS, start_lr: float = DEFAULT_START, end_lr: float = DEFAULT_END,
            diverge: float = DEFAULT_DIVERGE, beta: float = DEFAULT_BETA, model_args: dict[str, Any] | None = None,
            on_step: Callable[[LRPoint, int], None] | None = None) -> LRFind:
    """The LR range test of ``model`` (a reference: ``"I3"``, ``"S1"``, ``"mynet.py:Net"``,
    ``"s1.yaml"``, with ``model_args``; a ``ModelSource``; or a model object, which is copied:
    the object is never trained) with ``recipe`` (default: ``Recipe()``; an iteration's is
    ``resolve_recipe("I3")``) on ``data``. ``on_step(point, steps)`` is told of every step.
    Writes nothing."""
    import torch
    from torch import nn

    from mnistkit.usermodels.modelref import from_instance, resolve
    from mnistkit.training.session import Session
    from mnistkit.training.loop import train_step

    check_options(steps, start_lr, end_lr, diverge, beta)
    recipe = recipe or Recipe()
    instance = copy.deepcopy(model) if isinstance(model, nn.Module) else None   # the caller's object stays as it is
    source = from_instance(model) if instance is not None else resolve(model, args=model_args)
    # the optimizer as train builds it; the LR and momentum are set here every step, so no schedule
    # (nor a moving average, which the test never reads) is built; a teacher is left out: the test
    # measures the model's own loss (its note says so)
    s = Session.build(source, recipe.replace(scheduler="none", ema=0.0, teacher=""), data or DataOptions(), device,
                      instance)
    if recipe.teacher:
        s.notes.append(f"the recipe's teacher ({recipe.teacher}) is left out: the test follows the cross-entropy alone")
    ran = s.recipe.replace(scheduler=recipe.scheduler, ema=recipe.ema, teacher=recipe.teacher)
    momentum = peak_momentum(recipe)
    lrs = lr_schedule(start_lr, end_lr, steps)
    curve = Curve(beta, diverge, skipped(steps))
    stopped, images = "", 0
    t0 = time.perf_counter()
    s.model.train()

    def batches():
        while True:
            yield from s.batches

    with s.guard():
        for i, (lr, (x, y)) in enumerate(zip(lrs, batches()), 1):   # the LRs first: no batch drawn after the last
            for group in s.optimizer.param_groups:
                group["lr"] = lr
                if "momentum" in group:
                    group["momentum"] = momentum
            loss, _ = train_step(s.model, x, y, s.optimizer, **ran.step_options)
            images += len(y)
            stopped = curve.add(lr, float(loss))
            if on_step and len(curve.losses) == i:
                on_step(LRPoint(i, lr, curve.losses[-1], curve.running[-1]), steps)
            if stopped:
                break
    seconds = time.perf_counter() - t0
    points = curve.points()
    suggestion = suggest([p.lr for p in points], [p.smoothed for p in points], curve.skip, stopped=bool(stopped))
    return LRFind(s.model_name, s.params, str(s.device), ran, s.measured_on, points, suggestion, steps, start_lr,
                  end_lr, momentum, stopped, seconds, torch.get_num_threads(), beta, curve.skip, images,
                  [n for n in s.notes if n])


def check_options(steps: int, start_lr: float, end_lr: float, diverge: float = DEFAULT_DIVERGE,
                  beta: float = DEFAULT_BETA) -> None:
    """The test's own settings, checked before anything is loaded or built."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not 2 <= steps <= MAX_STEPS:
        raise UsageError(f"steps must be a whole number from 2 to {MAX_STEPS:,}, not {steps!r}", key="steps")
    for key, value in (("start_lr", start_lr), ("end_lr", end_lr)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise UsageError(f"{key} must be a positive number, not {value!r}", key=key)
    if end_lr <= start_lr:
        raise UsageError(f"end_lr ({end_lr:g}) must be above start_lr ({start_lr:g}): the LR rises", key="end_lr")
    if not (isinstance(diverge, (int, float)) and math.isfinite(diverge) and diverge > 1):
        raise UsageError(f"diverge must be a number above 1, not {diverge!r}", key="diverge")
    if not (isinstance(beta, (int, float)) and 0 <= beta < 1):
        raise UsageError(f"beta must be in [0, 1), not {beta!r}", key="beta")
