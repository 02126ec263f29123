"""Model references: what a user may write wherever a model is taken, how mnistkit builds it,
records it in a run, and rebuilds it from the run.

A reference is one of

- ``I3``: a registered model (inside a project, also a change-log iteration's id: ``S1``);
- ``mynet.py:Net``, ``models/s2.py:build``: a Python file and the name of an ``nn.Module``
  class or of a function returning one (``mynet.py`` alone when the file has one such class);
- ``mypkg.models:Net``: an importable module and a name in it;
- ``s1.yaml``: an architecture as data (``architecture.py``); no code runs to build it.

Keyword arguments (``model_args``) go to the class or function; of the recipe's settings only
those it takes (``dropout``) are passed. A Python file is read once and hashed, and of the very
bytes hashed only the definitions the model needs run (``usercode.definitions``: never a
script's other top-level statements); the files beside it may be imported (the hash covers the
one file). A module reference runs its module's file the same way.

A run records the reference, the resolved path (and the path from the runs folder), the
SHA-256, the description and the model's architecture (``ModelSource.to_record``,
``identity.py``); ``rebuild.from_record`` rebuilds it, running only content this user named.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mnistkit.errors import MnistkitError, RunError, UnknownModelError, UsageError
from mnistkit.usermodels.usercode import (attribute, call_builder, check_output, description, exec_file, module_file,
                               no_dropout_at, read_source, user_code)

__all__ = ["ModelSource", "resolve", "from_instance", "build", "redraw", "parse_model_args", "KINDS"]

KINDS = ("registered", "file", "module", "yaml", "instance")
_NAME = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class ModelSource:
    """A model reference, resolved: what to build, and what a run records of it."""

    reference: str                      # as the user gave it
    kind: str                           # one of KINDS
    name: str                           # what tables and run folders call it: I3, S1, s2
    path: str | None = None             # the resolved file (file, yaml; a module's file)
    module: str | None = None           # module kind: the module's import name
    attr: str | None = None             # the class or function in the file or module
    sha256: str | None = None           # of the file's bytes (file, yaml, module)
    args: tuple[tuple[str, Any], ...] = ()   # model_args, sorted; lists as tuples
    description: str = ""
    text: str | None = field(default=None, compare=False, repr=False)   # the source as hashed
    builder: Any = field(default=None, compare=False, repr=False)       # in-process only: never pickled
    # what it computes (``identity``): one line per layer, and their fingerprint with the args
    layers: tuple[str, ...] = field(default=(), compare=False, repr=False)
    fingerprint: str | None = field(default=None, compare=False)
    relpath: str | None = field(default=None, compare=False)   # the file from the runs folder, as recorded
    siblings: bool = field(default=True, compare=False, repr=False)   # files beside it may be imported

    def __getstate__(self) -> dict[str, Any]:   # to a sweep worker: everything but a live object
        return {**self.__dict__, "builder": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            object.__setattr__(self, key, value)

    @property
    def kwargs(self) -> dict[str, Any]:
        return {k: _unfreeze(v) for k, v in self.args}

    @property
    def shown(self) -> str:
        """``S1 (models.py:S1)``: the name and, where it differs, the reference."""
        return self.name if self.reference == self.name else f"{self.name} ({self.reference})"

    @property
    def copy_name(self) -> str | None:
        """The run folder's copy of the source, for the record."""
        return {"file": "model.py", "module": "model.py", "yaml": "model.yaml"}.get(self.kind)

    def same_model(self, other: "ModelSource") -> bool:
        """The same architecture and arguments (``identity``), wherever its code lies and however
        its file reads; for a run recorded before 0.12 (no fingerprint): the same file content."""
        if self.fingerprint and other.fingerprint:
            return self.fingerprint == other.fingerprint and self.args == other.args
        return (self.kind, self.path, self.module, self.attr, self.sha256, self.args) == \
            (other.kind, other.path, other.module, other.attr, other.sha256, other.args) and \
            (self.kind != "registered" or self.name.lower() == other.name.lower())

    def with_architecture(self, model: Any, summary: Any = None) -> "ModelSource":
        """This source with the identity of ``model``, a fresh model built from it."""
        from mnistkit.usermodels.identity import architecture, fingerprint

        with user_code(self.path, f"tracing {self.shown}") if self.kind != "registered" else contextlib.nullcontext():
            lines = architecture(model, summary)
        return replace(self, layers=tuple(lines), fingerprint=fingerprint(lines, self.kwargs))

    @property
    def build_key(self) -> str:
        """What is built of the code: the class or function and its arguments (``trust``)."""
        import json

        return f"{self.attr}({json.dumps(self.kwargs, sort_keys=True)})"

    def recorded_in(self, runs_dir: str | Path) -> "ModelSource":
        """This source as a run in ``runs_dir`` records it: a file's path also from the runs folder
        (where a moved or copied project finds it), and its content remembered as named by this
        user (``trust``: rebuilding the run may run it)."""
        if self.kind not in ("file", "module") or not self.path or not self.sha256:
            return self
        from mnistkit.usermodels import trust

        trust.remember(self.path, self.sha256, self.build_key)
        return replace(self, relpath=os.path.relpath(self.path, Path(runs_dir).resolve()))

    def to_record(self) -> dict[str, Any]:
        identity = {"fingerprint": self.fingerprint, "architecture": list(self.layers)} if self.fingerprint else {}
        return {"reference": self.reference, "kind": self.kind, "name": self.name, "path": self.path,
                "relpath": self.relpath, "module": self.module, "attr": self.attr, "sha256": self.sha256,
                "args": self.kwargs, "description": self.description, **identity}


