"""Local worker processes for a sweep, tied to the sweep's lifetime.

- A worker never outlives the sweep: a thread in each watches its parent, and when the parent
  is gone (SIGKILL, a crash) it sends its own process SIGTERM, which stops the trial in training
  after its last consistent commit (``runs.sigterm_as_interrupt``), then the worker exits
  without starting another trial (a hard exit follows after a grace period).
- Ctrl-C or SIGTERM of the sweep stop every running trial the same way (the sweep sends each
  worker SIGTERM; workers ignore the terminal's SIGINT), and no queued trial starts afterwards:
  a worker whose trial was interrupted runs nothing more.
- Every trial's result is reported once.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any, Callable

__all__ = ["run_in_workers"]

GRACE_SECONDS = 120   # an orphaned worker's trial gets this long to commit before a hard exit
_state = {"stopping": False, "orphaned": False, "in_trial": False}


def _on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM outside a trial's training loop (which turns it into a clean stop of its own): a
    trial that is still starting stops as interrupted; an idle worker only stops taking trials
    (dying here would break the pool and lose the other workers' results), or, orphaned, exits."""
    _state["stopping"] = True
    if _state["in_trial"]:
        raise KeyboardInterrupt
    if _state["orphaned"]:
        os._exit(0)


def _watch(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    _state["stopping"] = _state["orphaned"] = True
    os.kill(os.getpid(), signal.SIGTERM)   # the trial in training stops at its next step, consistently
    time.sleep(GRACE_SECONDS)
    os._exit(1)


def _init(parent: int) -> None:
    if os.getppid() != parent:   # the sweep died while this worker was starting
        os._exit(1)
    # Ctrl-C reaches the whole process group; the sweep alone answers it, by sending each worker
    # SIGTERM (which a trial in training turns into a clean stop), so a worker never dies on it
    # between trials with a traceback of its own
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _on_sigterm)
    threading.Thread(target=_watch, args=(parent,), daemon=True, name="mnistkit-parent-watch").start()


def _trial(run: Callable[[dict[str, Any]], dict[str, Any]], payload: dict[str, Any]) -> dict[str, Any] | None:
    """One trial in a worker, unless the sweep is stopping (None: not started)."""
    if _state["stopping"]:
        return None
    _state["in_trial"] = True
    try:
        record: dict[str, Any] | None = run(payload)
    except KeyboardInterrupt:   # stopped while the trial was still starting: it did not run
        record = None
    finally:
        _state["in_trial"] = False
    if _state["orphaned"]:
        os._exit(0)   # nobody is left to read the result: the run folder holds it
    if record is None or record.get("status") == "interrupted":
        _state["stopping"] = True   # Ctrl-C or SIGTERM reached this worker: start nothing more
    return record


def run_in_workers(run: Callable[[dict[str, Any]], dict[str, Any]], payloads: list[dict[str, Any]], workers: int,
                   finished: Callable[[dict[str, Any]], None]) -> None:
    """``run(payload)`` for each payload in ``workers`` spawned processes; ``finished(record)``
    once per trial that ran. Ctrl-C (or SIGTERM turned into it by the caller) stops them all."""
    import functools
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init, initargs=(os.getpid(),))
    futures = [pool.submit(functools.partial(_trial, run), p) for p in payloads]
    reported: set[Any] = set()

    def report(future: Any) -> None:
        reported.add(future)
        record = future.result()
        if record is not None:
            finished(record)

    try:
        for future in as_completed(futures):
            report(future)
    except KeyboardInterrupt:
        for f in futures:
            f.cancel()
        for proc in list(getattr(pool, "_processes", {}).values()):   # stop the running trials cleanly
            try:
                os.kill(proc.pid, signal.SIGTERM)
            except OSError:
                pass
        for f in futures:
            if f not in reported and not f.cancelled():
                try:
                    report(f)
                except Exception:   # noqa: BLE001 - a worker that died: its folder says how far it got
                    pass
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
