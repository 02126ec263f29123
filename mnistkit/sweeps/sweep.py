"""Sweeps: many ordinary trainings of a grid (or a random search) of recipes over seeds, in
local worker processes by default or as Ray tasks on a cluster. Every trial writes an ordinary
run folder ``<runs-dir>/<sweep-name>/<trial>``, named from its settings, so ``evaluate``,
``compare`` and ``runs`` read it unchanged and ``--resume`` finds what is done.

A spec file::

    name: i3-lr            # the sweep's folder under the runs folder
    models: [I3]           # iterations of the change-log (or model: I3)
    seeds: [1, 2, 3]       # or a count: 3 means seeds 1, 2, 3
    grid: {lr: [0.1, 0.2]} # recipe keys to vary: every combination
    random: {n: 4, seed: 0, lr: {min: 0.05, max: 0.4, log: true}}  # or a random search
    recipe: {epochs: 15}   # fixed for every trial
    data: {dataset: mnist, data_dir: ../shared/mnist, val: 0}
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from mnistkit.errors import MnistkitError, RunError, TrainingDiverged, TrainingInterrupted, UsageError
from mnistkit.runs.comparable import CONSISTENT_EPOCHS, at_target
from mnistkit.runs.lock import LOCK_NAME, FolderLock
from mnistkit.recipe import DEFAULT_RUNS_DIR, DataOptions, Recipe
from mnistkit.sweeps.spec import MAX_TRIALS, SweepSpec, Trial, load_spec, trial_recipe  # noqa: F401 (the sweep API)

# --------------------------------------------------------------------------- running trials


def run_trial(payload: dict[str, Any]) -> dict[str, Any]:
    """One trial in this process (a worker): train it, resume it if it was interrupted, or
    skip it if it finished. Never raises for a trial's own failure: it is recorded."""
    import torch

    if payload.get("keep_memory"):   # what the CLI asks for its own process, asked here by its worker
        from mnistkit.backends.memory import keep_freed_memory

        keep_freed_memory()
    threads = torch.get_num_threads()
    torch.set_num_threads(payload["threads"])
    try:
        return _run_trial(payload)
    finally:
        torch.set_num_threads(threads)   # a trial run in the caller's process leaves its threads as they were
        if payload.get("keep_memory"):
            from mnistkit.backends.memory import release_memory

            release_memory()


def _run_trial(payload: dict[str, Any]) -> dict[str, Any]:
    from mnistkit.runs import summarize_run
    from mnistkit.training.loop import resume, train

    trial: Trial = payload["trial"]
    root = Path(payload["root"])
    folder = root / trial.name
    record = {"trial": trial.name, "config": trial.config, "seed": trial.seed, "run": str(folder)}
    try:
        if folder.exists():
            summary = summarize_run(folder)
            state = summary.state
            if state == "finished":
                return {**record, "status": "finished", "skipped": True}
            if state == "training":
                return {**record, "status": "failed", "error": f"{folder} is being trained by another process "
                                                               f"({summary.why}); wait for it to end"}
            if state != "interrupted":
                return {**record, "status": state, "error": f"{folder} is {state}; remove it to run the trial again"}
            resume(folder, device=payload["device"], model=trial.source)
        else:   # the recipe the spec resolved: a worker needs neither the change-log nor the spec
            recipe = Recipe.from_dict(payload["trial_recipe"], where=f"trial {trial.name}")
            train(trial.source, recipe, DataOptions.from_dict(payload["data"]), device=payload["device"],
                  runs_dir=root, run_name=trial.name, experiments=payload.get("experiments"),
                  teachers_dir=payload.get("runs_dir"))   # a teacher named by its iteration: the sweep's runs folder
        return {**record, "status": "finished", "skipped": False}
    except TrainingDiverged as exc:
        return {**record, "status": "diverged", "error": str(exc)}
    except (TrainingInterrupted, KeyboardInterrupt):
        return {**record, "status": "interrupted", "error": "interrupted"}
    except MnistkitError as exc:
        return {**record, "status": "failed", "error": str(exc)}
    except Exception as exc:  # a bug or a broken worker: recorded, the sweep goes on
        return {**record, "status": "failed", "error": f"{type(exc).__name__}: {exc}"}


def _ray_trial(payload: dict[str, Any]) -> dict[str, Any]:
    """A trial on a Ray worker: trained in a scratch folder there (from the files of a partial
    run, if it was interrupted), and its run folder's files sent back."""
    scratch = Path(tempfile.mkdtemp(prefix="mnistkit-trial-"))
    try:
        trial: Trial = payload["trial"]
        if payload.get("existing"):
            (scratch / trial.name).mkdir()
            for name, raw in payload["existing"].items():
                (scratch / trial.name / name).write_bytes(raw)
        record = run_trial({**payload, "root": str(scratch), "existing": None})
        folder = scratch / trial.name
        files = ({p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != LOCK_NAME}
                 if folder.is_dir() else {})
        return {**record, "files": files}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def default_workers() -> int:
    return max(1, os.cpu_count() or 1)


