"""TensorBoard event files for a run, the PyTorch convention for watching a training: a training
callback (``mnistkit train --tensorboard``, or ``callback=TensorBoard()`` from Python) that
writes into ``RUN/tensorboard/`` the running training loss, accuracy and learning rate per
logging step, every epoch's figures, and the recipe as text; ``tensorboard --logdir runs`` then
shows every run. Needs the extra ``mnistkit[tensorboard]``; a resumed run appends to its folder.
"""

from __future__ import annotations

from typing import Any

from mnistkit.errors import MnistkitError

__all__ = ["TensorBoard", "Callbacks", "require_tensorboard"]

SUBFOLDER = "tensorboard"


def require_tensorboard() -> Any:
    """torch's SummaryWriter, or one line saying how to install what it needs."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise MnistkitError("--tensorboard needs the tensorboard package, which is not installed; install it with "
                            "pip install 'mnistkit[tensorboard]' (or pip install tensorboard)") from None
    return SummaryWriter


class TensorBoard:
    """A training callback that writes TensorBoard event files into the run folder."""

    def __init__(self) -> None:
        self._summary_writer = require_tensorboard()   # before the run starts: a missing package writes nothing
        self.writer: Any = None
        self.steps = 1

    def on_start(self, start: Any) -> None:
        import yaml

        self.steps = start.steps
        self.writer = self._summary_writer(log_dir=str(start.run_dir / SUBFOLDER))
        if start.start_epoch == 0:
            recipe = yaml.safe_dump(start.recipe.to_dict(), sort_keys=False)
            self.writer.add_text("recipe", f"{start.model}, {start.params:,} parameters, {start.train_samples:,} "
                                           f"training images ({start.data.dataset})\n\n    " + recipe.replace("\n", "\n    "))

    def on_step(self, step: Any) -> None:
        at = (step.epoch - 1) * self.steps + step.step
        self.writer.add_scalar("step/train_loss (running mean over the epoch)", step.loss, at)
        self.writer.add_scalar("step/train_acc (running, %)", step.acc, at)
        self.writer.add_scalar("step/lr", step.lr, at)

    def on_epoch(self, row: Any, best: bool) -> None:
        for name in ("train_loss", "train_acc", "test_loss", "test_acc", "val_loss", "val_acc", "lr", "seconds"):
            value = getattr(row, name)
            if value is not None:
                self.writer.add_scalar(f"epoch/{name}", value, row.epoch)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class Callbacks:
    """Several training callbacks as one (the CLI's display and TensorBoard)."""

    def __init__(self, *callbacks: Any) -> None:
        self.callbacks = [c for c in callbacks if c is not None]

    def on_start(self, start: Any) -> None:
        for c in self.callbacks:
            c.on_start(start)

    def on_step(self, step: Any) -> None:
        for c in self.callbacks:
            c.on_step(step)

    def on_epoch(self, row: Any, best: bool) -> None:
        for c in self.callbacks:
            c.on_epoch(row, best)

    def close(self) -> None:
        for c in self.callbacks:
            getattr(c, "close", lambda: None)()
