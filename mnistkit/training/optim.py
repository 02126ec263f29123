"""What the trainer optimises with: SGD (with a faster start-up), the LR schedule, BatchNorm's
momentum, and an exponential moving average of the weights."""

from __future__ import annotations

import copy
import inspect
import math
from typing import Any

import torch
from torch import nn

from mnistkit.recipe import Recipe

__all__ = ["SGD", "build_optimizer", "build_scheduler", "set_bn_momentum", "WeightAverage"]


class SGD(torch.optim.SGD):
    """``torch.optim.SGD`` with the same update, state and state_dict, minus a second of start-up.

    torch wraps ``Optimizer.add_param_group``, ``zero_grad``, ``state_dict``, ``load_state_dict``
    (``torch._disable_dynamo``) and ``SGD.step`` (a ``torch._dynamo.graph_break`` around the update)
    for ``torch.compile``; each wrapper imports ``torch._dynamo`` on its first call, which took
    1.3 s of every training process here. mnistkit never compiles its optimizer, so this class
    calls the functions underneath (``inspect.unwrap``; where a torch release keeps no ``__wrapped__``,
    torch's own wrapped method is kept, which is only slower to start)."""

    # inspect.unwrap reaches the innermost function: a torch.optim.SGD made before this module
    # was imported has also wrapped SGD.step in its profiling hook (Optimizer._patch_step_function)
    add_param_group = inspect.unwrap(torch.optim.Optimizer.add_param_group)
    zero_grad = inspect.unwrap(torch.optim.Optimizer.zero_grad)
    state_dict = inspect.unwrap(torch.optim.Optimizer.state_dict)
    load_state_dict = inspect.unwrap(torch.optim.Optimizer.load_state_dict)
    _sgd_step = inspect.unwrap(torch.optim.SGD.step)

    def step(self, closure: Any = None) -> Any:
        with torch.no_grad():   # what the wrapper does for a non-differentiable optimizer
            return self._sgd_step(closure)


def set_bn_momentum(model: nn.Module, momentum: float) -> int:
    """Give every BatchNorm layer of ``model`` this running-statistics momentum; returns how many."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in layers:
        m.momentum = momentum
    return len(layers)


def build_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    return SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                           nesterov=recipe.nesterov and recipe.momentum > 0, weight_decay=recipe.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe, steps_per_epoch: int):
    """The LR schedule, stepped after every batch: OneCycleLR over the run's steps, or StepLR
    whose step_size epochs are counted in steps (the same LR in every step of an epoch)."""
    if recipe.scheduler == "onecycle":
        # OneCycleLR divides by its warm-up length: it needs pct_start * total_steps > 1. A very
        # short run gets the shortest schedule that works and stops before its end (see notes).
        total = max(recipe.epochs * steps_per_epoch, math.floor(1 / recipe.pct_start) + 1)
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=recipe.lr, total_steps=total,
            pct_start=recipe.pct_start, div_factor=recipe.div_factor, final_div_factor=recipe.final_div_factor,
            cycle_momentum=recipe.momentum_cycle > 0 and recipe.momentum > 0,
            # rounded so that the default 0.9 +- 0.05 gives exactly PyTorch's 0.85 and 0.95
            base_momentum=round(recipe.momentum - recipe.momentum_cycle, 12),
            max_momentum=round(recipe.momentum + recipe.momentum_cycle, 12),
        )
    if recipe.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=recipe.step_size * steps_per_epoch,
                                               gamma=recipe.gamma)
    return None


def per_step_schedule(state: Any, recipe: Recipe, steps_per_epoch: int) -> Any:
    """A resumable StepLR state as this version steps it: runs before 0.12 stepped StepLR once an
    epoch (their step_size counts epochs)."""
    if recipe.scheduler == "step" and isinstance(state, dict) and state.get("step_size") == recipe.step_size \
            and steps_per_epoch > 1 and isinstance(state.get("last_epoch"), int):
        return {**state, "step_size": recipe.step_size * steps_per_epoch,
                "last_epoch": state["last_epoch"] * steps_per_epoch}
    return state


class WeightAverage:
    """An exponential moving average of a model's weights and floating buffers (the BN
    statistics), updated after every optimisation step. Its decay ramps up as
    ``min(decay, (1 + t) / (10 + t))`` so that the first steps' random weights fade quickly."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        live, mine = model.state_dict(), self.model.state_dict()  # the same tensors, not copies
        pairs = [(mine[k], v) for k, v in live.items()]
        self._float = ([a for a, _ in pairs if a.is_floating_point()], [b for _, b in pairs if b.is_floating_point()])
        self._other = [(a, b) for a, b in pairs if not a.is_floating_point()]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Blend in the live weights after optimisation step ``step`` (counted from 0 over the run)."""
        decay = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self._float[0], self._float[1], 1.0 - decay)
        for mine, live in self._other:
            mine.copy_(live)
