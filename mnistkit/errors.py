"""Every error a user can cause, each with its exit code. The CLI turns each into one line on
stderr; a Python caller catches ``MnistkitError``. Messages speak of values, never of CLI flags."""

from __future__ import annotations

__all__ = ["MnistkitError", "UsageError", "UnknownModelError", "DataError", "RunError", "ExperimentsError",
           "TrainingDiverged", "TrainingInterrupted", "TrainingTerminated", "SweepError", "ModelCodeError"]


class MnistkitError(Exception):
    """A problem the user can fix; the message says what is wrong and how to fix it."""

    exit_code = 1


class UsageError(MnistkitError):
    """A bad setting. ``key`` names the offending setting (dotted), ``detail`` what is wrong."""

    exit_code = 2

    def __init__(self, message: str, key: str | None = None, detail: str | None = None) -> None:
        super().__init__(message)
        self.key, self.detail = key, detail or message


class UnknownModelError(MnistkitError, KeyError):
    """A model name that is not in the registry."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class DataError(MnistkitError):
    """Data that is missing, truncated or of the wrong kind."""


class RunError(MnistkitError):
    """A run folder or checkpoint that cannot be used."""


class ExperimentsError(MnistkitError):
    """The change-log (experiments.yaml) is missing or malformed."""


class TrainingDiverged(MnistkitError):
    """The training loss, the evaluation loss or the weights stopped being finite."""

    exit_code = 3


class TrainingInterrupted(MnistkitError):
    """Ctrl-C (or SIGTERM) during training; the run folder stays resumable."""

    exit_code = 130


class TrainingTerminated(TrainingInterrupted):
    """SIGTERM (a scheduler, ``kill``) during training; the run folder stays resumable."""

    exit_code = 143


class SweepError(MnistkitError):
    """A sweep spec file that cannot be used (said before anything runs)."""


class ModelCodeError(MnistkitError):
    """The user's own model code failed (a syntax error, an exception while building or running
    it). The message names their file and line; the original exception is chained, so a debug
    run shows the whole traceback."""
