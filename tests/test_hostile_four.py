"""Hostile inputs, round four (issue 37): what a received run folder, a model's code or an
option can do, and what mnistkit does instead (one line, nothing left behind, nothing changed).
More cases of the round are in tests/test_hostile.py."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from mnistkit.cli import app

pytestmark = pytest.mark.slow


def one_line_error(result, code):
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def _remember(args):
    from mnistkit import trust

    return trust.remember(*args)


def test_concurrent_trainings_each_keep_their_trust_entry(tmp_path, monkeypatch):
    """16 concurrent writers (a sweep's workers over 16 model files) each keep theirs: the record
    is read, changed and rewritten under one lock (0.11 kept 5-7 of 16)."""
    import multiprocessing

    from mnistkit import trust

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    shas = [f"{i:064x}" for i in range(16)]
    with multiprocessing.get_context("fork").Pool(16) as pool:
        assert all(pool.map(_remember, [(tmp_path / f"m{i}.py", sha) for i, sha in enumerate(shas)]))
    assert sorted(trust._read()) == shas   # (read the same way in 0.11)


BOOM_PY = '''
import torch.nn as nn

class Boom(BaseException):
    pass

class Unprintable(Exception):
    def __str__(self):
        raise ValueError("no")

class A(nn.Module):
    def __init__(self):
        super().__init__()
        raise Boom("boom")

class B(nn.Module):
    def __init__(self):
        super().__init__()
        raise GeneratorExit()

class C(nn.Module):
    def __init__(self):
        super().__init__()
        raise Unprintable()

class W(nn.Module):
    def __init__(self, width=0):
        super().__init__()
        self.c = nn.Conv2d(1, width, 3)
        self.fc = nn.Linear(1, 10)

    def forward(self, x):
        return self.fc(self.c(x).mean((1, 2, 3))[:, None])
'''


@pytest.mark.parametrize("name, needle", [("A", "line 14, in __init__: Boom: boom"), ("B", "GeneratorExit"),
                                          ("C", "Unprintable: (its message cannot be shown)"),
                                          ("W", "line 33, in forward: RuntimeError")])
def test_whatever_a_models_init_raises_is_one_line_without_warnings(runner, tmp_path, monkeypatch, name, needle):
    """Issue 37 item 7: a BaseException subclass, GeneratorExit, an exception whose __str__
    raises, and torch's UserWarning before the error line (a width of 0)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "boom.py").write_text(BOOM_PY)
    for command in (["summary", f"boom.py:{name}"], ["train", f"boom.py:{name}", "--dataset", "synthetic",
                                                     "--limit", "64", "--epochs", "1"]):
        line = one_line_error(runner.invoke(app, command), 1)
        assert needle in line and "boom.py" in line, line
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())


def test_a_received_runs_data_folder_is_never_created_or_downloaded_into(runner, tmp_path, monkeypatch):
    """Issue 37 item 9: evaluate and export read the data folder a run records only where it holds
    MNIST; elsewhere they use the user's own (MNISTKIT_DATA), never create the sender's path."""
    from helpers import write_fake_mnist

    write_fake_mnist(tmp_path / "mine", n_train=128, n_test=32)
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["train", "I0", "--epochs", "1", "--data-dir", str(tmp_path / "mine"), "--device", "cpu",
                                 "--quiet", "--json"])
    assert result.exit_code == 0, result.output
    run = Path(json.loads(result.stdout)["run_dir"])
    chosen = tmp_path / "senders" / "choice"
    for name in ("config.yaml",):
        cfg = yaml.safe_load((run / name).read_text())
        cfg["data"]["data_dir"] = str(chosen)
        (run / name).write_text(yaml.safe_dump(cfg, sort_keys=False))
    for name in ("best.pt", "last.pt"):
        ckpt = torch.load(run / name, weights_only=True)
        ckpt["data"]["data_dir"] = str(chosen)
        torch.save(ckpt, run / name)
    monkeypatch.setenv("MNISTKIT_DATA", str(tmp_path / "mine"))
    for args in (["evaluate", str(run), "--json"], ["export", str(run), "--format", "onnx", "-o", "x.onnx"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, (args, result.output)
    assert not (tmp_path / "senders").exists()


def test_a_writer_taking_a_folder_removes_what_a_killed_writer_staged_and_nothing_else(tmp_path):
    """Issue 37 item 11: kill -9 while staging left hidden .best.pt.*.tmp files that no resume removed."""
    from mnistkit.lock import FolderLock
    from mnistkit.runs import RunWriter

    run = tmp_path / "run"
    run.mkdir()
    ours = [run / ".best.pt.k3j2.tmp", run / ".last.pt.x.tmp", run / ".metrics.jsonl.q.tmp"]
    theirs = [run / ".notes.txt.tmp", run / "best.pt"]
    for p in ours + theirs:
        p.write_bytes(b"x")
    lock = FolderLock.acquire(run)
    try:
        RunWriter(run, {}, lock=lock)
    finally:
        lock.release()
    assert not any(p.exists() for p in ours) and all(p.exists() for p in theirs)



def test_bounds_and_duplicates_are_one_line(runner, tmp_path, monkeypatch):
    """Issue 37 item 12: --epochs 1e23 was accepted; --model-arg k=1 --model-arg k=2 kept the last
    silently; --model-code was ignored without a word for a registered or YAML run."""
    monkeypatch.chdir(tmp_path)
    line = one_line_error(runner.invoke(app, ["train", "I0", "--epochs", str(10 ** 23), "--dataset", "synthetic"]), 2)
    assert "epochs must be a whole number from 1 to 10,000" in line
    (tmp_path / "m.py").write_text("import torch.nn as nn\ndef build(k=1):\n"
                                   "    return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))\n")
    line = one_line_error(runner.invoke(app, ["summary", "m.py:build", "--model-arg", "k=1", "--model-arg", "k=2"]), 2)
    assert "model argument 'k' is given twice" in line
    result = runner.invoke(app, ["train", "I0", "--epochs", "1", "--dataset", "synthetic", "--limit", "64", "--quiet",
                                 "--json"])
    run = json.loads(result.stdout)["run_dir"]
    for code in ("m.py", "missing.py"):
        line = one_line_error(runner.invoke(app, ["evaluate", run, "--model-code", code]), 2)
        assert "trained the registered model I0: model code is for a run of a Python file's model" in line