def run_sweep(spec: SweepSpec, runs_dir: str | os.PathLike = DEFAULT_RUNS_DIR, workers: int | None = None,
              ray: str | None = None, device: str = "auto", resume: bool = False,
              on_result: Callable[[dict[str, Any], int], None] | None = None,
              keep_memory: bool = False, threads: int | None = None) -> list[dict[str, Any]]:
    """Run every trial of ``spec`` (those not finished yet when ``resume``); returns one record
    per trial, in the spec's order. Local workers by default; ``ray`` = ``auto``, an address,
    or ``local`` (an embedded Ray on this machine) runs them as Ray tasks. ``device``: as
    ``train``'s (``auto``: cuda, then mps, then cpu). ``threads``: torch's threads in each trial
    (default: the cores shared out between the workers); every run records it. ``keep_memory``:
    each worker keeps freed memory for reuse (``backends.memory``; the CLI asks for it)."""
    root = Path(runs_dir) / spec.name
    if root.is_dir() and any(p.name != LOCK_NAME for p in root.iterdir()) and not resume:
        raise UsageError(f"{root} already holds trials of this sweep; add --resume to run only what is missing, "
                         "or --report to see them")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:   # the runs folder a file, read-only, ...
        raise RunError(f"cannot create the sweep folder {root}: {exc.strerror or exc}; choose a runs folder you "
                       "can write to") from None
    lock = FolderLock.acquire(root, "sweep")   # two sweeps of one folder at once trained trials twice
    try:
        return _sweep(spec, root, workers, ray, device, on_result, keep_memory, threads)
    finally:
        lock.release()


def _sweep(spec: SweepSpec, root: Path, workers: int | None, ray: str | None, device: str,
           on_result: Callable[[dict[str, Any], int], None] | None, keep_memory: bool,
           threads: int | None = None) -> list[dict[str, Any]]:
    workers = workers or default_workers()
    if workers < 1:
        raise UsageError("workers must be at least 1")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise UsageError(f"threads must be a positive whole number, not {threads!r}", key="threads")
    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    base = {"root": str(root), "runs_dir": str(root.parent.resolve()), "recipe": spec.recipe,
            "data": spec.data.to_dict(), "device": device,
            "experiments": spec.experiments, "threads": threads, "keep_memory": keep_memory}
    payloads = [{**base, "trial": t, "trial_recipe": spec.recipes[t.name].to_dict()} for t in spec.trials]
    done: dict[str, dict[str, Any]] = {}

    def finished(record: dict[str, Any]) -> None:
        done[record["trial"]] = record
        if on_result:
            on_result(record, len(done))

    if ray:
        _run_ray(payloads, ray, root, threads, finished)
    else:
        _run_local(payloads, workers, finished)
    return [done.get(t.name, {"trial": t.name, "config": t.config, "seed": t.seed, "status": "not run"})
            for t in spec.trials]


def _run_local(payloads: list[dict[str, Any]], workers: int, finished: Callable) -> None:
    if workers == 1:  # in this process: no start-up cost, and Ctrl-C reaches the trial directly
        for p in payloads:
            record = run_trial(p)
            finished(record)
            if record["status"] == "interrupted":
                raise KeyboardInterrupt
        return
    from mnistkit.sweeps.workers import run_in_workers

    run_in_workers(run_trial, payloads, workers, finished)


def _ray_token() -> bool:
    """Whether a Ray token is at hand where Ray looks for one (its variables, ~/.ray/auth_token)."""
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.join(os.path.expanduser("~"), ".ray", "auth_token")
    return bool(os.environ.get("RAY_AUTH_TOKEN")) or os.path.isfile(path)


