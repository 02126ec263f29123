"""The trainer: ``train`` starts a run, ``resume`` continues one; both go through one fit loop
and one ``train_one_epoch``. The run folder is written by ``runs.RunWriter``, which also owns
"best"; the model, optimizer and data are built by ``session``, which asks ``backends`` to prepare
the model; evaluation lives in ``evaluation``; settings in ``recipe``."""

from __future__ import annotations

import contextlib
import math
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from mnistkit.errors import (ModelCodeError, RunError, TrainingDiverged, TrainingInterrupted, TrainingTerminated,
                             UsageError)
from mnistkit.training.distill import TeacherRef, find_teacher
from mnistkit.training.evaluation import evaluate
from mnistkit.runs.lock import FolderLock
from mnistkit.usermodels.modelref import ModelSource, from_instance, resolve
from mnistkit.usermodels.rebuild import check_identity, from_record
from mnistkit.recipe import DEFAULT_RUNS_DIR, DataOptions, Recipe
from mnistkit.runs.checkpoint import check_resumable, load_checkpoint
from mnistkit.runs.metrics import EpochMetrics, StepLosses, selected_on
from mnistkit.runs import RunWriter, Terminated, read_config, sigterm_as_interrupt, write_outcome
from mnistkit.training.device import threads
from mnistkit.training.session import Diverged, Session

