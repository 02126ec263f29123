"""mnistkit: design, train, inspect and compare tiny CNNs on MNIST.

The public API is imported lazily so that ``import mnistkit`` (and ``mnistkit --help``)
never pays for importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.11.0"

# public name -> module that defines it
_LAZY = {
    "MnistkitError": "mnistkit.errors",
    "UnknownModelError": "mnistkit.errors",
    "register_model": "mnistkit.models",
    "get_model": "mnistkit.models",
    "list_models": "mnistkit.models",
    "model_info": "mnistkit.models",
    "summarize": "mnistkit.introspect.summary",
    "Recipe": "mnistkit.recipe",
    "Augment": "mnistkit.recipe",
    "DataOptions": "mnistkit.recipe",
    "find_experiments": "mnistkit.experiments",
    "resolve_recipe": "mnistkit.experiments",
    "train": "mnistkit.training.loop",
    "make_plan": "mnistkit.training.plan",
    "train_plan": "mnistkit.training.plan",
    "lr_find": "mnistkit.training.lrfind",
    "prepare": "mnistkit.backends",
    "resume": "mnistkit.training.loop",
    "progress": "mnistkit.render.training",
    "init_project": "mnistkit.project",
    "evaluate_checkpoint": "mnistkit.training.evaluation",
    "build_report": "mnistkit.results.compare",
    "run_checks": "mnistkit.results.check",
    "build_write_up": "mnistkit.results.report",
    "run_curves": "mnistkit.results.curves",
    "TensorBoard": "mnistkit.training.tensorboard",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mnistkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
