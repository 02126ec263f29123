"""The trainer: recipe, seeding, device choice, optimizer and scheduler, fit, evaluate, resume."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import platform
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from mnistkit import __version__
from mnistkit.data import Augment, EvalBatches, Split, TrainBatches, load_dataset
from mnistkit.errors import MnistkitError, UsageError
from mnistkit.models import get_model, model_info
from mnistkit.runs import (best_row, load_checkpoint, new_run_dir, read_config, save_checkpoint,
                           write_config, write_metrics)

OPTIMIZERS = ("sgd",)
SCHEDULERS = ("onecycle", "step", "none")
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class Recipe:
    """Every training hyperparameter. Built from experiments.yaml, overridden by CLI options,
    and written into the run folder so that the run can be reproduced from it alone."""

    epochs: int = 15
    batch_size: int = 256
    test_batch_size: int = 1024
    optimizer: str = "sgd"
    lr: float = 0.2  # the maximum LR for OneCycleLR, the initial LR for StepLR
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    scheduler: str = "onecycle"
    pct_start: float = 0.2
    div_factor: float = 10.0
    final_div_factor: float = 100.0
    step_size: int = 1
    gamma: float = 0.1
    dropout: float = 0.05
    label_smoothing: float = 0.0
    augment: Augment = field(default_factory=Augment)
    mean: float = 0.1307
    std: float = 0.3081
    seed: int = 42
    # bf16 autocast for the training step (BN, loss and evaluation stay fp32); "auto" picks bf16
    # where the hardware computes it natively (CUDA, CPUs with AVX512-BF16/AMX), else fp32
    precision: str = "auto"
    channels_last: bool = True

    def __post_init__(self) -> None:
        checks = [
            ("epochs", self.epochs >= 1, "must be at least 1"),
            ("batch_size", self.batch_size >= 1, "must be at least 1"),
            ("test_batch_size", self.test_batch_size >= 1, "must be at least 1"),
            ("lr", self.lr > 0 and math.isfinite(self.lr), "must be a positive number"),
            ("dropout", 0 <= self.dropout < 1, "must be in [0, 1)"),
            ("optimizer", self.optimizer in OPTIMIZERS, f"must be one of {', '.join(OPTIMIZERS)}"),
            ("scheduler", self.scheduler in SCHEDULERS, f"must be one of {', '.join(SCHEDULERS)}"),
            ("pct_start", 0 < self.pct_start < 1, "must be in (0, 1)"),
            ("momentum", self.momentum >= 0, "must be >= 0"),
            ("weight_decay", self.weight_decay >= 0, "must be >= 0"),
            ("std", self.std > 0, "must be positive"),
            ("precision", self.precision in PRECISIONS, f"must be one of {', '.join(PRECISIONS)}"),
            ("augment.interpolation", self.augment.interpolation in ("nearest", "bilinear"),
             "must be nearest or bilinear"),
            ("augment.scale_min", 0 < self.augment.scale_min <= self.augment.scale_max,
             "must be positive and at most scale_max"),
        ]
        for key, ok, detail in checks:
            if not ok:
                raise UsageError(f"{key} {detail}", key=key, detail=detail)

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
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, expected) or (expected is not bool and isinstance(value, bool)):
                detail = f"must be {expected.__name__}, not {type(value).__name__} ({value!r})"
                raise UsageError(f"{where}: {key} {detail}", key=key, detail=detail)
            out[name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "recipe") -> "Recipe":
        values = cls._typed(cls, data, where)
        if "augment" in values and not isinstance(values["augment"], Augment):
            aug = values["augment"]
            if not isinstance(aug, dict):
                raise UsageError(f"{where}: augment must be a mapping", key="augment", detail="must be a mapping")
            values["augment"] = Augment(**cls._typed(Augment, aug, where, prefix="augment."))
        try:
            return cls(**values)
        except UsageError as exc:
            raise UsageError(f"{where}: {exc}", key=exc.key, detail=exc.detail) from None

    def replace(self, **changes: Any) -> "Recipe":
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


# --------------------------------------------------------------------------- environment


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; asking for an absent device is an error."""
    name = (name or "auto").lower()
    mps = getattr(torch.backends, "mps", None)
    has_mps = bool(mps and mps.is_available())
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UsageError("--device cuda was asked for but no CUDA GPU is available; use --device cpu or auto")
        return torch.device(name)
    if name == "mps":
        if not has_mps:
            raise UsageError("--device mps was asked for but Apple's MPS is not available; use --device cpu or auto")
        return torch.device("mps")
    raise UsageError(f"unknown device {name!r}; choose auto, cpu, cuda or mps")


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` where the device computes bf16 natively, else ``fp32``."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        try:
            return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
        except (AttributeError, RuntimeError):
            return "fp32"
    return "fp32"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # numpy is optional
        pass
    torch.manual_seed(seed)


def versions() -> dict[str, str]:
    import torchvision

    return {"mnistkit": __version__, "torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
            "python": platform.python_version()}


def build_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
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
        ), True
    if recipe.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=recipe.step_size, gamma=recipe.gamma), False
    return None, False


# --------------------------------------------------------------------------- evaluation


EVAL_CHUNK = 256


@torch.inference_mode()
def evaluate(model: nn.Module, batches: EvalBatches, label_smoothing: float = 0.0,
             predictions: bool = False) -> dict[str, Any]:
    """Mean loss and accuracy (percent) over a split; optionally every prediction."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=batches.y.device)
    correct = torch.zeros((), device=batches.y.device, dtype=torch.long)
    preds = []
    for xb, yb in batches:
        # chunks of EVAL_CHUNK: on CPU a 1024-image batch falls out of cache and runs 2-4x slower;
        # every figure is per image, so the chunking changes no result
        for x, y in zip(xb.split(EVAL_CHUNK), yb.split(EVAL_CHUNK)):
            out = model(x)
            loss_sum += F.cross_entropy(out, y, reduction="sum", label_smoothing=label_smoothing)
            p = out.argmax(1)
            correct += (p == y).sum()
            if predictions:
                preds.append(p)
    model.train(was_training)
    n = len(batches.y)
    result = {"loss": float(loss_sum) / n, "acc": 100.0 * int(correct) / n, "n": n}
    if predictions:
        result["predictions"] = torch.cat(preds).cpu()
    return result


def per_class_report(labels: torch.Tensor, predictions: torch.Tensor, classes: int = 10) -> dict[str, Any]:
    """Confusion matrix (rows: true class, columns: predicted) and per-class figures in percent."""
    cm = torch.bincount(labels.long() * classes + predictions.long(), minlength=classes * classes).view(classes, classes)
    tp = cm.diag().double()
    support, predicted = cm.sum(1).double(), cm.sum(0).double()
    recall = torch.where(support > 0, 100 * tp / support.clamp_min(1), torch.full_like(tp, float("nan")))
    precision = torch.where(predicted > 0, 100 * tp / predicted.clamp_min(1), torch.full_like(tp, float("nan")))
    return {
        "confusion_matrix": cm.tolist(),
        "per_class": [
            {"class": c, "support": int(support[c]), "accuracy": float(recall[c]), "recall": float(recall[c]),
             "precision": float(precision[c])}
            for c in range(classes)
        ],
    }


# --------------------------------------------------------------------------- training


class Callback(Protocol):
    def on_start(self, info: dict[str, Any]) -> None: ...
    def on_step(self, epoch: int, step: int, steps: int, loss: float, acc: float, lr: float, ips: float) -> None: ...
    def on_epoch(self, row: dict[str, Any]) -> None: ...


class TrainingDiverged(MnistkitError):
    exit_code = 3


@contextlib.contextmanager
def _sigint_deferred():
    """Hold back Ctrl-C while an epoch's results are written, so that metrics.jsonl, best.pt and
    last.pt always describe the same epoch; a Ctrl-C pressed meanwhile is raised right after."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return
    pending: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pending:
        raise KeyboardInterrupt


class TrainingInterrupted(MnistkitError):
    exit_code = 130


@dataclass
class DataOptions:
    dataset: str = "mnist"
    data_dir: str | None = None
    limit: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_data(options: DataOptions, seed: int) -> tuple[Split, Split]:
    train = load_dataset(options.dataset, "train", options.data_dir, seed=seed)
    test = load_dataset(options.dataset, "test", options.data_dir, seed=seed)
    if options.limit is not None:
        if options.limit < 1:
            raise UsageError("--limit must be a positive number of training samples")
        if options.limit > len(train):
            raise UsageError(f"--limit {options.limit:,} is larger than the {options.dataset} training set "
                             f"({len(train):,} samples); use at most {len(train):,}")
        train = train.head(options.limit)
    return train, test


SYNC_SECONDS = 0.5  # between host syncs for the progress display (and the NaN check)


def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    return {"python": random.getstate(), "torch": torch.get_rng_state(), "data": generator.get_state()}


def _set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    generator.set_state(state["data"])


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer,
               scheduler: Any = None, label_smoothing: float = 0.0, bf16: bool = False,
               channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step; returns (loss, correct) as device tensors: no host sync here."""
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        out = model(x)
        loss = F.cross_entropy(out, y, label_smoothing=label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return loss.detach(), (out.detach().argmax(1) == y).sum()


@dataclass
class RunResult:
    run_dir: Path
    model: str
    params: int
    epochs: int
    metrics: list[dict[str, Any]]
    seconds: float
    device: str

    @property
    def best(self) -> dict[str, Any]:
        return best_row(self.metrics)

    def to_dict(self) -> dict[str, Any]:
        best, final = self.best, self.metrics[-1]
        return {
            "run_dir": str(self.run_dir), "model": self.model, "params": self.params, "epochs": self.epochs,
            "device": self.device, "best_test_acc": best["test_acc"], "best_epoch": best["epoch"],
            "final_test_acc": final["test_acc"], "final_train_acc": final["train_acc"],
            "final_test_loss": final["test_loss"], "seconds": round(self.seconds, 2),
        }


def train(
    model_name: str | None = None,
    recipe: Recipe | None = None,
    data: DataOptions | None = None,
    device: str = "auto",
    runs_dir: str | Path = "runs",
    resume: str | Path | None = None,
    callback: Callback | None = None,
    stop_after: int | None = None,
) -> RunResult:
    """Train a registered model with a recipe, writing a run folder; or resume one.

    ``stop_after`` ends the run after that many epochs in this call, as an interruption would
    (the run stays resumable); tests use it.
    """
    dev = resolve_device(device)
    if resume is not None:
        run_dir = Path(resume)
        config = read_config(run_dir)
        model_name = config["model"]
        recipe = Recipe.from_dict(config["recipe"], where=f"{run_dir}/config.yaml recipe")
        data = DataOptions(**config.get("data", {}))
        state = load_checkpoint(run_dir / "last.pt")
    else:
        if model_name is None or recipe is None:
            raise ValueError("train() needs a model name and a recipe unless it resumes a run")
        model_name = model_info(model_name).name
        data = data or DataOptions()
        state = None

    # the run records what "auto" meant on this machine (a resolved value resolves to itself)
    recipe = recipe.replace(precision=resolve_precision(recipe.precision, dev))
    bf16 = recipe.precision == "bf16"
    seed_everything(recipe.seed)
    train_split, test_split = load_data(data, recipe.seed)
    model = get_model(model_name, dropout=recipe.dropout).to(dev)
    if recipe.channels_last:
        model = model.to(memory_format=torch.channels_last)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    generator = torch.Generator(device=dev).manual_seed(recipe.seed)
    batches = TrainBatches(train_split, recipe.batch_size, dev, recipe.augment, generator, recipe.mean, recipe.std)
    test_batches = EvalBatches(test_split, recipe.test_batch_size, dev, recipe.mean, recipe.std,
                               channels_last=recipe.channels_last)
    optimizer = build_optimizer(model, recipe)
    scheduler, per_step = build_scheduler(optimizer, recipe, len(batches))

    meta = {"model": model_name, "params": params, "recipe": recipe.to_dict(), "data": data.to_dict(),
            "versions": versions()}
    metrics: list[dict[str, Any]] = []
    start_epoch = 0
    if state is not None:
        if state.get("model") != model_name:
            raise MnistkitError(f"{run_dir}/last.pt holds model {state.get('model')!r}, the run is {model_name!r}")
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"], generator)
        metrics = list(state["metrics"])
        start_epoch = int(state["epoch"])

    def checkpoint(epoch: int) -> None:
        save_checkpoint(run_dir / "last.pt", {
            **meta, "epoch": epoch, "metrics": metrics, "state_dict": model.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict() if scheduler else None,
            "rng": _rng_state(generator),
        })

    if state is None:
        with _sigint_deferred():  # a new run folder always holds config.yaml and last.pt, so it can resume
            run_dir = new_run_dir(runs_dir, model_name)
            write_config(run_dir, {**meta, "device": str(dev)})
            checkpoint(0)
    notes = []
    if per_step and scheduler.total_steps > recipe.epochs * len(batches):
        notes.append(f"this run has only {recipe.epochs * len(batches)} steps, fewer than OneCycleLR's warm-up "
                     f"needs: the schedule is stretched to {scheduler.total_steps} steps and the LR will not "
                     "finish annealing")
    if callback:
        callback.on_start({"notes": notes, "run_dir": str(run_dir), "model": model_name, "params": params, "device": str(dev),
                           "epochs": recipe.epochs, "start_epoch": start_epoch, "steps": len(batches),
                           "train_samples": len(train_split), "test_samples": len(test_split),
                           "recipe": recipe.to_dict(), "data": data.to_dict()})
    best_acc = max((r["test_acc"] for r in metrics), default=-1.0)
    t_run = time.perf_counter()
    seconds_before = sum(r["seconds"] for r in metrics)
    committed = start_epoch
    model.train()
    try:
        for epoch in range(start_epoch + 1, recipe.epochs + 1):
            t0 = time.perf_counter()
            loss_sum = torch.zeros((), device=dev)
            correct = torch.zeros((), device=dev, dtype=torch.long)
            seen = 0
            steps = len(batches)
            last_sync = t0
            for step, (x, y) in enumerate(batches, 1):
                loss, hits = train_step(model, x, y, optimizer, scheduler if per_step else None,
                                        recipe.label_smoothing, bf16, recipe.channels_last)
                loss_sum += loss * len(y)
                correct += hits
                seen += len(y)
                if step == steps or time.perf_counter() - last_sync >= SYNC_SECONDS:
                    last_sync = time.perf_counter()
                    mean_loss = float(loss_sum) / seen
                    if not math.isfinite(mean_loss):
                        raise TrainingDiverged(
                            f"the training loss became {mean_loss} at epoch {epoch}, step {step}: the learning "
                            f"rate ({recipe.lr:g}) is likely too high, try --lr {recipe.lr / 10:g}; the last good "
                            f"checkpoint is {run_dir / 'last.pt'}"
                        )
                    if callback:
                        callback.on_step(epoch, step, steps, mean_loss, 100.0 * int(correct) / seen,
                                         optimizer.param_groups[0]["lr"], seen / (time.perf_counter() - t0))
            lr = optimizer.param_groups[0]["lr"]
            if scheduler is not None and not per_step:
                scheduler.step()
            train_seconds = time.perf_counter() - t0
            test = evaluate(model, test_batches, recipe.label_smoothing)
            row = {
                "epoch": epoch, "train_loss": float(loss_sum) / seen, "train_acc": 100.0 * int(correct) / seen,
                "test_loss": test["loss"], "test_acc": test["acc"], "lr": lr,
                "seconds": round(time.perf_counter() - t0, 3), "train_images_per_s": round(seen / train_seconds, 1),
            }
            with _sigint_deferred():
                metrics.append(row)
                if row["test_acc"] > best_acc:
                    best_acc = row["test_acc"]
                    save_checkpoint(run_dir / "best.pt", {**meta, "epoch": epoch, "metrics": metrics,
                                                          "state_dict": model.state_dict()})
                checkpoint(epoch)
                write_metrics(run_dir, metrics)  # last: whatever it lists, last.pt already holds
                committed = epoch
            if callback:
                callback.on_epoch(row)
            if stop_after is not None and epoch - start_epoch >= stop_after and epoch < recipe.epochs:
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        raise TrainingInterrupted(
            f"interrupted; {run_dir / 'last.pt'} holds the state after epoch {committed} of {recipe.epochs}. "
            f"Resume with: mnistkit train --resume {run_dir}"
        ) from None
    return RunResult(run_dir, model_name, params, recipe.epochs, metrics,
                     seconds_before + time.perf_counter() - t_run, str(dev))


def checkpoint_recipe(checkpoint: dict[str, Any], where: str = "checkpoint") -> Recipe:
    """The typed recipe stored in a checkpoint (defaults for keys an older one lacks)."""
    recipe = checkpoint.get("recipe") or {}
    if not isinstance(recipe, dict):
        raise MnistkitError(f"{where} holds no readable recipe; it is not a mnistkit checkpoint")
    try:
        return Recipe.from_dict(recipe, where=f"{where} recipe")
    except UsageError as exc:  # a damaged file, not a bad option: exit code 1
        raise MnistkitError(str(exc)) from None


def load_model(checkpoint: dict[str, Any], recipe: Recipe | None = None) -> nn.Module:
    """Rebuild the registered model of a checkpoint and load its weights."""
    name = checkpoint.get("model")
    recipe = recipe or checkpoint_recipe(checkpoint)
    model = get_model(str(name), dropout=recipe.dropout)
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except (KeyError, RuntimeError) as exc:
        raise MnistkitError(f"the checkpoint's weights do not fit model {name} ({str(exc).splitlines()[0][:150]})") from None
    if recipe.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def evaluate_checkpoint(target: str | Path, dataset: str | None = None, data_dir: str | None = None,
                        device: str = "auto", batch_size: int | None = None) -> dict[str, Any]:
    """Test loss/accuracy, per-class figures and confusion matrix of a run or checkpoint."""
    from mnistkit.runs import resolve_checkpoint

    path = resolve_checkpoint(target)
    ckpt = load_checkpoint(path)
    recipe = checkpoint_recipe(ckpt, str(path))
    dev = resolve_device(device)
    model = load_model(ckpt, recipe).to(dev)
    saved_data = ckpt.get("data") or {}
    dataset = dataset or saved_data.get("dataset", "mnist")
    data_dir = data_dir or (saved_data.get("data_dir") if dataset == saved_data.get("dataset") else None)
    test = load_dataset(dataset, "test", data_dir, seed=recipe.seed)
    batches = EvalBatches(test, batch_size or recipe.test_batch_size, dev, recipe.mean, recipe.std,
                          channels_last=recipe.channels_last)
    result = evaluate(model, batches, recipe.label_smoothing, predictions=True)  # the loss as the run recorded it
    report = per_class_report(test.labels, result.pop("predictions"))
    recorded = next((r["test_acc"] for r in ckpt.get("metrics", []) if r["epoch"] == ckpt.get("epoch")), None)
    return {"checkpoint": str(path), "model": ckpt["model"], "epoch": ckpt.get("epoch"), "dataset": dataset,
            "test_loss": result["loss"], "test_acc": result["acc"], "samples": result["n"],
            "recorded_test_acc": recorded, **report}
