"""The trainer: ``train`` starts a run, ``resume`` continues one; both go through one fit loop
and one ``train_one_epoch``. The run folder is written by ``runs.RunWriter``, which also owns
"best"; evaluation lives in ``evaluation``; settings in ``recipe``."""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import math
import random
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from mnistkit.data import EvalBatches, TrainBatches, load_splits, provenance
from mnistkit.device import (keep_freed_memory, release_memory, resolve_bn_relu, resolve_device, resolve_precision,
                             resolve_shards, seed_everything, versions, why_not_sharded)
from mnistkit.fused import use_fused
from mnistkit.parallel import ShardedStep, step_threads
from mnistkit.errors import RunError, TrainingDiverged, TrainingInterrupted, UsageError
from mnistkit.evaluation import evaluate
from mnistkit.models import get_model, model_info
from mnistkit.recipe import DEFAULT_RUNS_DIR, DataOptions, Recipe
from mnistkit.runs import (EpochMetrics, RunWriter, Terminated, check_resumable, load_checkpoint, read_config,
                           selected_on, sigterm_as_interrupt, write_outcome)

__all__ = ["train", "resume", "train_one_epoch", "train_step", "WeightAverage", "RunResult", "RunStart", "StepInfo",
           "Callback", "SGD", "build_optimizer", "build_scheduler"]

SYNC_SECONDS = 0.5  # between host syncs for the progress display (and the NaN check)


@dataclass(frozen=True)
class RunStart:
    """What a callback learns when a run starts (or resumes)."""

    run_dir: Path
    model: str
    params: int
    device: str
    epochs: int
    start_epoch: int
    steps: int
    train_samples: int
    val_samples: int
    test_samples: int
    recipe: Recipe
    data: DataOptions
    best: EpochMetrics | None = None  # the best epoch so far (resuming)
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class StepInfo:
    """Progress inside an epoch: running means over the epoch so far."""

    epoch: int
    step: int
    steps: int
    loss: float
    acc: float
    lr: float
    images: int


