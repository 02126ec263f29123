"""One finished epoch's figures (a line of metrics.jsonl) and which epoch is "best"."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from mnistkit.files import strictjson
from mnistkit.errors import RunError

__all__ = ["EpochMetrics", "StepLosses", "metrics_text", "check_epochs", "selected_on", "best_row"]

MAX_STEP_POINTS = 50       # step-loss points an epoch records (a window of steps each)
MAX_STEP_POINTS_READ = 1000  # what a reader accepts in one row (more is damage, not a run)


@dataclass(frozen=True)
class EpochMetrics:
    """One line of metrics.jsonl: what one finished epoch measured. Accuracies in percent."""

    epoch: int
    train_loss: float
    train_acc: float
    test_loss: float
    test_acc: float
    lr: float
    seconds: float
    train_images_per_s: float
    val_loss: float | None = None  # only when the run holds out a validation split
    val_acc: float | None = None
    # the training loss inside the epoch at a bounded rate: (step, mean loss of the steps since the
    # previous point), at most MAX_STEP_POINTS of them, the last at the epoch's last step. Runs of
    # 0.11 and before have none; readers of 0.11 and before ignore the key
    step_losses: tuple[tuple[int, float], ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if self.step_losses is None:
            del out["step_losses"]   # a run without them reads as before
        else:
            out["step_losses"] = [list(p) for p in self.step_losses]
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str = "metrics") -> "EpochMetrics":
        if not isinstance(data, dict):
            raise RunError(f"{where} is not a metrics row; the run folder is damaged")
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            value = data.get(f.name)
            if f.name == "step_losses":
                if value is not None:
                    values[f.name] = _step_losses(value, where)
                continue
            if value is None and f.default is None:
                continue
            ok = isinstance(value, int) if f.type == "int" else isinstance(value, (int, float))
            if isinstance(value, bool) or not ok or not math.isfinite(value):
                raise RunError(f"{where}: {f.name} is {value!r}, not a finite number; the run folder is damaged")
            values[f.name] = value
        return cls(**values)


def _step_losses(value: Any, where: str) -> tuple[tuple[int, float], ...]:
    damaged = f"{where}: step_losses is not a list of [step, loss] pairs; the run folder is damaged"
    if not isinstance(value, list) or len(value) > MAX_STEP_POINTS_READ:
        raise RunError(damaged)
    out = []
    for pair in value:
        if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], int)
                and not isinstance(pair[0], bool) and pair[0] >= 1 and isinstance(pair[1], (int, float))
                and not isinstance(pair[1], bool) and math.isfinite(pair[1])):
            raise RunError(damaged)
        out.append((pair[0], float(pair[1])))
    return tuple(out)


class StepLosses:
    """What an epoch records of its steps' losses, at a bounded rate: the mean loss over each
    window of ``ceil(steps / MAX_STEP_POINTS)`` steps. ``add`` is called every step with the
    epoch's running sum (a device tensor); it keeps a copy at each window's end (no host sync),
    and ``points`` reads them all at once when the epoch ends."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.every = max(1, math.ceil(steps / MAX_STEP_POINTS))
        self.marks: list[tuple[int, int, Any]] = []

    def add(self, step: int, loss_sum: Any, seen: int) -> None:
        if step % self.every == 0 or step == self.steps:
            self.marks.append((step, seen, loss_sum.detach().clone()))

    def points(self) -> tuple[tuple[int, float], ...] | None:
        if not self.marks:
            return None
        import torch

        sums = torch.stack([m[2] for m in self.marks]).double().tolist()   # one host sync per epoch
        out, before, seen_before = [], 0.0, 0
        for (step, seen, _), total in zip(self.marks, sums):
            if seen > seen_before:
                out.append((step, round((total - before) / (seen - seen_before), 6)))
            before, seen_before = total, seen
        return tuple(out)


def metrics_text(rows: list[EpochMetrics]) -> str:
    """metrics.jsonl: one strict-JSON line per epoch."""
    return "".join(strictjson.dumps(r.to_dict()) + "\n" for r in rows)


def check_epochs(rows: list[EpochMetrics], where: str) -> None:
    if [r.epoch for r in rows] != list(range(1, len(rows) + 1)):
        raise RunError(f"{where} lists epochs {[r.epoch for r in rows][:10]}, not 1, 2, 3, ...; the run folder "
                       "is damaged")


def selected_on(metrics: list[EpochMetrics]) -> str:
    """Which split chooses the best epoch: ``validation`` when the run holds one out, else
    ``test`` (then "best" is optimistic by construction, and every display says so)."""
    return "validation" if metrics and metrics[0].val_acc is not None else "test"


def best_row(metrics: list[EpochMetrics]) -> EpochMetrics:
    """The epoch best.pt holds: the highest validation accuracy when the run has a validation
    split, else the highest test accuracy; the earliest on ties."""
    if selected_on(metrics) == "validation":
        return max(metrics, key=lambda r: (r.val_acc if r.val_acc is not None else -1.0, -r.epoch))
    return max(metrics, key=lambda r: (r.test_acc, -r.epoch))
