"""Rebuilding a run's model from what the run recorded (its config or checkpoint): a record
names only what its kind allows, and Python code runs only where its content is content the
user named (``trust.py``): the recorded file, the same file where a moved or copied project now
has it, or the run folder's own copy. ``read_record`` is the one reader of a recorded
``model_source``: bounded, every field checked."""

from __future__ import annotations

import hashlib
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from mnistkit.errors import RunError, UsageError
from mnistkit.usermodels.modelref import KINDS, ModelSource, _check_args, _registered
from mnistkit.usermodels.usercode import module_file, read_source

__all__ = ["from_record", "read_record", "check_identity"]


def from_record(record: Any, where: str, text: str | None = None, model_code: str | Path | None = None,
                fallback_name: str | None = None, run_dir: Path | None = None) -> ModelSource:
    """The model a run (its config or checkpoint) trained, ready to build. ``text`` is a YAML
    architecture's source as the checkpoint holds it; ``model_code`` a Python file the user
    names and trusts; ``run_dir`` the run's folder. A record names only what its kind allows: a
    registered model through the registry; Python code (a file's, a module's) only where its
    content is what the run recorded and this user named that content before (``trust.py``):
    the recorded file, the same file where the project now lies (moved or copied), else the run
    folder's own copy; nothing is imported by a recorded name."""
    from mnistkit.usermodels import trust

    if record is None:   # before 0.10: a registered name
        return _registered(str(fallback_name), (), None, registry_only=True)
    src = read_record(record, where)
    if model_code is not None and src.kind not in ("file", "module"):
        what = {"registered": f"the registered model {src.name}", "yaml": "a YAML architecture it keeps",
                "instance": "a model object (in Python, give evaluate, predict or export the object: model=)"}[src.kind]
        raise UsageError(f"{where} trained {what}: model code is for a run of a Python file's model; drop it",
                         key="model_code")
    copy = Path(run_dir) / src.copy_name if run_dir is not None and src.copy_name else None
    if src.kind == "registered":
        return _registered(src.name, src.args, None, registry_only=True)
    if src.kind == "yaml":
        if text is None and copy is not None and copy.is_file():
            text = read_source(copy, "a YAML architecture")[0]
        if text is None or hashlib.sha256(text.encode("utf-8")).hexdigest() != src.sha256:
            raise RunError(f"{where}: its YAML architecture is missing or does not match its SHA-256; the run "
                           "folder is damaged")
        return replace(src, text=text)
    if src.kind == "instance":
        return src
    if model_code is not None:   # the user's word for this file; in the run folder, for it alone
        path = Path(model_code).resolve()
        code_text, sha = read_source(path, "a Python")
        inside = run_dir is not None and path.parent == Path(run_dir).resolve()   # a received folder's neighbours
        src = replace(src, kind="file", path=str(path), text=code_text, sha256=sha, siblings=not inside)
        trust.remember(path, sha, src.build_key)
        return src
    keep = f" (the run folder keeps a copy: {copy})" if copy is not None and copy.is_file() else ""
    how = f"name the file as the model code (--model-code FILE){keep}"
    places = [Path(src.path)] if src.path else []
    if src.relpath and run_dir is not None:
        places.append(Path(run_dir).parent / src.relpath)
    found = code_text = None
    # the recorded file, then where the moved or copied project has it, then the run folder's copy
    for place in places + ([copy] if copy is not None else []):
        if place.is_file():
            code_text, sha = read_source(place, "a Python")
            if sha == src.sha256:
                found = place.resolve()
                break
    if found is None:
        now = next((p for p in places if p.is_file()), None)
        state = (f"{now} now has other content" if now is not None else f"{src.path or src.reference} is missing")
        raise RunError(f"{where} trained {src.reference} from code with SHA-256 {src.sha256}; {state}: to use a "
                       f"file as it was, {how}")
    if not trust.is_trusted(src.sha256 or "", src.build_key):
        raise RunError(f"{where} names model code {found} (SHA-256 {(src.sha256 or '')[:16]}..., building "
                       f"{src.build_key[:80]}) that you have not used on this machine; mnistkit runs code only from "
                       f"files you name: if you trust it, {how}")
    # the files beside it are imported only where this user named that very file (a received run's
    # relpath or copy brings no neighbours); a module's package only where its name finds that file
    own = trust.trusted_at(found, src.sha256 or "")
    if src.kind == "module" and module_file(src.module or "") != found:
        src = replace(src, kind="file", module=None)
    return replace(src, path=str(found), text=code_text, siblings=own and src.kind == "file")


def check_identity(source: ModelSource, model: Any, where: str) -> None:
    """The model rebuilt is the one the run trained (its recorded architecture), or one line
    naming the first layer that differs. ``model``: the model, or the source of the rebuilt model
    with its architecture (a session's: taken before a backend swapped its layers)."""
    if not source.fingerprint:   # recorded before 0.12
        return
    from mnistkit.usermodels.identity import first_difference

    now = model if isinstance(model, ModelSource) else source.with_architecture(model)
    if now.fingerprint != source.fingerprint:
        raise RunError(f"{where}: the model rebuilt from {source.path or source.reference} is not the one the run "
                       f"trained: {first_difference(list(source.layers), list(now.layers))}")


def read_record(record: Any, where: str) -> ModelSource:
    """A recorded ``model_source`` as a ModelSource; anything else is a damaged run folder."""
    def damaged(what: str) -> RunError:
        return RunError(f"{where}: its model_source {what}; the run folder is damaged")

    if not isinstance(record, dict):
        raise damaged("is not a mapping")
    strings = ("reference", "kind", "name", "path", "relpath", "module", "attr", "sha256", "description", "fingerprint")
    for key in strings:
        value = record.get(key)
        if value is not None and (not isinstance(value, str) or len(value) > 4096):
            raise damaged(f"{key} is not a short text")
    kind = record.get("kind")
    if kind not in KINDS or not record.get("name") or not record.get("reference"):
        raise damaged(f"kind {kind!r} is not one of {', '.join(KINDS)}" if kind not in KINDS else "names no model")
    sha = record.get("sha256")
    if kind in ("file", "module", "yaml") and not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)):
        raise damaged("has no SHA-256")
    if kind in ("file", "module") and not record.get("attr"):
        raise damaged("names no class or function")
    try:
        args = _check_args(record.get("args") or {}, where)
    except UsageError:
        raise damaged("has model_args that are not plain values") from None
    fingerprint, layers = record.get("fingerprint"), record.get("architecture") or []
    if fingerprint is not None and not re.fullmatch(r"[0-9a-f]{64}", fingerprint):
        raise damaged("has a fingerprint that is not a SHA-256")
    from mnistkit.usermodels.identity import MAX_LINE, MAX_LINES

    if not isinstance(layers, list) or len(layers) > MAX_LINES or \
            not all(isinstance(x, str) and len(x) <= MAX_LINE for x in layers):
        raise damaged("has an architecture that is not a list of short lines")
    return ModelSource(record["reference"], kind, record["name"], record.get("path"), record.get("module"),
                       record.get("attr"), sha, args, record.get("description") or "", layers=tuple(layers),
                       fingerprint=fingerprint, relpath=record.get("relpath"))

