"""One finished epoch's figures (a line of metrics.jsonl) and which epoch is "best"."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from mnistkit import strictjson
from mnistkit.errors import RunError

__all__ = ["EpochMetrics", "metrics_text", "check_epochs", "selected_on", "best_row"]


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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str = "metrics") -> "EpochMetrics":
        if not isinstance(data, dict):
            raise RunError(f"{where} is not a metrics row; the run folder is damaged")
        values = {}
        for f in dataclasses.fields(cls):
            value = data.get(f.name)
            if value is None and f.default is None:
                continue
            ok = isinstance(value, int) if f.type == "int" else isinstance(value, (int, float))
            if isinstance(value, bool) or not ok or not math.isfinite(value):
                raise RunError(f"{where}: {f.name} is {value!r}, not a finite number; the run folder is damaged")
            values[f.name] = value
        return cls(**values)


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
