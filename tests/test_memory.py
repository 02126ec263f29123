"""Training keeps freed memory for reuse (glibc's malloc), so steps do not fault their buffers in anew."""

import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

from mnistkit import training
from mnistkit.recipe import DataOptions, Recipe

glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                           reason="glibc's malloc only")

STEPS = textwrap.dedent("""
    import resource, sys, torch
    from mnistkit.device import keep_freed_memory, release_memory
    from mnistkit.models import get_model
    from mnistkit.training import SGD, train_step
    print(keep_freed_memory())
    torch.manual_seed(0)
    model = get_model("I3").to(memory_format=torch.channels_last)
    opt = SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))
    for i in range(13):
        if i == 3:
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        train_step(model, x, y, opt, bf16=True, channels_last=True)
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
    # what is kept is given back: 256 MiB freed in 8 MiB blocks, then released
    rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
    blocks = [torch.ones(2**21) for _ in range(32)]
    held = rss()
    del blocks
    freed = rss()
    release_memory()
    print(held, freed, rss())
""")


def run_steps(env: dict) -> tuple[str, float, list[float]]:
    out = subprocess.run([sys.executable, "-c", STEPS], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "MNISTKIT_KEEP_MEMORY": "1", **env})
    assert out.returncode == 0, out.stderr
    status, faults, rss = out.stdout.splitlines()[-3:]
    return status, float(faults), [float(v) for v in rss.split()]


@glibc
def test_kept_memory_ends_the_page_faults_of_each_step_and_is_given_back_after():
    status, faults, (held, freed, released) = run_steps({})
    status_off, faults_off, (held_off, freed_off, released_off) = run_steps({"MNISTKIT_KEEP_MEMORY": "0"})
    assert (status, status_off) == ("on", "off (MNISTKIT_KEEP_MEMORY=0)")
    # glibc's default gives every freed activation buffer back and faults it in again next step
    assert faults_off > 300 and faults < faults_off / 10, (faults, faults_off)
    # kept: freeing 256 MiB keeps it; release_memory gives it back
    assert held > 256 and freed > held - 64 and released < held - 192, (held, freed, released)
    assert freed_off < held_off - 192   # the default gave it back at once


@glibc
def test_the_users_own_allocator_settings_are_left_alone():
    for name in ("MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"):
        value = "glibc.malloc.trim_threshold=1000000" if name == "GLIBC_TUNABLES" else "1000000"
        status, _, _ = run_steps({name: value})
        assert status == f"off (the allocator is set by {name})"


def test_training_keeps_freed_memory_and_gives_it_back_at_the_end(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(training, "keep_freed_memory", lambda: calls.append("keep"))
    monkeypatch.setattr(training, "release_memory", lambda: calls.append("release"))
    training.train("I4", Recipe(epochs=1, batch_size=64, shards=1), DataOptions("synthetic", limit=128),
                   device="cpu", runs_dir=tmp_path)
    assert calls == ["keep", "release"]


@glibc
@pytest.mark.slow
@pytest.mark.parametrize("shards", ["1", "auto"])
def test_kept_memory_changes_no_result(tmp_path, shards):
    # reused blocks hold old values where fresh pages held zeros: a read of memory that was never
    # written would show here as a different run
    metrics = []
    for keep in ("0", "1"):
        out = subprocess.run([sys.executable, "-m", "mnistkit", "train", "I3", "--dataset", "synthetic",
                              "--limit", "600", "--epochs", "2", "--shards", shards, "--runs-dir",
                              str(tmp_path / keep)],
                             capture_output=True, text=True, timeout=300,
                             env={**os.environ, "MNISTKIT_KEEP_MEMORY": keep})
        assert out.returncode == 0, out.stderr
        (run,) = (tmp_path / keep).iterdir()
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        metrics.append([{k: v for k, v in r.items() if k not in ("seconds", "train_images_per_s")} for r in rows])
    assert len(metrics[0]) == 2 and metrics[0] == metrics[1]
