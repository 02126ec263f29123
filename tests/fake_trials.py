"""A stand-in for a sweep's trial, importable by spawned workers (tests/test_sweep.py): it sleeps
as long as its payload says, stopping as a training does on SIGTERM, and leaves a file saying how
it ended."""

import time
from pathlib import Path

from mnistkit.runs import Terminated, sigterm_as_interrupt


def fake_trial(payload):
    folder = Path(payload["folder"])
    try:
        with sigterm_as_interrupt():
            time.sleep(payload["sleep"])
    except Terminated:
        (folder / f"stopped-{payload['id']}").write_text("cleanly")
        return {"trial": payload["id"], "status": "interrupted"}
    (folder / f"done-{payload['id']}").write_text("finished")
    return {"trial": payload["id"], "status": "finished"}
