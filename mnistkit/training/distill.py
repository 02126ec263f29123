"""Knowledge distillation (Hinton et al., 2015): a finished run, the teacher, is rebuilt once, in
eval mode and without gradients, and the model trained also matches its softened outputs on the
same augmented batch:

    loss = (1 - alpha) * CE(model, y) + alpha * T^2 * KL(softmax(teacher / T) || softmax(model / T))

The recipe names the teacher (``teacher``: a run folder, or a change-log iteration whose best
comparable run teaches); the run records the run it used (folder, model, SHA-256 of its
checkpoint, its test accuracy), and a resumed run continues with that very checkpoint. The
teacher's final weights teach (``last.pt``), never an epoch chosen on the test set.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mnistkit.errors import MnistkitError, RunError, UsageError
from mnistkit.usermodels.usercode import user_code

__all__ = ["distillation_loss", "Teacher", "TeacherRef", "find_teacher", "load_teacher"]

MAX_CHAIN = 16   # teachers of teachers followed when looking for a cycle


def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, y: torch.Tensor, alpha: float,
                      temperature: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """``(1 - alpha) * CE + alpha * T^2 * KL(softmax(teacher/T) || softmax(logits/T))``, the KL
    averaged over the batch (``batchmean``: the mathematical KL per image). Log-probabilities
    (a ``log_softmax`` head) work as logits do: a softmax does not see the shift."""
    ce = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
    t = temperature
    kl = F.kl_div(F.log_softmax(logits.float() / t, dim=1), F.log_softmax(teacher_logits.float() / t, dim=1),
                  reduction="batchmean", log_target=True)
    return (1 - alpha) * ce + alpha * t * t * kl


@dataclass
class Teacher:
    """A rebuilt teacher: eval mode, BatchNorm folded, no gradients; ``loss`` is what the
    training step minimises in place of the cross-entropy."""

    model: nn.Module
    alpha: float
    temperature: float
    channels_last: bool            # the layout the teacher ran in (a `view` head needs its own)
    renormalise: tuple[float, float] | None   # (scale, shift) from the student's normalisation to its own
    record: dict[str, Any]         # what the run records of it
    users_code: bool = False       # a model of the user's own: its errors are one line naming their file

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        guard = user_code(None, f"running the teacher {self.record['model']}") if self.users_code else \
            contextlib.nullcontext()
        with guard, torch.no_grad():
            if self.renormalise is not None:
                x = x * self.renormalise[0] + self.renormalise[1]
            fmt = torch.channels_last if self.channels_last else torch.contiguous_format
            return self.model(x.contiguous(memory_format=fmt))

    def loss(self, logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor, label_smoothing: float) -> torch.Tensor:
        return distillation_loss(logits, self.logits(x), y, self.alpha, self.temperature, label_smoothing)


@dataclass(frozen=True)
class TeacherRef:
    """Where a run's teacher is: the places to look (the recorded folder, then where a moved
    project has it), the checkpoint a resumed run recorded, and the runs folder (for the relpath)."""

    places: tuple[Path, ...]
    sha256: str | None = None
    runs_dir: str | os.PathLike | None = None
    run_dir: Path | None = None

    @classmethod
    def recorded(cls, record: dict[str, Any], run_dir: Path) -> "TeacherRef":
        places = [Path(record["run"])]
        if record.get("relpath"):
            places.append(Path(run_dir).parent / record["relpath"])
        return cls(tuple(places), record["sha256"], Path(run_dir).parent, Path(run_dir))


def find_teacher(spec: str, runs_dir: str | os.PathLike, experiments: Any = None, data: Any = None) -> Path:
    """The run folder a recipe's ``teacher`` names: a run folder, or a change-log iteration's run in
    ``runs_dir``: for a run on the whole official training set, the newest comparable run of the
    iteration; for a shorter or held-out run (``data``: a limit, a validation split, synthetic
    digits), the newest finished run of the iteration's model on those very data. Never chosen by
    its test accuracy: that would choose the teacher on the test set."""
    from mnistkit.recipe import DataOptions, expand_path

    path = Path(expand_path(spec))
    if (path / "config.yaml").is_file():
        return path
    from mnistkit.experiments import Experiments, find_experiments

    exp = experiments if isinstance(experiments, Experiments) else find_experiments(experiments)
    if spec.lower() not in {it.id.lower() for it in exp.iterations}:
        raise UsageError(f"teacher {spec!r} is neither a run folder nor an iteration of {exp.path} "
                         f"({', '.join(it.id for it in exp.iterations)}): name a finished run's folder or an iteration",
                         key="teacher", detail="is neither a run folder nor an iteration")
    from mnistkit.runs.comparable import iteration_runs, read_runs
    from mnistkit.usermodels.modelref import build
    from mnistkit.recipe import Recipe

    data = data or DataOptions()
    it = exp.iteration(spec)
    source = exp.model_source(it)
    wanted = Recipe.from_dict(exp.recipe_for(it), where=f"{exp.path} ({it.id})")
    model, _ = build(source, wanted.model_kwargs())
    runs = read_runs(runs_dir)[0]
    records = iteration_runs(runs, it, wanted, None, source.with_architecture(model))
    if data.dataset == "mnist" and data.limit is None and not data.val:
        found, what = [r["run"] for r in records if r["comparable"]], "comparable run"
        how = f"train one first (mnistkit train {it.id})"
    else:
        data_of = {str(run): config.data for run, config, _ in runs}
        same = lambda d: (d.dataset, d.limit, d.val, d.val_seed) == (data.dataset, data.limit, data.val, data.val_seed)
        found = [r["run"] for r in records if not r["model_changed"] and r["epochs"] == r["planned_epochs"]
                 and same(data_of[r["run"]])]
        what = f"finished run on the data this run trains on ({data.dataset}, limit {data.limit}, val {data.val})"
        how = f"train one first with the same data options (mnistkit train {it.id} ...)"
    if not found:
        raise UsageError(f"teacher {it.id}: {runs_dir} has no {what} of {it.id}; {how}, or name a run folder",
                         key="teacher", detail=f"has no {what}")
    return Path(found[-1])   # runs are read oldest first


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError as exc:
        raise RunError(f"teacher {path} cannot be read ({exc.strerror or exc})") from None
    return h.hexdigest()


def load_teacher(ref: TeacherRef, recipe: Any, data: Any, device: torch.device, student: Any) -> Teacher:
    """Rebuild the teacher from the first of ``ref.places`` that is its run (``ref.sha256``: the
    checkpoint a resumed run recorded, which must be the one found). Every way a teacher cannot teach this run is
    one line: not a finished run, damaged, trained on the images this run holds out for
    validation, not taking 1x28x28 images, or taught, at some remove, by this very model (a cycle)."""
    from mnistkit.training.evaluation import checkpoint_recipe, fold_batchnorm, guarded, load_model
    from mnistkit.runs.checkpoint import load_checkpoint
    from mnistkit.runs import read_config, read_metrics

    places, sha256, run_dir = list(ref.places), ref.sha256, ref.run_dir
    found = [p for p in places if (p / "last.pt").is_file()]
    if sha256 is not None:
        match = next((p for p in found if _sha256(p / "last.pt") == sha256), None)
        if match is None:
            state = f"{found[0] / 'last.pt'} now has other content" if found else f"{places[0]} is missing"
            raise RunError(f"this run was taught by a checkpoint with SHA-256 {sha256[:16]}...; {state}: it can "
                           "only continue with the teacher it started with")
        found = [match]
    if not found:
        raise UsageError(f"teacher {places[0]} has no last.pt: a teacher is a finished run's folder", key="teacher",
                         detail="has no last.pt")
    where = found[0]
    try:
        config, metrics = read_config(where), read_metrics(where)
    except MnistkitError as exc:
        raise RunError(f"teacher {where}: {exc}") from None
    if not metrics or metrics[-1].epoch != config.recipe.epochs:
        done = metrics[-1].epoch if metrics else 0
        raise UsageError(f"teacher {where} finished {done} of its {config.recipe.epochs} epochs: a teacher is a "
                         "finished run (resume it first)", key="teacher", detail="is not a finished run")
    if config.data.dataset != data.dataset:
        raise UsageError(f"teacher {where} trained on {config.data.dataset} digits, this run trains on {data.dataset}: "
                         "a teacher is trained on the data it teaches", key="teacher", detail="trained on other data")
    if data.val and (config.data.val, config.data.val_seed, config.data.limit) != (data.val, data.val_seed, data.limit):
        raise UsageError(f"teacher {where} trained on images this run holds out for validation (it held out "
                         f"{config.data.val:,} with val_seed {config.data.val_seed}, this run {data.val:,} with "
                         f"val_seed {data.val_seed}): train the teacher with the same --val, or train without one",
                         key="teacher", detail="trained on the validation images")
    _check_cycle(where, config, student, run_dir)
    path = where / "last.pt"
    digest = sha256 if sha256 is not None else _sha256(path)   # a resumed run's: matched above
    try:
        ckpt = load_checkpoint(path)
        own = checkpoint_recipe(ckpt, str(path))
        with torch.random.fork_rng(devices=[]):   # building it draws weights: the student's stream stays its own
            model = load_model(ckpt, own, path).to(device)
    except MnistkitError as exc:
        raise type(exc)(f"teacher {where}: {exc}") from None
    if _sha256(path) != digest:   # replaced while it was read
        raise RunError(f"teacher {path} changed while it was read; try again")
    model = fold_batchnorm(model, own.channels_last).eval().requires_grad_(False)
    try:
        with guarded(ckpt), torch.no_grad():
            out = model(torch.zeros(2, 1, 28, 28, device=device).contiguous(
                memory_format=torch.channels_last if own.channels_last else torch.contiguous_format))
    except (MnistkitError, RuntimeError) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise UsageError(f"teacher {where} ({config.model}) cannot take the 1x28x28 images this run trains on: "
                         f"{reason}", key="teacher", detail="cannot take 1x28x28 images") from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, 10):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UsageError(f"teacher {where} ({config.model}) gives {shape} for two 1x28x28 images, not 10 class "
                         "scores each", key="teacher", detail="does not give 10 class scores")
    renormalise = None
    if (own.mean, own.std) != (recipe.mean, recipe.std):   # the teacher sees the images as it was trained to
        renormalise = (recipe.std / own.std, (recipe.mean - own.mean) / own.std)
    record = {"run": str(where.resolve()), "model": config.model, "checkpoint": "last.pt", "sha256": digest,
              "epoch": metrics[-1].epoch, "test_acc": metrics[-1].test_acc, "params": _params(ckpt)}
    if ref.runs_dir is not None:
        with contextlib.suppress(ValueError):   # another drive: the absolute path only
            record["relpath"] = os.path.relpath(where.resolve(), Path(ref.runs_dir).resolve())
    kind = (ckpt.get("model_source") or {}).get("kind") if isinstance(ckpt.get("model_source"), dict) else None
    return Teacher(model, recipe.distill_alpha, recipe.distill_temperature, own.channels_last, renormalise, record,
                   users_code=kind in ("file", "module", "instance"))


def _params(ckpt: dict[str, Any]) -> int | None:
    params = ckpt.get("params")
    return params if isinstance(params, int) and not isinstance(params, bool) else None


def _check_cycle(where: Path, config: Any, student: Any, run_dir: Path | None) -> None:
    """A teacher taught, directly or through its own teachers, by the model being trained is one line."""
    from mnistkit.runs import read_config

    chain, seen = [where], {where.resolve()}
    record = config.teacher
    for _ in range(MAX_CHAIN):
        if record is None:
            return
        nxt = Path(record["run"])
        if run_dir is not None and nxt.resolve() == Path(run_dir).resolve():
            raise UsageError(f"teacher {where} was taught by this very run ({run_dir}): a cycle", key="teacher",
                             detail="a cycle")
        try:
            cfg = read_config(nxt)
        except MnistkitError:
            return   # a teacher's teacher that is gone cannot be this model's run
        if cfg.model_source is not None and student is not None and cfg.model_source.same_model(student):
            path = " <- ".join(str(p) for p in [*chain, nxt])
            raise UsageError(f"teacher {where} was taught by {student.name} itself ({path}): a cycle; choose a "
                             "teacher trained without this model", key="teacher", detail="a cycle")
        if nxt.resolve() in seen:
            return
        chain.append(nxt)
        seen.add(nxt.resolve())
        record = cfg.teacher