def _freeze(value: Any) -> Any:
    return tuple(_freeze(v) for v in value) if isinstance(value, (list, tuple)) else value


def _unfreeze(value: Any) -> Any:
    return [_unfreeze(v) for v in value] if isinstance(value, tuple) else value


def _check_args(args: dict[str, Any] | None, where: str) -> tuple[tuple[str, Any], ...]:
    """model_args: names to numbers, booleans, short strings or lists of them."""
    if not args:
        return ()
    if not isinstance(args, dict):
        raise UsageError(f"{where}: model_args must be a mapping of names to values, not {type(args).__name__}",
                         key="model_args")

    def plain(v: Any, depth: int = 0) -> bool:
        if isinstance(v, (list, tuple)):
            return depth < 2 and len(v) <= 64 and all(plain(x, depth + 1) for x in v)
        return v is None or isinstance(v, (bool, int, float)) or (isinstance(v, str) and len(v) <= 200)

    for key, value in args.items():
        if not isinstance(key, str) or not key.isidentifier():
            raise UsageError(f"{where}: model_args key {key!r} is not a Python argument name", key="model_args")
        if not plain(value):
            raise UsageError(f"{where}: model_args.{key} must be a number, a boolean, a short string or a list "
                             f"of them, not {type(value).__name__}", key="model_args")
    return tuple(sorted((k, _freeze(v)) for k, v in args.items()))


def parse_model_args(pairs: list[str]) -> dict[str, Any]:
    """``["width=12", "widths=[8, 16]"]`` -> ``{"width": 12, "widths": [8, 16]}``: values read as
    YAML scalars or flow lists (``12``, ``0.1``, ``true``, ``[8, 16]``, ``wide``)."""
    import yaml

    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip().isidentifier():
            raise UsageError(f"model argument {pair!r} is not NAME=VALUE (e.g. width=12)", key="model_args")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            raise UsageError(f"model argument {pair!r}: the value is not a number, word or [list]",
                             key="model_args") from None
        if key.strip() in out:
            raise UsageError(f"model argument {key.strip()!r} is given twice ({key.strip()}={out[key.strip()]!r} and "
                             f"{pair!r}); give it once", key="model_args")
        out[key.strip()] = value
    _check_args(out, "model arguments")
    return out


# --------------------------------------------------------------------------- references


def _split(reference: str) -> tuple[str, str | None]:
    target, sep, attr = reference.rpartition(":")
    if not sep:
        return reference, None
    if not attr or not all(p.isidentifier() for p in attr.split(".")):
        raise UsageError(f"model {reference!r}: {attr!r} after the ':' is not a Python name "
                         "(write FILE.py:Name or package.module:Name)", key="model")
    return target, attr


def safe_name(text: str) -> str:
    """A name fit for a run folder: letters, digits, _ . - (at most 40)."""
    return (_NAME.sub("_", text).strip("._-") or "model")[:40]