def _connect_ray(address: str) -> Any:
    """Ray, connected: ``local`` starts one in this process, else the cluster at ``address``.
    ``ray start --head`` (Ray >= 2.59) enables token authentication; a client reads
    RAY_AUTH_MODE when ray is imported, so where a token is at hand and the user chose no mode,
    token mode is set before the import (it also reaches clusters without authentication).
    Ray's own log lines stay out of the user's terminal unless they are errors."""
    import logging

    if address != "local" and "ray" not in sys.modules and "RAY_AUTH_MODE" not in os.environ and _ray_token():
        os.environ["RAY_AUTH_MODE"] = "token"
    try:
        import ray
    except ImportError:
        raise MnistkitError("running trials on Ray needs ray, which is not installed; install it with "
                            "pip install 'mnistkit[ray]' (or pip install ray)") from None
    if ray.is_initialized():
        return ray
    quiet = {"log_to_driver": False, "logging_level": logging.ERROR, "configure_logging": True}
    try:
        if address == "local":
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, **quiet)
        else:
            ray.init(address=address, **quiet)
    except Exception as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:150]
        if "auth" in f"{type(exc).__name__} {exc}".lower():
            raise MnistkitError(f"the Ray cluster at {address!r} refused the connection: it needs its token "
                                f"({first}); copy the head's ~/.ray/auth_token here (ray get-auth-token on the "
                                "head prints it) or set RAY_AUTH_TOKEN") from None
        hint = "" if _ray_token() else (" (a cluster started with token authentication, Ray's default since 2.59, "
                                        "also refuses a client without its token: ~/.ray/auth_token)")
        raise MnistkitError(f"cannot reach the Ray cluster at {address!r} ({first}); start it with "
                            f"'ray start --head' or give its address (HEAD:6379){hint}") from None
    return ray


def _run_ray(payloads: list[dict[str, Any]], address: str, root: Path, threads: int, finished: Callable) -> None:
    from mnistkit.files.outputs import atomic_write

    ray = _connect_ray(address)
    remote = ray.remote(num_cpus=threads, max_retries=0)(_ray_trial)
    refs = {}
    for p in payloads:
        folder = root / p["trial"].name
        existing = ({q.name: q.read_bytes() for q in folder.iterdir() if q.is_file() and q.name != LOCK_NAME}
                    if folder.is_dir() else None)
        refs[remote.remote({**p, "existing": existing})] = p
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        p = refs[ready[0]]
        try:
            record = ray.get(ready[0])
        except Exception as exc:  # the worker died
            record = {"trial": p["trial"].name, "config": p["trial"].config, "seed": p["trial"].seed,
                      "status": "failed", "error": f"the Ray task failed: {str(exc).splitlines()[0][:200]}"}
        files = record.pop("files", {}) or {}
        if files and not record.get("skipped"):
            folder = root / record["trial"]
            folder.mkdir(parents=True, exist_ok=True)
            for name, raw in files.items():
                atomic_write(folder / name, raw)
        record["run"] = str(root / record["trial"])
        finished(record)


# --------------------------------------------------------------------------- the report


def sweep_report(spec: SweepSpec, runs_dir: str | os.PathLike = DEFAULT_RUNS_DIR) -> dict[str, Any]:
    """Per configuration, from the run folders: trials done, final test (and validation)
    accuracy mean ± std and min, and how many trials pass the change-log's constraints."""
    from mnistkit.results.compare import stats
    from mnistkit.experiments import find_experiments
    from mnistkit.runs import read_config, read_metrics, summarize_run

    exp = find_experiments(spec.experiments)
    c = exp.constraints
    root = Path(runs_dir) / spec.name
    configs: dict[str, dict[str, Any]] = {}
    for t in spec.trials:
        row = configs.setdefault(t.config, {"config": t.config, "model": t.model, "values": dict(t.overrides),
                                            "trials": 0, "done": 0, "failed": 0, "finals": [], "vals": [],
                                            "passing": 0, "seeds_done": [], "trained_on": None})
        row["trials"] += 1
        folder = root / t.name
        if not folder.exists():
            continue
        summary = summarize_run(folder)
        if summary.state in ("diverged", "damaged"):
            row["failed"] += 1
        if summary.state != "finished":
            continue
        metrics = read_metrics(folder)
        on = read_config(folder).measured_on
        row["trained_on"] = row["trained_on"] or {"dataset": on.get("dataset"), "train_samples": on.get("train_samples"),
                                                  "val_samples": on.get("val_samples"), "epochs": len(metrics)}
        final = metrics[-1]
        row["done"] += 1
        row["seeds_done"].append(t.seed)
        row["finals"].append(final.test_acc)
        if final.val_acc is not None:
            row["vals"].append(final.val_acc)
        target = c.get("min_test_acc")
        ok = target is None or all(at_target(metrics, target))
        if "max_epochs" in c:
            ok = ok and len(metrics) < c["max_epochs"]
        row["passing"] += ok
    rows = []
    for row in configs.values():
        finals, vals = row.pop("finals"), row.pop("vals")
        row["test_acc"] = stats(finals)
        row["val_acc"] = stats(vals)
        rows.append(row)
    return {"sweep": spec.name, "spec": str(spec.path), "runs": str(root), "varied": list(spec.varied),
            "constraints": c, "passing_means": f"final test accuracy and each of the last {CONSISTENT_EPOCHS} epochs at the target, "
                                               "fewer epochs than the limit", "configs": rows}
