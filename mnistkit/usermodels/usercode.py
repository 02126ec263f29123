"""Running the user's own model code, guarded: a Python file read once, hashed, and the very bytes
hashed compiled and run as a module (its folder on ``sys.path`` meanwhile, so it may import files
beside it); the class or function named in it called with the arguments it takes; the model it
returns checked to map a ``[B, 1, 28, 28]`` batch to ``[B, 10]``. Anything their code raises is
one ``ModelCodeError`` naming their file and line (the original chained for a debug traceback).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import os
import re
import sys
import sysconfig
import traceback
import types
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from mnistkit.usermodels.definitions import definitions
from mnistkit.errors import MnistkitError, ModelCodeError, RunError, UsageError

if TYPE_CHECKING:  # pragma: no cover
    from mnistkit.usermodels.modelref import ModelSource

__all__ = ["user_code", "read_source", "exec_file", "attribute", "description", "call_builder", "check_output",
           "no_dropout_at"]

MAX_SOURCE_BYTES = 1 << 20        # a model file is a few KiB
CHECK_INPUT = (2, 1, 28, 28)


@contextlib.contextmanager
def user_code(path: str | None, what: str) -> Iterator[None]:
    """An exception raised by the user's code is one ModelCodeError naming their file and line
    (the original is chained, for a debug run's whole traceback). Warnings their code causes
    (torch's "Initializing zero-element tensors is a no-op" for a width of 0) are not printed:
    what goes wrong is said in that one line."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    except (MnistkitError, KeyboardInterrupt):
        raise
    except BaseException as exc:  # noqa: BLE001 - anything their code raises: SystemExit, GeneratorExit, their own
        raise ModelCodeError(f"{what} failed: {_where_it_failed(exc, path)}") from exc


def _where_it_failed(exc: BaseException, path: str | None) -> str:
    try:
        detail = (str(exc).strip().splitlines() or [""])[0][:200]
    except BaseException:  # noqa: BLE001 - an exception whose __str__ raises in turn
        detail = "(its message cannot be shown)"
    if isinstance(exc, SyntaxError) and exc.filename:
        return f"{exc.filename}, line {exc.lineno}: SyntaxError: {exc.msg}"
    frames = traceback.extract_tb(exc.__traceback__)
    mine = str(Path(__file__).parent.parent)
    ours = [f for f in frames if path and f.filename == path] or \
        [f for f in frames if not f.filename.startswith((mine, str(Path(torch_dir()))))]
    frame = (ours or frames or [None])[-1]
    at = f"{frame.filename}, line {frame.lineno}, in {frame.name}: " if frame is not None else ""
    return f"{at}{type(exc).__name__}{': ' + detail if detail else ''}"


def torch_dir() -> str:
    import torch

    return str(Path(torch.__file__).parent)


@contextlib.contextmanager
def _siblings(folder: str | None) -> Iterator[None]:
    """While a model file of the user's runs, ``import helpers`` finds the ``helpers.py`` beside
    it, and only that one: the folder comes first on the path (as for a script Python runs), a
    module of the same name that another folder gave is hidden meanwhile, and what this folder
    gave is taken out of ``sys.modules`` afterwards (the file's own module keeps its references).
    ``folder`` None (a file named with ``--model-code``, a run folder's copy): nothing beside the
    file is imported."""
    if folder is None:
        yield
        return
    installed = {os.path.realpath(p) for p in (sysconfig.get_paths()[k] for k in ("stdlib", "purelib", "platlib"))}

    def from_user_folder(module: Any) -> bool:
        file = getattr(module, "__file__", None)
        return bool(file) and not any(os.path.realpath(file).startswith(p + os.sep) for p in installed)

    here = {Path(e).stem for e in os.listdir(folder) if e.endswith(".py") or os.path.isdir(os.path.join(folder, e))} \
        if os.path.isdir(folder) else set()
    inside = os.path.realpath(folder) + os.sep
    hidden = {n: m for n, m in sys.modules.items() if n.split(".")[0] in here and from_user_folder(m)
              and not n.startswith("mnistkit") and not os.path.realpath(m.__file__).startswith(inside)}
    for name in hidden:
        del sys.modules[name]
    before = set(sys.modules)
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    try:
        yield
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(folder)
        for name in set(sys.modules) - before:   # what this folder gave
            file = getattr(sys.modules[name], "__file__", None)
            if file and os.path.realpath(file).startswith(inside):
                del sys.modules[name]
        sys.modules.update(hidden)


_LOADED: dict[tuple[str, str, str | None, bool], types.ModuleType] = {}


def read_source(path: Path, what: str) -> tuple[str, str]:
    """(text, sha256) of a model file, read once and bounded."""
    from mnistkit.files.safeio import read_bytes_bounded

    raw = read_bytes_bounded(path, MAX_SOURCE_BYTES, UsageError, what)
    try:
        return raw.decode("utf-8"), hashlib.sha256(raw).hexdigest()
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not UTF-8 text; it is not {what} file") from None


def exec_file(text: str, path: str, sha256: str, needed: str | None = None, siblings: bool = True,
              package: str | None = None) -> types.ModuleType:
    """The definitions of the source ``text`` (whose hash is ``sha256``) that ``needed`` uses,
    run as a module of its own whose file is ``path`` (see ``definitions``); ``siblings``: the
    files beside it may be imported; ``package``: the package its relative imports start from."""
    if hashlib.sha256(text.encode("utf-8")).hexdigest() != sha256:
        raise RunError(f"the model source of {path} does not match its SHA-256; it was damaged on the way")
    needed = needed.split(".")[0] if needed else None
    key = (path, sha256, needed, siblings)
    if key in _LOADED:
        return _LOADED[key]
    code = compile(definitions(text, path, needed), path, "exec", dont_inherit=True)
    name = f"mnistkit_user.{re.sub(r'[^A-Za-z0-9_]+', '_', Path(path).stem)}_{sha256[:12]}_{len(_LOADED)}"
    module = types.ModuleType(name)
    module.__file__ = path
    if package:
        module.__package__ = package
    sys.modules[name] = module
    try:
        with user_code(path, f"importing {path}"), _siblings(str(Path(path).parent) if siblings else None):
            exec(code, module.__dict__)  # noqa: S102 - the definitions of the user's own file
    except BaseException:
        sys.modules.pop(name, None)
        raise
    _LOADED[key] = module
    return module



def _candidates(module: types.ModuleType) -> tuple[list[str], list[str]]:
    """The nn.Module classes and the functions a module defines itself (not imports)."""
    from torch import nn

    own = [(n, v) for n, v in vars(module).items() if getattr(v, "__module__", None) == module.__name__
           and not n.startswith("_")]
    classes = [n for n, v in own if inspect.isclass(v) and issubclass(v, nn.Module)]
    functions = [n for n, v in own if inspect.isfunction(v)]
    return classes, functions


def _listing(module: types.ModuleType) -> str:
    classes, functions = _candidates(module)
    parts = [f"its nn.Module classes: {', '.join(classes)}" if classes else "it defines no nn.Module class",
             f"its functions: {', '.join(functions)}" if functions else "no function"]
    return "; ".join(parts)


def attribute(module: types.ModuleType, attr: str | None, where: str, package: str | None = None) -> tuple[str, Any]:
    """The class or function ``attr`` names in ``module`` (its only nn.Module class when None);
    ``package``: the module's import name, whose own modules a package's builder may come from."""
    if attr is None:
        classes, _ = _candidates(module)
        if len(classes) == 1:
            return classes[0], getattr(module, classes[0])
        raise UsageError(f"{where}: name the model to build, e.g. {where}:{(classes or ['Net'])[0]}; "
                         f"{_listing(module)}", key="model")
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"{where} has no {attr!r}; {_listing(module)}", key="model")
        obj = getattr(obj, part)
    from torch import nn

    # only what builds a model is ever called: an nn.Module class, or a function the file itself
    # defines (not one it imports: 'from subprocess import run' makes no model builder of run)
    home = getattr(obj, "__module__", None) or ""
    if callable(obj) and not isinstance(obj, nn.Module) and not (inspect.isclass(obj) and issubclass(obj, nn.Module)) \
            and home != module.__name__ and not (package and (home == package or home.startswith(package + "."))):
        raise UsageError(f"{where}:{attr} is {getattr(obj, '__module__', None) or 'a'}.{getattr(obj, '__qualname__', type(obj).__name__)},"
                         f" not an nn.Module class or a function {where} defines; write a function there that "
                         f"returns the model ({_listing(module)})", key="model")
    return attr, obj


def description(obj: Any) -> str:
    """The first line of the object's own docstring: a class's, never one it inherits (a class without
    one is not "Base class for all neural network modules.")."""
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else getattr(obj, "__doc__", None)
    lines = inspect.cleandoc(doc).splitlines() if isinstance(doc, str) else []
    return lines[0].strip()[:200] if lines else ""


def no_dropout_at(source: ModelSource, model_kwargs: dict[str, Any]) -> None:
    if model_kwargs.get("dropout_at", "model") != "model":
        raise UsageError(f"dropout_at {model_kwargs['dropout_at']} rearranges mnistkit's registered models only; "
                         f"{source.shown} places its own Dropout (use dropout_at: model)", key="dropout_at")


def call_builder(obj: Any, source: ModelSource, model_kwargs: dict[str, Any]) -> tuple[Any, list[str]]:
    from torch import nn

    where = source.reference if source.kind != "registered" else source.name
    if isinstance(obj, nn.Module):
        raise UsageError(f"{where} is an nn.Module object, not a class or a function that builds one: mnistkit "
                         "builds a fresh model for every run (e.g. def build(): return nn.Sequential(...))", key="model")
    if not callable(obj):
        raise UsageError(f"{where} is {type(obj).__name__}, not an nn.Module class or a function returning one",
                         key="model")
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        params = {}
    if inspect.isclass(obj) and obj.__init__ is nn.Module.__init__:  # no __init__ of its own: takes nothing
        params = {}
    open_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    given = source.kwargs
    unknown = [k for k in given if k not in params and not open_kw]
    if unknown:
        takes = ", ".join(n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
        raise UsageError(f"{where} takes no argument {', '.join(map(repr, unknown))} (it takes: {takes or 'none'})",
                         key="model_args")
    notes = []
    for key, value in model_kwargs.items():
        if key in params or open_kw:
            given.setdefault(key, value)
        elif key == "dropout_at":
            no_dropout_at(source, model_kwargs)
        elif key == "dropout" and source.kind != "registered":
            notes.append(f"{source.name} takes no dropout argument: the recipe's dropout ({value:g}) does not reach "
                         "it; its own Dropout layers train as written")
    missing = [n for n, p in params.items() if p.default is p.empty and n not in given
               and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if missing:
        raise UsageError(f"{where} needs {', '.join(missing)}: give {'them' if len(missing) > 1 else 'it'} as "
                         f"model_args in the change-log, or on the command line (--model-arg {missing[0]}=VALUE)",
                         key="model_args")
    folder = str(Path(source.path).parent) if source.path and source.siblings else None
    with user_code(source.path, f"building {where}"), _siblings(folder):
        model = obj(**given)
    if not isinstance(model, nn.Module):
        raise UsageError(f"{where} returned {type(model).__name__}, not an nn.Module", key="model")
    return model, notes


def check_output(model: Any, source: ModelSource, check: bool) -> Any:
    """A model must map a [B, 1, 28, 28] batch to [B, 10] class scores: said before training."""
    if not check:
        return model
    import torch

    was = model.training
    model.eval()
    try:
        with torch.no_grad(), user_code(source.path, f"running {source.shown} on a {list(CHECK_INPUT)} batch"):
            out = model(torch.zeros(CHECK_INPUT))
    finally:
        model.train(was)
    got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if got != [CHECK_INPUT[0], 10]:
        raise UsageError(f"{source.shown} returns {got} for a {list(CHECK_INPUT)} batch of digits, not "
                         f"[{CHECK_INPUT[0]}, 10] class scores: end the model with 10 outputs per image", key="model")
    return model


def module_file(name: str) -> Path | None:
    """The file ``import name`` would run, found as the import system finds it (packages before
    extension modules before sources, entry by entry of sys.path) but without importing anything:
    no package's ``__init__`` runs. None where it is not a file of a folder on the path."""
    from importlib.machinery import PathFinder

    parts = name.split(".")
    if not name or not all(p.isidentifier() for p in parts):
        return None
    search: Any = None   # sys.path
    spec = None
    for i, part in enumerate(parts):
        spec = PathFinder.find_spec(".".join(parts[:i + 1]) if search is not None else part, search)
        if spec is None:
            return None
        search = spec.submodule_search_locations
        if i < len(parts) - 1 and search is None:
            return None
    origin = getattr(spec, "origin", None)
    return Path(origin).resolve() if origin and origin not in ("built-in", "frozen") and Path(origin).is_file() else None