def resolve(reference: "str | ModelSource", base: str | Path | None = None, args: dict[str, Any] | None = None,
            experiments: Any = None, name: str | None = None) -> ModelSource:
    """The model a reference names. Relative paths are taken from ``base`` (the current folder;
    a change-log's folder inside a change-log); a bare name is ``experiments``' iteration of that
    id when it has one, else a registered model."""
    if isinstance(reference, ModelSource):
        return reference if args is None else replace(reference, args=_check_args(args, reference.reference))
    if not isinstance(reference, str) or not reference.strip() or len(reference) > 1000 or "\x00" in reference:
        raise UsageError(f"{reference!r} is not a model reference (a registered name, FILE.py:Name, "
                         "package.module:Name or FILE.yaml)", key="model")
    reference = reference.strip()
    target, attr = _split(reference)
    frozen = _check_args(args, reference)
    low = target.lower()
    if low.endswith((".yaml", ".yml")):
        if attr is not None:
            raise UsageError(f"model {reference!r}: a YAML architecture is one model; drop the ':{attr}'", key="model")
        return _yaml(reference, _path(target, base), frozen, name)
    if low.endswith(".py") or "/" in target or target.startswith("."):
        return _file(reference, _path(target, base), attr, frozen, name)
    if attr is not None:
        if not all(p.isidentifier() for p in target.split(".")):
            raise UsageError(f"model {reference!r}: {target!r} is neither a .py file nor a module name", key="model")
        return _module(reference, target, attr, frozen, name)
    if experiments is not None:
        it = next((i for i in experiments.iterations if i.id.lower() == target.lower()), None)
        if it is not None:
            return experiments.model_source(it, args)
    try:
        return _registered(reference, frozen, base)
    except UnknownModelError as exc:   # perhaps a typo of an iteration's id: name them too
        if experiments is None or not experiments.iterations:
            raise
        ids = ", ".join(i.id for i in experiments.iterations)
        raise UnknownModelError(f"{exc}; the change-log {experiments.path} has the iterations {ids}") from None


def _path(target: str, base: str | Path | None) -> Path:
    path = Path(target).expanduser()
    return (Path(base) / path if base is not None and not path.is_absolute() else path).resolve()


def _registered(reference: str, args: tuple, base: str | Path | None, registry_only: bool = False) -> ModelSource:
    """``registry_only``: a name a run recorded, which resolves through the registry and nothing else."""
    from mnistkit.models import list_models, model_info

    try:
        entry = model_info(reference)
    except UnknownModelError:
        if registry_only:
            raise RunError(f"the run names the registered model {reference[:100]!r}, which mnistkit does not have "
                           f"(known models: {', '.join(list_models())}); the run folder is damaged or from a newer "
                           "mnistkit") from None
        hint = ""
        if "." in reference and not reference.startswith("."):
            stem, _, attr = reference.rpartition(".")
            if _path(stem.replace(".", "/") + ".py", base).is_file():
                hint = f"; did you mean {stem.replace('.', '/')}.py:{attr}?"
        raise UnknownModelError(f"unknown model {reference!r} (known models: {', '.join(list_models())}); a model "
                                f"of your own is FILE.py:Name, package.module:Name or FILE.yaml{hint}") from None
    builder = entry.builder
    if getattr(builder, "__module__", "") == "mnistkit.models":
        return ModelSource(reference, "registered", entry.name, args=args, description=entry.description,
                           builder=builder)
    # registered from the user's code in this process: record its file, so that other processes
    # (evaluate, a sweep's workers) rebuild it from there
    try:
        file = inspect.getsourcefile(builder)
    except TypeError:
        file = None
    text = sha = None
    if file and Path(file).is_file():
        text, sha = read_source(Path(file), "a Python")
    return ModelSource(reference, "file" if sha else "instance", entry.name, str(Path(file).resolve()) if sha else None,
                       attr=builder.__qualname__ if sha else None, sha256=sha, args=args,
                       description=entry.description, text=text, builder=builder)


def _yaml(reference: str, path: Path, args: tuple, name: str | None) -> ModelSource:
    from mnistkit.models.architecture import load_architecture

    if args:
        raise UsageError(f"model {reference!r}: a YAML architecture takes no model_args "
                         f"({', '.join(k for k, _ in args)}); write the values into the file", key="model_args")
    arch = load_architecture(path)
    return ModelSource(reference, "yaml", name or safe_name(path.stem), str(path), sha256=arch.sha256,
                       description=arch.description, text=arch.text)


def _file(reference: str, path: Path, attr: str | None, args: tuple, name: str | None) -> ModelSource:
    if not path.is_file():
        raise UsageError(f"model {reference!r}: {path} not found" + ("" if path.suffix == ".py" else
                         "; a model file ends in .py (or .yaml for an architecture)"), key="model")
    text, sha = read_source(path, "a Python")
    module = exec_file(text, str(path), sha, attr)
    attr, obj = attribute(module, attr, path.name)
    return ModelSource(reference, "file", name or safe_name(attr), str(path), attr=attr, sha256=sha, args=args,
                       description=description(obj), text=text, builder=obj)