__all__ = ["train", "resume", "train_one_epoch", "train_step", "RunResult", "RunStart", "StepInfo", "Callback"]

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


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer, *,
               scheduler: Any = None, teacher: Any = None, label_smoothing: float = 0.0, bf16: bool = False,
               channels_last: bool = False, grad_clip: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step; returns (loss, correct) as device tensors: no host sync here.
    The options are a recipe's (``Recipe.step_options``); a ``teacher`` (``distill.Teacher``) adds
    the distillation term on the same batch."""
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        out = model(x)
        loss = (F.cross_entropy(out, y, label_smoothing=label_smoothing) if teacher is None
                else teacher.loss(out, x, y, label_smoothing))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip, foreach=True)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return loss.detach(), (out.detach().argmax(1) == y).sum()


def train_one_epoch(s: Session, epoch: int, callback: Callback | None = None,
                    trace: StepLosses | None = None) -> tuple[float, float, int, float]:
    """One pass over the training set; returns (mean loss, accuracy in percent, images seen, the
    LR of its last step). The schedule steps with every batch (``optim.build_scheduler``)."""
    last_sync = time.perf_counter()
    loss_sum = torch.zeros((), device=s.device)
    correct = torch.zeros((), device=s.device, dtype=torch.long)
    seen, steps = 0, len(s.batches)
    for step, (x, y) in enumerate(s.batches, 1):
        lr = s.optimizer.param_groups[0]["lr"]
        loss, hits = train_step(s.model, x, y, s.optimizer, scheduler=s.scheduler, teacher=s.teacher,
                                **s.recipe.step_options)
        if s.average:
            s.average.update((epoch - 1) * steps + step - 1)
        loss_sum += loss * len(y)
        correct += hits
        seen += len(y)
        if trace is not None:   # the step losses the run records (metrics.StepLosses: no host sync)
            trace.add(step, loss_sum, seen)
        if step == steps or time.perf_counter() - last_sync >= SYNC_SECONDS:   # a host sync, twice a second
            last_sync = time.perf_counter()
            mean_loss = float(loss_sum) / seen
            if not math.isfinite(mean_loss):
                raise Diverged(f"the training loss became {mean_loss} at epoch {epoch}, step {step}")
            if callback:
                callback.on_step(StepInfo(epoch, step, steps, mean_loss, 100.0 * int(correct) / seen, lr, seen))
    return float(loss_sum) / seen, 100.0 * int(correct) / seen, seen, lr


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


def _fit(s: Session, writer: RunWriter, callback: Callback | None) -> RunResult:
    """The epoch loop: train, evaluate, commit. Every way it can stop is said once, in ``_translated``."""
    recipe, t_run = s.recipe, time.perf_counter()
    seconds_before = sum(r.seconds for r in writer.metrics)
    if callback:
        m = s.measured_on
        callback.on_start(RunStart(writer.run_dir, s.model_name, s.params, str(s.device), recipe.epochs, writer.epoch,
                                   len(s.batches), m["train_samples"], m["val_samples"], m["test_samples"], recipe,
                                   s.data, writer.best, tuple(s.notes)))
    s.model.train()
    with _translated(s, writer, callback):
        for epoch in range(writer.epoch + 1, recipe.epochs + 1):
            t0 = time.perf_counter()
            trace = StepLosses(len(s.batches))
            train_loss, train_acc, seen, lr = train_one_epoch(s, epoch, callback, trace)
            train_seconds = time.perf_counter() - t0
            test = evaluate(s.eval_model, s.test_batches, recipe.label_smoothing)
            val = evaluate(s.eval_model, s.val_batches, recipe.label_smoothing) if s.val_batches else None
            s.check_finite(epoch, test, val)
            row = EpochMetrics(epoch, train_loss, train_acc, test.loss, test.acc, lr,
                               round(time.perf_counter() - t0, 3), round(seen / train_seconds, 1),
                               val.loss if val else None, val.acc if val else None, trace.points())
            best = writer.commit(row, s.eval_model.state_dict(), s.resumable_state())
            if callback:
                callback.on_epoch(row, best)
    return RunResult(writer.run_dir, s.model_name, s.params, recipe.epochs, writer.metrics, writer.best,
                     seconds_before + time.perf_counter() - t_run, str(s.device), recipe.seed, s.measured_on)


@contextlib.contextmanager
def _translated(s: Session, writer: RunWriter, callback: Callback | None) -> Iterator[None]:
    """Around the fit: Ctrl-C and SIGTERM, a diverged run, the user's model raising (``Session.guard``)
    each become one error saying what the run folder keeps and how to go on."""
    resume_with = f"mnistkit train --resume {shlex.quote(str(writer.run_dir))}"
    try:
        with sigterm_as_interrupt(), s.guard():
            yield
    except KeyboardInterrupt as exc:
        error, what = (TrainingTerminated, "terminated (SIGTERM)") if isinstance(exc, Terminated) else \
            (TrainingInterrupted, "interrupted")
        raise error(f"{what}; {writer.run_dir / 'last.pt'} holds the state after epoch {writer.epoch} of "
                    f"{s.recipe.epochs}. Resume with: {resume_with}") from None
    except Diverged as exc:
        with contextlib.suppress(OSError):  # so that `mnistkit runs` can say so
            write_outcome(writer.run_dir, "diverged", writer.epoch + 1, str(exc))
        kept = (f"{writer.run_dir / 'last.pt'} holds epoch {writer.epoch}, the last with finite weights (best.pt: "
                f"epoch {writer.best.epoch})" if writer.epoch else "no epoch finished with finite numbers, so the run "
                f"has no trained checkpoint ({writer.run_dir / 'last.pt'} holds the untrained initial weights)")
        raise TrainingDiverged(f"{exc}: the learning rate ({s.recipe.lr:g}) is likely too high, try "
                               f"lr {s.recipe.lr / 10:g}; {kept}") from None
    finally:
        getattr(callback, "close", lambda: None)()   # a progress display stops, however the run ended


def train(model: str | ModelSource | nn.Module, recipe: Recipe | None = None, data: DataOptions | None = None,
          device: str = "auto", runs_dir: str | Path = DEFAULT_RUNS_DIR, callback: Callback | None = None,
          run_name: str | None = None, model_args: dict[str, Any] | None = None,
          experiments: Any = None, teachers_dir: str | Path | None = None) -> RunResult:
    """Train ``model`` (a reference: ``"I3"``, ``"mynet.py:Net"``, ``"s1.yaml"``, with ``model_args``;
    a ``ModelSource``; or a model object, trained as it is) with ``recipe`` on ``data``, into a new
    run folder under ``runs_dir``. ``callback=mnistkit.progress()`` shows the CLI's display. A
    recipe's ``teacher`` that names an iteration is looked up in ``experiments`` (the change-log),
    its runs in ``teachers_dir`` (default: ``runs_dir``)."""
    instance = model if isinstance(model, nn.Module) else None
    source = from_instance(model) if instance is not None else resolve(model, args=model_args)
    recipe, data = recipe or Recipe(), data or DataOptions()
    teacher = TeacherRef((find_teacher(recipe.teacher, teachers_dir or runs_dir, experiments, data),),
                         runs_dir=runs_dir) if recipe.teacher else None
    s = Session.build(source.recorded_in(runs_dir), recipe, data, device, instance, teacher)
    meta = s.meta()
    config = {k: v for k, v in meta.items() if k != "model_text"}
    copy = {source.copy_name: source.text.encode("utf-8")} if source.copy_name and source.text else {}
    writer = RunWriter.create(runs_dir, meta, {**config, "device": str(s.device)},
                              {"state_dict": s.eval_model.state_dict(), **s.resumable_state()}, run_name, copy)
    try:
        return _fit(s, writer, callback)
    except Exception as exc:   # failed before any epoch: the new folder holds nothing of use (removed, lock held)
        if writer.epoch == 0 and not isinstance(exc, (TrainingInterrupted, TrainingDiverged)):  # those keep it
            writer.abandon()
            if isinstance(exc, ModelCodeError):
                raise ModelCodeError(f"{exc}; no epoch finished, so its run folder was removed") from exc.__cause__
        raise
    finally:
        writer.close()


def resume(run_dir: str | Path, device: str = "auto", callback: Callback | None = None,
           model_code: str | Path | None = None, model: ModelSource | None = None) -> RunResult:
    """Continue an interrupted run from its folder, with its own recipe and data; the result is
    the same as an uninterrupted run's. A model of the user's own is rebuilt as ``modelref``
    says (``model_code``: its Python file, named by a user who trusts it; ``model``: the source a
    sweep trains, which must be the one the run recorded)."""
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    # one writer per folder, taken before last.pt is read: a resume that read the state while
    # another process finished the run rolled it back to the older epoch
    lock = FolderLock.acquire(run_dir)
    try:
        return _resume(run_dir, config, device, callback, lock, model_code, model)
    finally:
        lock.release()


def _resume(run_dir: Path, config: Any, device: str, callback: Callback | None, lock: FolderLock,
            model_code: str | Path | None, model: ModelSource | None) -> RunResult:
    last = run_dir / "last.pt"
    state = load_checkpoint(last)
    check_resumable(state, last)
    if model is not None and config.model_source is not None and config.model_source.same_model(model):
        source = model   # a sweep's own trial: the source it resolved (and ships to its workers)
    else:
        source = from_record(state.get("model_source"), str(run_dir), state.get("model_text"), model_code,
                             fallback_name=config.model, run_dir=run_dir)
    if state["model"] != config.model or state.get("teacher") != config.teacher:
        what = "model" if state["model"] != config.model else "teacher"
        raise RunError(f"{last} and config.yaml name another {what}; the run folder is damaged")
    try:
        teacher = TeacherRef.recorded(config.teacher, run_dir) if config.teacher else None
        s = Session.build(source, config.recipe, config.data, device, teacher=teacher)
    except UsageError as exc:   # the backend it trained with does not run here: no message is parsed
        if exc.key != "backend":
            raise
        raise UsageError(f"{run_dir} trained with backend {config.recipe.backend}, and resumes only with it: "
                         f"{exc.detail}; resume it where it runs, or start a new run", key="backend") from None
    # the code found computes the model the run trained (its architecture as built, before the
    # backend swapped layers for its kernels)
    check_identity(source, s.source, str(run_dir))
    metrics = [EpochMetrics.from_dict(r, where=f"{last} metrics") for r in state["metrics"]]
    s.restore(state)
    with threads(config.threads):   # the run's own thread count: the same sums, the same run
        return _fit(s, RunWriter(run_dir, s.meta(), metrics, lock=lock), callback)