class Callback(Protocol):
    def on_start(self, start: RunStart) -> None: ...
    def on_step(self, step: StepInfo) -> None: ...
    def on_epoch(self, row: EpochMetrics, best: bool) -> None: ...


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
    """Returns (scheduler, per_step): OneCycleLR steps every batch, StepLR every epoch."""
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
        ), True
    if recipe.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=recipe.step_size, gamma=recipe.gamma), False
    return None, False


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer,
               scheduler: Any = None, label_smoothing: float = 0.0, bf16: bool = False,
               channels_last: bool = False, grad_clip: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step; returns (loss, correct) as device tensors: no host sync here."""
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        out = model(x)
        loss = F.cross_entropy(out, y, label_smoothing=label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip, foreach=True)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return loss.detach(), (out.detach().argmax(1) == y).sum()


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


@dataclass
class _Session:
    """Everything one fit needs, built the same way for a new run and a resumed one."""

    model_name: str
    recipe: Recipe
    data: DataOptions
    device: torch.device
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    per_step: bool
    batches: TrainBatches
    test_batches: EvalBatches
    val_batches: EvalBatches | None
    generator: torch.Generator
    params: int
    measured_on: dict[str, Any]
    average: WeightAverage | None = None
    notes: list[str] = field(default_factory=list)
    stepper: Any = None  # a parallel.ShardedStep when the recipe has shards > 1

    @property
    def eval_model(self) -> nn.Module:
        """What is evaluated, selected and saved: the moving average when the recipe keeps one."""
        return self.average.model if self.average else self.model

    def finite_weights(self) -> bool:
        return all(bool(torch.isfinite(t).all()) for m in {self.model, self.eval_model}
                   for t in m.state_dict().values() if t.is_floating_point())

    def resumable_state(self) -> dict[str, Any]:
        # with a moving average, "state_dict" (what evaluate, predict and export read) holds the
        # average and "train_state_dict" the weights that training continues from
        live = {"train_state_dict": self.model.state_dict()} if self.average else {}
        shards = {"shards": self.stepper.rng_state()} if self.stepper else {}
        return {**live, "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler else None,
                "rng": {"python": random.getstate(), "torch": torch.get_rng_state(),
                        "data": self.generator.get_state(), **shards}}

    def restore(self, state: dict[str, Any]) -> None:
        try:
            if self.average:
                self.model.load_state_dict(state["train_state_dict"])
                self.average.model.load_state_dict(state["state_dict"])
            else:
                self.model.load_state_dict(state["state_dict"])
            self.optimizer.load_state_dict(state["optimizer"])
            if self.scheduler is not None:
                self.scheduler.load_state_dict(state["scheduler"])
            rng = state["rng"]
            random.setstate(rng["python"])
            torch.set_rng_state(rng["torch"])
            self.generator.set_state(rng["data"])
            if self.stepper:
                self.stepper.set_rng_state(rng["shards"])
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
            reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
            raise RunError(f"last.pt cannot be resumed ({reason}); the run folder is damaged") from None


def _session(model_name: str, recipe: Recipe, data: DataOptions, device: str) -> _Session:
    dev = resolve_device(device)
    keep_freed_memory()   # no results change: each step's buffers are reused instead of faulted in anew
    # the run records what "auto" meant on this machine (a resolved value resolves to itself)
    asked = recipe.bn_relu
    shards = resolve_shards(recipe.shards, dev, recipe.channels_last)
    recipe = recipe.replace(precision=resolve_precision(recipe.precision, dev), shards=shards,
                            bn_relu="fused" if shards > 1 else resolve_bn_relu(recipe.bn_relu, dev,
                                                                              recipe.channels_last))
    seed_everything(recipe.seed)
    train_split, val_split, test_split = load_splits(data, recipe.seed)
    model = get_model(model_name, **recipe.model_kwargs()).to(dev)
    set_bn_momentum(model, recipe.bn_momentum)
    if recipe.channels_last:
        model = model.to(memory_format=torch.channels_last)
    use_fused(model, recipe.bn_relu == "fused")
    generator = torch.Generator(device=dev).manual_seed(recipe.seed)
    batches = TrainBatches(train_split, recipe.batch_size, dev, recipe.augment, generator, recipe.mean, recipe.std)
    test_batches, val_batches = (
        EvalBatches(split, recipe.test_batch_size, dev, recipe.mean, recipe.std, channels_last=recipe.channels_last)
        if split is not None else None for split in (test_split, val_split))
    stepper = None
    if recipe.shards > 1:
        stepper = ShardedStep(model, recipe.shards, recipe.seed, max(1, torch.get_num_threads() // recipe.shards))
    optimizer = build_optimizer(model, recipe)
    scheduler, per_step = build_scheduler(optimizer, recipe, len(batches))
    session = _Session(model_name, recipe, data, dev, model, optimizer, scheduler, per_step, batches, test_batches,
                       val_batches, generator, sum(p.numel() for p in model.parameters() if p.requires_grad),
                       provenance(data, train_split, val_split, test_split),
                       WeightAverage(model, recipe.ema) if recipe.ema > 0 else None, stepper=stepper)
    if stepper is not None:
        session.notes.append(f"each batch is split into {recipe.shards} shards trained by {recipe.shards} threads "
                             f"({stepper.threads} intra-op thread(s) each); BatchNorm + ReLU train with the fused "
                             "kernel, with the whole batch's statistics")
    if asked == "auto" and recipe.bn_relu == "torch" and dev.type == "cpu" and recipe.channels_last:
        from mnistkit import fused

        session.notes.append(f"BatchNorm + ReLU train with PyTorch's ops, not the fused kernel: "
                             f"{fused.status().removeprefix('PyTorch (').removesuffix(')')}")
    if per_step and scheduler.total_steps > recipe.epochs * len(batches):
        session.notes.append(f"this run has only {recipe.epochs * len(batches)} steps, fewer than OneCycleLR's "
                             f"warm-up needs: the schedule is stretched to {scheduler.total_steps} steps and the "
                             "LR will not finish annealing")
    return session


def train_one_epoch(s: _Session, epoch: int, callback: Callback | None = None) -> tuple[float, float, int]:
    """One pass over the training set; returns (mean loss, accuracy in percent, images seen)."""
    last_sync = time.perf_counter()
    loss_sum = torch.zeros((), device=s.device)
    correct = torch.zeros((), device=s.device, dtype=torch.long)
    seen, steps = 0, len(s.batches)
    step_fn = s.stepper or functools.partial(train_step, s.model)
    # a sharded step's threads each take their share of the cores (evaluation keeps them all)
    with step_threads(s.stepper.threads) if s.stepper else contextlib.nullcontext():
        for step, (x, y) in enumerate(s.batches, 1):
            loss, hits = step_fn(x, y, s.optimizer, s.scheduler if s.per_step else None,
                                 s.recipe.label_smoothing, s.recipe.precision == "bf16", s.recipe.channels_last,
                                 s.recipe.grad_clip)
            if s.average:
                s.average.update((epoch - 1) * steps + step - 1)
            loss_sum += loss * len(y)
            correct += hits
            seen += len(y)
            if step == steps or time.perf_counter() - last_sync >= SYNC_SECONDS:
                last_sync = time.perf_counter()
                mean_loss = float(loss_sum) / seen
                if not math.isfinite(mean_loss):
                    raise _Diverged(f"the training loss became {mean_loss} at epoch {epoch}, step {step}")
                if callback:
                    callback.on_step(StepInfo(epoch, step, steps, mean_loss, 100.0 * int(correct) / seen,
                                              s.optimizer.param_groups[0]["lr"], seen))
    return float(loss_sum) / seen, 100.0 * int(correct) / seen, seen


class _Diverged(Exception):
    pass


def _kept(writer: RunWriter) -> str:
    """What a diverged run leaves: only finite epochs are ever committed."""
    if writer.epoch == 0:
        return (f"no epoch finished with finite numbers, so the run has no trained checkpoint "
                f"({writer.run_dir / 'last.pt'} holds the untrained initial weights)")
    return (f"{writer.run_dir / 'last.pt'} holds epoch {writer.epoch}, the last with finite weights "
            f"(best.pt: epoch {writer.best.epoch})")


@dataclass
class RunResult:
    run_dir: Path
    model: str
    params: int
    epochs: int
    metrics: list[EpochMetrics]
    best: EpochMetrics
    seconds: float
    device: str

    seed: int = 0
    measured_on: dict[str, Any] = field(default_factory=dict)

    @property
    def selected_on(self) -> str:
        return selected_on(self.metrics)

    def to_dict(self) -> dict[str, Any]:
        final = self.metrics[-1]
        return {
            "run_dir": str(self.run_dir), "model": self.model, "params": self.params, "epochs": self.epochs,
            "seed": self.seed, "device": self.device, "measured_on": self.measured_on,
            "best_selected_on": self.selected_on, "best_epoch": self.best.epoch,
            "best_test_acc": self.best.test_acc, "best_val_acc": self.best.val_acc,
            "final_test_acc": final.test_acc, "final_train_acc": final.train_acc, "final_val_acc": final.val_acc,
            "final_test_loss": final.test_loss, "last3_test_acc": [r.test_acc for r in self.metrics[-3:]],
            "seconds": round(self.seconds, 2),
        }


def _fit(s: _Session, writer: RunWriter, callback: Callback | None) -> RunResult:
    start_epoch, recipe = writer.epoch, s.recipe
    if callback:
        m = s.measured_on
        callback.on_start(RunStart(writer.run_dir, s.model_name, s.params, str(s.device), recipe.epochs, start_epoch,
                                   len(s.batches), m["train_samples"], m["val_samples"], m["test_samples"], recipe,
                                   s.data, writer.best, tuple(s.notes)))
    t_run = time.perf_counter()
    seconds_before = sum(r.seconds for r in writer.metrics)
    s.model.train()
    try:
        with sigterm_as_interrupt():
            _epochs(s, writer, callback, start_epoch)
    except KeyboardInterrupt as exc:
        what, code = ("terminated (SIGTERM)", 143) if isinstance(exc, Terminated) else ("interrupted", 130)
        error = TrainingInterrupted(
            f"{what}; {writer.run_dir / 'last.pt'} holds the state after epoch {writer.epoch} of "
            f"{recipe.epochs}. Resume with: mnistkit train --resume {shlex.quote(str(writer.run_dir))}")
        error.exit_code = code
        raise error from None
    finally:
        if s.stepper is not None:
            s.stepper.close()
    return RunResult(writer.run_dir, s.model_name, s.params, recipe.epochs, writer.metrics, writer.best,
                     seconds_before + time.perf_counter() - t_run, str(s.device), recipe.seed, s.measured_on)


def _epochs(s: _Session, writer: RunWriter, callback: Callback | None, start_epoch: int) -> None:
    recipe = s.recipe
    for epoch in range(start_epoch + 1, recipe.epochs + 1):
        t0 = time.perf_counter()
        try:
            train_loss, train_acc, seen = train_one_epoch(s, epoch, callback)
            lr = s.optimizer.param_groups[0]["lr"]
            if s.scheduler is not None and not s.per_step:
                s.scheduler.step()
            train_seconds = time.perf_counter() - t0
            test = evaluate(s.eval_model, s.test_batches, recipe.label_smoothing)
            val = evaluate(s.eval_model, s.val_batches, recipe.label_smoothing) if s.val_batches else None
            if not s.finite_weights():
                raise _Diverged(f"the weights stopped being finite at epoch {epoch}")
            for name, result in (("test", test), ("validation", val)):
                if result is not None and not math.isfinite(result.loss):
                    raise _Diverged(f"the {name} loss became {result.loss} at epoch {epoch}")
        except _Diverged as exc:
            with contextlib.suppress(OSError):  # so that `mnistkit runs` can say so
                write_outcome(writer.run_dir, "diverged", epoch, str(exc))
            raise TrainingDiverged(f"{exc}: the learning rate ({recipe.lr:g}) is likely too high, try "
                                   f"lr {recipe.lr / 10:g}; {_kept(writer)}") from None
        row = EpochMetrics(epoch, train_loss, train_acc, test.loss, test.acc, lr,
                           round(time.perf_counter() - t0, 3), round(seen / train_seconds, 1),
                           val.loss if val else None, val.acc if val else None)
        try:
            best = writer.commit(row, s.eval_model.state_dict(), s.resumable_state())
        except OSError as exc:
            raise RunError(
                f"cannot write the results of epoch {epoch} in {writer.run_dir} ({exc.strerror or exc}); "
                f"the folder still holds epoch {writer.epoch} whole: make room, then resume with: "
                f"mnistkit train --resume {shlex.quote(str(writer.run_dir))}") from None
        if callback:
            callback.on_epoch(row, best)


def train(model_name: str, recipe: Recipe | None = None, data: DataOptions | None = None, device: str = "auto",
          runs_dir: str | Path = DEFAULT_RUNS_DIR, callback: Callback | None = None,
          run_name: str | None = None) -> RunResult:
    """Train a registered model with ``recipe`` (default: ``Recipe()``) on ``data`` (default:
    MNIST), writing a new run folder under ``runs_dir`` (named ``run_name`` when given)."""
    model_name = model_info(model_name).name
    s = _session(model_name, recipe or Recipe(), data or DataOptions(), device)
    meta = {"model": model_name, "params": s.params, "recipe": s.recipe.to_dict(), "data": s.data.to_dict(),
            "measured_on": s.measured_on, "versions": versions()}
    writer = RunWriter.create(runs_dir, meta, {**meta, "device": str(s.device)},
                              {"state_dict": s.eval_model.state_dict(), **s.resumable_state()}, run_name)
    try:
        return _fit(s, writer, callback)
    finally:
        s = None   # noqa: F841 - the session's tensors freed, then the kept memory given back
        release_memory()


def resume(run_dir: str | Path, device: str = "auto", callback: Callback | None = None) -> RunResult:
    """Continue an interrupted run from its folder, with its own recipe and data; the result is
    the same as an uninterrupted run's."""
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    model_name = model_info(config.model).name
    last = run_dir / "last.pt"
    state = load_checkpoint(last)
    check_resumable(state, last)
    if state["model"] != model_name:
        raise RunError(f"{last} holds model {state['model']!r}, the run is {model_name!r}; the run folder is damaged")
    shards = config.recipe.shards
    if isinstance(shards, int) and shards > 1:   # the run's own step: resume cannot change it
        why = why_not_sharded(resolve_device(device), config.recipe.channels_last)
        if why is not None:
            raise UsageError(f"{run_dir} was trained with {shards} shards per step and resumes only with them, "
                             f"and a sharded step {why.removeprefix('it ')}; resume it where they run "
                             f"(for the kernel: a C compiler), or start a new run with --shards 1", key="shards")
    s = _session(model_name, config.recipe, config.data, device)
    metrics = [EpochMetrics.from_dict(r, where=f"{last} metrics") for r in state["metrics"]]
    s.restore(state)
    meta = {"model": model_name, "params": s.params, "recipe": s.recipe.to_dict(), "data": s.data.to_dict(),
            "measured_on": s.measured_on, "versions": versions()}
    try:
        return _fit(s, RunWriter(run_dir, meta, metrics), callback)
    finally:
        s = None   # noqa: F841 - as in train
        release_memory()