def _module(reference: str, modname: str, attr: str, args: tuple, name: str | None) -> ModelSource:
    """A module's file, found as ``import`` would find it, and run like a model file: its
    definitions only, its relative imports from its package; remembered like a file."""
    path = module_file(modname)
    if path is None or path.suffix != ".py":
        parts = modname.split(".")
        missing = next((".".join(parts[:i]) for i in range(1, len(parts) + 1)
                        if module_file(".".join(parts[:i])) is None), modname)
        raise UsageError(f"model {reference!r}: no module named {missing!r} with a Python file (is it installed, or is "
                         "its folder on PYTHONPATH?)", key="model")
    text, sha = read_source(path, "a Python")
    package = modname if path.name == "__init__.py" else modname.rpartition(".")[0]
    module = exec_file(text, str(path), sha, attr, siblings=False, package=package or None)
    attr, obj = attribute(module, attr, modname, package=modname)
    return ModelSource(reference, "module", name or safe_name(attr), str(path), modname, attr, sha, args,
                       description(obj), text=text, builder=obj, siblings=False)


def _module_package(source: ModelSource) -> str | None:
    modname = source.module or ""
    return (modname if Path(source.path or "").name == "__init__.py" else modname.rpartition(".")[0]) or None


def from_instance(model: Any) -> ModelSource:
    """What a run of a model object made in Python records: its class's source file when it has
    one of the user's own (rebuilt as ``Class()``), else that it cannot be rebuilt."""
    cls = type(model)
    file = None
    if not cls.__module__.startswith(("torch", "mnistkit.")) and "<locals>" not in cls.__qualname__:
        with contextlib.suppress(TypeError, OSError):
            file = inspect.getsourcefile(cls)
    name = safe_name(cls.__name__)
    if file and Path(file).is_file():
        text, sha = read_source(Path(file), "a Python")
        return ModelSource(f"{Path(file).name}:{cls.__qualname__}", "file", name, str(Path(file).resolve()),
                           attr=cls.__qualname__, sha256=sha, description=description(cls), text=text)
    return ModelSource(f"<{cls.__name__} object>", "instance", name, description=description(cls))


# --------------------------------------------------------------------------- building


def build(source: ModelSource, model_kwargs: dict[str, Any] | None = None, check: bool = True) -> tuple[Any, list[str]]:
    """A fresh model of ``source`` and notes for the run's start. ``model_kwargs`` are the
    recipe's (dropout, dropout_at): passed where the builder takes them."""
    model_kwargs = dict(model_kwargs or {})
    if source.kind == "yaml":
        from mnistkit.models.architecture import parse_architecture

        no_dropout_at(source, model_kwargs)
        arch = parse_architecture(source.text or "", where=source.path or source.reference)
        return check_output(arch.build(dropout=model_kwargs.get("dropout", 0.05)), source, check), []
    if source.kind == "instance":
        raise RunError(f"{source.name} was a model object made in Python whose class has no source file of its own; "
                       "mnistkit cannot rebuild it: pass the model object itself")
    obj = source.builder
    if obj is None:
        if source.kind == "registered":
            from mnistkit.models import model_info

            obj = model_info(source.name).builder
        else:   # a file, or a module's file: its definitions only
            package = _module_package(source) if source.kind == "module" else None
            module = exec_file(source.text or "", source.path or "", source.sha256 or "", source.attr,
                               siblings=source.siblings, package=package)
            obj = attribute(module, source.attr, source.module or Path(source.path or "").name,
                            package=source.module)[1]
    model, notes = call_builder(obj, source, model_kwargs)
    return check_output(model, source, check and source.kind != "registered"), notes


def redraw(model: Any, source: ModelSource) -> tuple[Any, list[str]]:
    """A model object's weights drawn anew under the seed just set, so that the seed decides the
    run as it does for a reference: a fresh ``type(model)()`` is built and its weights copied
    into ``model`` (the object stays the caller's). Where its class cannot be built without
    arguments, or builds other shapes, the object's own weights stay, and a note says so."""
    import torch

    try:
        with user_code(source.path, f"building {source.shown} anew"):   # as a reference builds it: the same run
            fresh = type(model)()
            ours, theirs = model.state_dict(), fresh.state_dict()
            if list(ours) == list(theirs) and all(ours[k].shape == theirs[k].shape for k in ours):
                with torch.no_grad():
                    model.load_state_dict(theirs)
                return model, [f"{source.name}'s weights are drawn anew under the seed ({type(model).__name__}() "
                               "built under it), as a reference's are: weights it held before are not trained on"]
    except MnistkitError:   # a class that needs arguments, lazy layers...: the object's own weights
        pass
    return model, [f"{source.name}'s initial weights are the object's own ({type(model).__name__}() without "
                   "arguments does not rebuild it): the seed decides the data order and Dropout, not them"]
