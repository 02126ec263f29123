"""One training session: the model, data, optimizer, schedule and random state a fit needs, built
the same way for a new run and a resumed one; and what a resumable checkpoint holds of it."""

from __future__ import annotations

import contextlib
import math
import random
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mnistkit import backends
from mnistkit.data.batches import EvalBatches, TrainBatches
from mnistkit.data import load_splits, provenance
from mnistkit.training.distill import load_teacher
from mnistkit.training.device import resolve_device, resolve_precision, seed_everything, versions
from mnistkit.errors import MnistkitError, RunError, UsageError
from mnistkit.usermodels.modelref import ModelSource, build, redraw
from mnistkit.usermodels.usercode import user_code
from mnistkit.training.optim import WeightAverage, build_optimizer, build_scheduler, per_step_schedule, set_bn_momentum
from mnistkit.recipe import DataOptions, Recipe

__all__ = ["Session", "Diverged"]


class Diverged(MnistkitError):
    """The numbers stopped being finite; the trainer says what the run folder kept. A
    MnistkitError, so that a model of the user's own diverging is not taken for its code failing."""


@dataclass
class Session:
    source: ModelSource     # what is trained: a registered name, the user's file or architecture
    recipe: Recipe          # resolved: precision and backend as this machine runs them
    data: DataOptions
    device: torch.device
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    batches: TrainBatches
    test_batches: EvalBatches
    val_batches: EvalBatches | None
    generator: torch.Generator
    params: int
    measured_on: dict[str, Any]
    average: WeightAverage | None = None
    notes: list[str] = field(default_factory=list)
    teacher: Any = None     # distill.Teacher: the run whose outputs the model also learns
    kernels: dict[str, str] = field(default_factory=dict)   # the layers mnistkit's kernels train (backends)
    kernels_source: str | None = None   # and the digest of the source they were built from

    @classmethod
    def build(cls, source: ModelSource, recipe: Recipe, data: DataOptions, device: str,
              instance: nn.Module | None = None, teacher: Any = None) -> "Session":
        """``instance``: a model object made by the caller, trained in place, its weights drawn
        anew under the recipe's seed (``modelref.redraw``; ``source`` records where its class came from).
        ``teacher``: where the recipe's teacher is (``distill.TeacherRef``)."""
        dev = resolve_device(device)
        recipe = recipe.replace(precision=resolve_precision(recipe.precision, dev))
        seed_everything(recipe.seed)
        train_split, val_split, test_split = load_splits(data)
        model, notes = redraw(instance, source) if instance is not None else build(source, recipe.model_kwargs())
        source = source.with_architecture(model)   # what it computes: a run's identity (identity.py)
        model = model.to(dev)
        set_bn_momentum(model, recipe.bn_momentum)
        # channels_last only where the model runs in it (a `view` head does not): found out with
        # one step of a copy; the run records the layout it used, as it records what "auto" meant
        layout = backends.choose_layout(model, dev, recipe.channels_last, recipe.precision == "bf16",
                                        source.path)
        recipe = recipe.replace(channels_last=layout.channels_last)
        if recipe.channels_last:
            model = model.to(memory_format=torch.channels_last)
        prepared = backends.prepare(model, recipe.backend, dev, recipe.channels_last)
        recipe = recipe.replace(backend=prepared.backend)   # the run records what "auto" meant here
        generator = torch.Generator(device=dev).manual_seed(recipe.seed)
        batches = TrainBatches(train_split, recipe.batch_size, dev, recipe.augment, generator, recipe.mean, recipe.std)
        test_batches, val_batches = (
            EvalBatches(split, recipe.test_batch_size, dev, recipe.mean, recipe.std, channels_last=recipe.channels_last)
            if split is not None else None for split in (test_split, val_split))
        if not any(p.requires_grad for p in model.parameters()):
            raise UsageError(f"{source.name} has no trainable parameters: there is nothing to train")
        if recipe.teacher and teacher is None:
            raise UsageError("the recipe names a teacher, but none was found for it (distill.find_teacher)",
                             key="teacher")
        taught = load_teacher(teacher, recipe, data, dev, source) if recipe.teacher else None
        optimizer = build_optimizer(model, recipe)
        scheduler = build_scheduler(optimizer, recipe, len(batches))
        notes = [*notes, *([layout.note] if layout.note else []), prepared.note]
        if getattr(scheduler, "total_steps", 0) > recipe.epochs * len(batches):
            notes.append(f"this run has only {recipe.epochs * len(batches)} steps, fewer than OneCycleLR's warm-up "
                         f"needs: the schedule is stretched to {scheduler.total_steps} steps and the LR will not "
                         "finish annealing")
        if taught is not None:
            t = taught.record
            notes.append(f"teacher: {t['run']} ({t['model']}, epoch {t['epoch']}, test {t['test_acc']:.2f}%); loss "
                         f"(1 - {recipe.distill_alpha:g}) * CE + {recipe.distill_alpha:g} * T^2 * KL, "
                         f"T = {recipe.distill_temperature:g}")
        session = cls(source=source, recipe=recipe, data=data, device=dev, model=model, optimizer=optimizer,
                      scheduler=scheduler, batches=batches, test_batches=test_batches, val_batches=val_batches,
                      generator=generator, params=sum(p.numel() for p in model.parameters() if p.requires_grad),
                      measured_on=provenance(data, train_split, val_split, test_split),
                      average=WeightAverage(model, recipe.ema) if recipe.ema > 0 else None, notes=notes,
                      teacher=taught, kernels=prepared.kernels, kernels_source=prepared.kernels_source)
        return session

    @property
    def model_name(self) -> str:
        return self.source.name

    @property
    def eval_model(self) -> nn.Module:
        """What is evaluated, selected and saved: the moving average when the recipe keeps one."""
        return self.average.model if self.average else self.model

    def guard(self) -> Any:
        """Where the model runs: an exception of the user's own model is one line naming their file."""
        if self.source.kind == "registered":
            return contextlib.nullcontext()
        return user_code(self.source.path, f"training {self.model_name}")

    def meta(self) -> dict[str, Any]:
        """What config.yaml and every checkpoint record of the run."""
        text = {"model_text": self.source.text} if self.source.kind == "yaml" else {}   # data: rebuilt from here
        taught = {"teacher": self.teacher.record} if self.teacher else {}
        # which layers mnistkit's kernels trained, and which source they were built from
        kernels = {"kernels": self.kernels, "kernels_source": self.kernels_source} if self.kernels else {}
        return {"model": self.model_name, "model_source": self.source.to_record(), **text, "params": self.params,
                "recipe": self.recipe.to_dict(), **kernels, **taught, "data": self.data.to_dict(),
                "measured_on": self.measured_on,
                "versions": versions(), "threads": torch.get_num_threads()}   # results depend on it in the last digits

    def check_finite(self, epoch: int, test: Any, val: Any) -> None:
        """``Diverged`` unless the weights and the evaluated losses are finite."""
        if not all(bool(torch.isfinite(t).all()) for m in {self.model, self.eval_model}
                   for t in m.state_dict().values() if t.is_floating_point()):
            raise Diverged(f"the weights stopped being finite at epoch {epoch}")
        for name, result in (("test", test), ("validation", val)):
            if result is not None and not math.isfinite(result.loss):
                raise Diverged(f"the {name} loss became {result.loss} at epoch {epoch}")

    def resumable_state(self) -> dict[str, Any]:
        # with a moving average, "state_dict" (what evaluate, predict and export read) holds the
        # average and "train_state_dict" the weights that training continues from
        live = {"train_state_dict": self.model.state_dict()} if self.average else {}
        return {**live, "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler else None,
                "rng": {"python": random.getstate(), "torch": torch.get_rng_state(),
                        "data": self.generator.get_state()}}

    def restore(self, state: dict[str, Any]) -> None:
        try:
            if self.average:
                self.model.load_state_dict(state["train_state_dict"])
                self.average.model.load_state_dict(state["state_dict"])
            else:
                self.model.load_state_dict(state["state_dict"])
            self.optimizer.load_state_dict(state["optimizer"])
            if self.scheduler is not None:
                self.scheduler.load_state_dict(per_step_schedule(state["scheduler"], self.recipe, len(self.batches)))
            rng = state["rng"]
            random.setstate(rng["python"])
            torch.set_rng_state(rng["torch"])
            self.generator.set_state(rng["data"])
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
            reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
            raise RunError(f"last.pt cannot be resumed ({reason}); the run folder is damaged") from None
