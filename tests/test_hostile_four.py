"""Hostile inputs, round four (issue 37): what a received run folder, a model's code or an
option can do, and what mnistkit does instead (one line, nothing left behind, nothing changed).
More cases of the round are in tests/test_hostile.py."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from helpers import one_line_error
from mnistkit.cli import app

pytestmark = pytest.mark.slow



def _remember(args):
    from mnistkit.usermodels import trust

    return trust.remember(*args)


def test_concurrent_trainings_each_keep_their_trust_entry(tmp_path, monkeypatch):
    """16 concurrent writers (a sweep's workers over 16 model files) each keep theirs: the record
    is read, changed and rewritten under one lock (0.11 kept 5-7 of 16)."""
    import multiprocessing

    from mnistkit.usermodels import trust

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
    from mnistkit.runs.lock import FolderLock
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


# ---------------------------------------------------------------- a review's attacks on the rebuild (issue 36)

HELPED_PY = '''
import torch.nn as nn
import helpers


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.1))
        self.fc = nn.Linear(4 * 26 * 26, helpers.CLASSES)

    def forward(self, x):
        return self.fc(self.body(x).flatten(1))


def main(epochs=3):
    open("SIDE", "w").write("main ran")


history = main()
'''


def _train_helped(runner, project):
    (project / "model.py").write_text(HELPED_PY)   # a script: training runs its definitions only
    (project / "helpers.py").write_text("CLASSES = 10\n")
    result = runner.invoke(app, ["train", "model.py:Net", "--dataset", "synthetic", "--limit", "64", "--epochs", "1",
                                 "--quiet", "--json"])
    assert result.exit_code == 0, result.output
    return Path(json.loads(result.stdout)["run_dir"])


def _forge(run, **fields):
    for name in ("config.yaml",):
        cfg = yaml.safe_load((run / name).read_text())
        cfg["model_source"].update(fields)
        (run / name).write_text(yaml.safe_dump(cfg, sort_keys=False))
    for name in ("best.pt", "last.pt"):
        ckpt = torch.load(run / name, weights_only=True)
        ckpt["model_source"].update(fields)
        torch.save(ckpt, run / name)


def test_a_received_runs_relpath_brings_no_neighbours_of_trusted_code(runner, tmp_path, monkeypatch):
    """The run folder holds a trusted file's very bytes and a helpers.py beside them; its record
    points there (path gone, relpath forged): the trusted code runs, its neighbours never."""
    import shutil

    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    run = _train_helped(runner, project)
    received = tmp_path / "received" / "r1"
    shutil.copytree(run, received)
    (received / "sub").mkdir()
    shutil.copy(run / "model.py", received / "sub" / "model.py")
    for folder in (received, received / "sub"):
        (folder / "helpers.py").write_text("open('PWNED', 'w').write('x')\nCLASSES = 10\n")
    for relpath in ("r1/sub/model.py", "r1/model.py"):
        _forge(received, path="/nonexistent/model.py", relpath=relpath)
        monkeypatch.syspath_prepend(str(tmp_path / "empty"))
        runner.invoke(app, ["evaluate", str(received), "--dataset", "synthetic"])
        monkeypatch.chdir(tmp_path / "received")
        runner.invoke(app, ["evaluate", "r1", "--dataset", "synthetic"])
        monkeypatch.chdir(project)
        assert not list(tmp_path.rglob("PWNED")), relpath


@pytest.mark.parametrize("attr", ["history", "main"])
def test_a_record_cannot_choose_another_entry_point_of_a_trusted_file(runner, tmp_path, monkeypatch, attr):
    """A record naming the variable `history = main()` or the function `main` of a file the user
    trusted (for Net) runs neither: trust covers what the user built of the file."""
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    run = _train_helped(runner, project)
    assert not (project / "SIDE").exists()
    _forge(run, attr=attr, args={"epochs": 10 ** 9} if attr == "main" else {})
    result = runner.invoke(app, ["evaluate", str(run), "--dataset", "synthetic"])
    assert result.exit_code != 0 and not (project / "SIDE").exists(), result.output


STUDENT_SCRIPT = '''
import torch
import torch.nn as nn
import torch.nn.functional as F
try:
    from apex.normalization import FusedLayerNorm as Norm
except ImportError:
    from torch.nn import BatchNorm2d as Norm

cfg = {}
cfg["width"] = 8

if True:
    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(c, cfg["width"], 3), Norm(cfg["width"])

        def forward(self, x):
            return F.relu(self.bn(self.conv(x)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.b = Block(1)
        self.fc = nn.Linear(cfg["width"] * 26 * 26, 10)

    def forward(self, x):
        return F.log_softmax(self.fc(self.b(x).view(x.size(0), -1)), dim=1)

    def fit(self):
        for epoch in range(3):
            for x, y in train_loader:
                loss = F.nll_loss(self(x), y)
            acc = loss
        print(acc)


def loader():
    open("DOWNLOADED", "w").write("the data was fetched")
    return []


train_loader = loader()
model = Net()
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
model.fit()
'''


def test_a_students_script_builds_from_its_model_alone(tmp_path, monkeypatch):
    """A fit method's globals (a loader, an optimizer) are not the model's; an import in a try,
    a class in an if, an item set on a dict are definitions the model needs."""
    from mnistkit.usermodels.modelref import build, resolve

    monkeypatch.chdir(tmp_path)
    (tmp_path / "net.py").write_text(STUDENT_SCRIPT)
    model, _ = build(resolve("net.py:Net"))
    assert not (tmp_path / "DOWNLOADED").exists()
    assert model.b.conv.out_channels == 8 and type(model.b.bn).__name__ == "BatchNorm2d"


def test_a_model_object_with_lazy_layers_trains_with_its_own_weights_said(tmp_path):
    import mnistkit
    from mnistkit import DataOptions, Recipe
    from torch import nn

    class Lazy(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.bn, self.fc = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.LazyLinear(10)
            self.drop = nn.Dropout(0.1)

        def forward(self, x):
            return self.fc(self.drop(self.bn(self.c(x))).flatten(1))

    net = Lazy()
    net(torch.zeros(1, 1, 28, 28))
    notes = []

    class Notes:
        def on_start(self, start):
            notes.extend(start.notes)

        def on_step(self, step):
            pass

        def on_epoch(self, row, best):
            pass

    mnistkit.train(net, Recipe(epochs=1, batch_size=32), DataOptions("synthetic", limit=64), device="cpu",
                   runs_dir=tmp_path / "runs", callback=Notes())
    assert any("initial weights are the object's own" in n for n in notes), notes


def test_a_base_exception_in_forward_is_one_line_through_the_layout_check(runner, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ge.py").write_text("import torch.nn as nn\nclass Boom(BaseException):\n    pass\n"
                                    "class Net(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
                                    "        self.fc = nn.Linear(784, 10)\n    def forward(self, x):\n"
                                    "        if self.training:\n            raise Boom('in training')\n"
                                    "        return self.fc(x.flatten(1))\n")
    result = runner.invoke(app, ["train", "ge.py:Net", "--dataset", "synthetic", "--limit", "64", "--quiet"])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert lines[-1].startswith("error: ") and "ge.py, line 10, in forward: Boom: in training" in lines[-1]
