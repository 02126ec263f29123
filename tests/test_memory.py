"""Kept memory (glibc's malloc keeping freed memory for reuse) is the CLI's process setting: the
library leaves the allocator and torch's threads of the process it runs in as they were."""

import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

from mnistkit.backends import memory

glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                           reason="glibc's malloc only")

STATUS = textwrap.dedent("""
    from mnistkit.backends.memory import keep_freed_memory
    print(keep_freed_memory())
""")


@pytest.mark.slow   # starts processes or builds a whole report: not the quick loop's
@glibc
def test_the_users_own_allocator_settings_are_left_alone():
    for name, value in (("MALLOC_TRIM_THRESHOLD_", "1000000"), ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1")):
        out = subprocess.run([sys.executable, "-c", STATUS], capture_output=True, text=True, timeout=120,
                             env={**os.environ, name: value})
        assert out.stdout.strip() == f"off (the allocator is set by {name})", out.stderr
    out = subprocess.run([sys.executable, "-c", STATUS], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "MNISTKIT_KEEP_MEMORY": "0"})
    assert out.stdout.strip() == "off (MNISTKIT_KEEP_MEMORY=0)"


LIBRARY = textwrap.dedent("""
    import sys, torch
    import mnistkit
    from mnistkit.backends import memory
    torch.set_num_threads(1)
    mnistkit.train("I4", mnistkit.Recipe(epochs=1, batch_size=64), mnistkit.DataOptions("synthetic", limit=128),
                   device="cpu", runs_dir=sys.argv[1])
    print(memory._kept, torch.get_num_threads())
""")


@pytest.mark.slow
def test_the_library_changes_neither_the_allocator_nor_the_threads(tmp_path):
    out = subprocess.run([sys.executable, "-c", LIBRARY, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-2:] == ["None", "1"]   # never asked for kept memory; threads as the caller set them


@pytest.mark.slow
def test_the_cli_asks_for_kept_memory_and_gives_it_back(runner, tmp_path, monkeypatch):
    from mnistkit.cli import app

    calls = []
    monkeypatch.setattr(memory, "keep_freed_memory", lambda: calls.append("keep"))
    monkeypatch.setattr(memory, "release_memory", lambda: calls.append("release"))
    result = runner.invoke(app, ["train", "I4", "--dataset", "synthetic", "--limit", "128", "--epochs", "1",
                                 "--batch-size", "64", "--runs-dir", str(tmp_path), "--quiet"])
    assert result.exit_code == 0, result.output
    assert calls == ["keep", "release"]


@glibc
@pytest.mark.slow
def test_kept_memory_changes_no_result(tmp_path):
    # reused blocks hold old values where fresh pages held zeros: a read of memory that was never
    # written would show here as a different run
    metrics = []
    for keep in ("0", "1"):
        out = subprocess.run([sys.executable, "-m", "mnistkit", "train", "I3", "--dataset", "synthetic",
                              "--limit", "600", "--epochs", "2", "--runs-dir", str(tmp_path / keep)],
                             capture_output=True, text=True, timeout=300,
                             env={**os.environ, "MNISTKIT_KEEP_MEMORY": keep})
        assert out.returncode == 0, out.stderr
        (run,) = (tmp_path / keep).iterdir()
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        metrics.append([{k: v for k, v in r.items() if k not in ("seconds", "train_images_per_s")} for r in rows])
    assert len(metrics[0]) == 2 and metrics[0] == metrics[1]
