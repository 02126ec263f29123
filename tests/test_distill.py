"""Knowledge distillation (issue 41): the loss is the formula, alpha 0 is training without a
teacher, a resumed distilled run ends where an uninterrupted one does, the run records its teacher
and compare shows it, and every teacher that cannot teach is one line."""

import shutil
import textwrap

import pytest
import torch
import torch.nn.functional as F
import yaml

from helpers import one_line_error
from mnistkit.cli import app
from mnistkit.runs.checkpoint import load_checkpoint
from mnistkit.training.distill import distillation_loss, find_teacher
from mnistkit.errors import TrainingInterrupted
from mnistkit.recipe import DataOptions, Recipe
from mnistkit.runs import read_config, read_metrics
from mnistkit.training.loop import resume, train

pytestmark = pytest.mark.slow   # trainings of a second or two on 256 synthetic digits
DATA = DataOptions("synthetic", limit=256)

# a student as the course notebooks write it: Sequential blocks, ReLU before BatchNorm, view, log_softmax
STUDENT = textwrap.dedent("""\
    import torch.nn as nn
    import torch.nn.functional as F


    class Net(nn.Module):
        def __init__(self):
            super(Net, self).__init__()
            self.conv1 = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(8), nn.Dropout(0.05))
            self.pool = nn.MaxPool2d(2, 2)
            self.conv2 = nn.Sequential(nn.Conv2d(8, 12, 3), nn.ReLU(), nn.BatchNorm2d(12), nn.Dropout(0.05))
            self.gap = nn.AvgPool2d(12)
            self.fc = nn.Linear(12, 10)

        def forward(self, x):
            x = self.pool(self.conv1(x))
            x = self.gap(self.conv2(x))
            x = x.view(x.size(0), -1)
            return F.log_softmax(self.fc(x), dim=1)
    """)


def small(**kw):
    return Recipe(**{"epochs": 2, "batch_size": 64, "lr": 0.05, **kw})


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A finished teacher run (I3 on synthetic digits) and the student's file."""
    root = tmp_path_factory.mktemp("distill")
    student = root / "student.py"
    student.write_text(STUDENT)
    teacher = train("I3", small(epochs=1), DATA, device="cpu", runs_dir=root / "teachers").run_dir
    return root, teacher, student


def weights(run_dir):
    return load_checkpoint(run_dir / "last.pt")["state_dict"]


def rows(result):
    return [{k: v for k, v in r.to_dict().items() if k not in ("seconds", "train_images_per_s")} for r in result.metrics]


def test_the_loss_is_the_formula_on_a_fixed_batch():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g) * 3
    y = torch.tensor([0, 3, 9, 1, 1, 7])
    for alpha, temp, smooth in ((0.5, 4.0, 0.0), (0.9, 2.0, 0.1), (1.0, 1.0, 0.0)):
        p = torch.softmax(t / temp, 1)
        kl = (p * (p.log() - torch.log_softmax(s / temp, 1))).sum(1).mean()
        logp = torch.log_softmax(s, 1)
        ce = -((1 - smooth) * logp[torch.arange(6), y] + smooth * logp.mean(1)).mean()
        expected = (1 - alpha) * ce + alpha * temp ** 2 * kl
        assert torch.allclose(distillation_loss(s, t, y, alpha, temp, smooth), expected, atol=1e-6)
    # a log_softmax head teaches and learns as its logits do
    assert torch.allclose(distillation_loss(F.log_softmax(s, 1), F.log_softmax(t, 1), y, 0.7, 3.0),
                          distillation_loss(s, t, y, 0.7, 3.0), atol=1e-6)


def test_alpha_zero_is_bit_identical_to_training_without_a_teacher_and_alpha_half_is_not(lab):
    root, teacher, student = lab
    plain = train(f"{student}:Net", small(), DATA, device="cpu", runs_dir=root / "plain")
    zero = train(f"{student}:Net", small(teacher=str(teacher), distill_alpha=0.0), DATA, device="cpu",
                 runs_dir=root / "zero")
    half = train(f"{student}:Net", small(teacher=str(teacher)), DATA, device="cpu", runs_dir=root / "half")
    assert rows(plain) == rows(zero)
    a, b, c = weights(plain.run_dir), weights(zero.run_dir), weights(half.run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)   # the teacher really takes part
    # the run records the teacher it learned from; a run without one records none
    taught = read_config(half.run_dir).teacher
    assert taught["run"] == str(teacher.resolve()) and taught["model"] == "I3" and taught["epoch"] == 1
    assert taught["test_acc"] == read_metrics(teacher)[-1].test_acc
    import hashlib

    assert taught["sha256"] == hashlib.sha256((teacher / "last.pt").read_bytes()).hexdigest()
    assert read_config(plain.run_dir).teacher is None


def test_a_resumed_distilled_run_ends_where_an_uninterrupted_one_does(lab):
    root, teacher, student = lab

    class StopAfterOne:
        def on_start(self, start): pass
        def on_step(self, step): pass
        def on_epoch(self, row, best): raise KeyboardInterrupt

    recipe = small(teacher=str(teacher), distill_alpha=0.7, distill_temperature=3.0)
    full = train(f"{student}:Net", recipe, DATA, device="cpu", runs_dir=root / "full")
    with pytest.raises(TrainingInterrupted):
        train(f"{student}:Net", recipe, DATA, device="cpu", runs_dir=root / "cut", callback=StopAfterOne())
    cut = next((root / "cut").iterdir())
    resumed = resume(cut, device="cpu")
    assert rows(resumed) == rows(full)
    a, b = weights(full.run_dir), weights(cut)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_teacher_by_iteration_is_its_newest_comparable_run_never_the_best_on_test(tmp_path):
    from test_compare import OFFICIAL, recorded_run

    (tmp_path / "experiments.yaml").write_text(
        "version: 1\nconstraints: {min_test_acc: 99.4}\niterations:\n"
        "  - {id: T1, model: I3, changes: teacher, recipe: {epochs: 3}}\n"
        "  - {id: S1, model: I5, changes: student, recipe: {epochs: 3, teacher: T1}}\n")
    runs = tmp_path / "runs"
    best = recorded_run(runs, "I3", Recipe(epochs=3), [98.0, 99.0, 99.7], name="a")
    newest = recorded_run(runs, "I3", Recipe(epochs=3, seed=2), [98.0, 99.0, 99.5], name="b")
    recorded_run(runs, "I3", Recipe(epochs=3, seed=3), [99.9, 99.9], name="c")   # 2 of 3 epochs: not comparable
    recorded_run(runs, "I3", Recipe(epochs=3, seed=4), [99.8, 99.8, 99.8], dict(OFFICIAL, val_samples=5000), name="d")
    assert find_teacher("t1", runs, tmp_path / "experiments.yaml") == newest   # not `best`: chosen on test
    assert find_teacher(str(best), runs, tmp_path / "experiments.yaml") == best


def test_a_short_run_is_taught_by_the_newest_finished_run_on_its_own_data(lab, runner, tmp_path):
    # `train --all --epochs 1 --dataset synthetic`: I5's teacher I3 is the I3 run just trained on those data
    root, teacher, student = lab
    runs = tmp_path / "runs"
    mine = train("I3", small(epochs=1), DATA, device="cpu", runs_dir=runs).run_dir
    train("I3", small(epochs=1), DataOptions("synthetic", limit=128), device="cpu", runs_dir=runs)   # other data
    result = runner.invoke(app, ["train", f"{student}:Net", "--dataset", "synthetic", "--limit", "256", "--epochs", "1",
                                 "--device", "cpu", "--runs-dir", str(runs), "-q", "--teacher", "I3", "--json"])
    assert result.exit_code == 0, result.output
    import json

    run = json.loads(result.stdout)["run_dir"]
    assert read_config(run).teacher["run"] == str(mine.resolve())


def test_a_diverging_model_of_the_users_own_is_a_divergence_not_a_code_error(lab, runner, tmp_path):
    root, teacher, student = lab
    result = runner.invoke(app, ["train", f"{student}:Net", "--dataset", "synthetic", "--limit", "256", "--epochs", "1",
                                 "--device", "cpu", "--runs-dir", str(tmp_path), "-q", "--lr", "1e12"])
    assert result.exit_code == 3, result.output   # the divergence's exit code, not a model-code error's 1
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("error: ") and "the learning rate (1e+12) is likely too high" in line, line
    assert "Traceback" not in result.output


def test_compare_and_the_write_up_name_the_teacher(tmp_path, runner):
    from test_compare import recorded_run

    (tmp_path / "experiments.yaml").write_text(
        "version: 1\nconstraints: {min_test_acc: 99.4}\niterations:\n"
        "  - {id: S1, model: I5, changes: student, recipe: {epochs: 3, teacher: I3}}\n")
    run = recorded_run(tmp_path / "runs", "I5", Recipe(epochs=3, teacher="I3"), [99.3, 99.4, 99.5])
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["teacher"] = {"run": "/somewhere/runs/I3-20261207", "model": "I3", "checkpoint": "last.pt",
                         "sha256": "ab" * 32, "epoch": 15, "test_acc": 99.6}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    # a run with another teacher setting is another recipe: not counted
    recorded_run(tmp_path / "runs", "I5", Recipe(epochs=3), [99.9, 99.9, 99.9])
    args = ["--experiments", str(tmp_path / "experiments.yaml"), "--runs-dir", str(tmp_path / "runs")]
    for cmd in (["compare", *args], ["compare", *args, "--format", "markdown"]):
        result = runner.invoke(app, cmd)
        assert result.exit_code == 0, result.output
        assert "S1 was taught by I3: /somewhere/runs/I3-20261207 (epoch 15, test 99.60%" in result.output, result.output
        assert "99.50" in result.output and "99.90" not in result.output
    config["teacher"]["sha256"] = "not hex"
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    assert "teacher record is not what mnistkit writes" in runner.invoke(app, ["compare", *args]).output


def _train(runner, root, student, *extra):
    return runner.invoke(app, ["train", f"{student}:Net", "--dataset", "synthetic", "--limit", "256", "--epochs", "1",
                               "--device", "cpu", "--runs-dir", str(root / "students"), "-q", *extra])


def test_every_teacher_that_cannot_teach_is_one_line_and_leaves_no_folder(lab, runner, tmp_path):
    root, teacher, student = lab
    # damaged: its config, its checkpoint
    garbled = tmp_path / "garbled"
    shutil.copytree(teacher, garbled)
    (garbled / "config.yaml").write_text("model: [unclosed\n")
    truncated = tmp_path / "truncated"
    shutil.copytree(teacher, truncated)
    (truncated / "last.pt").write_bytes((teacher / "last.pt").read_bytes()[:1000])
    # unfinished: stopped after 1 of 2 epochs
    class StopAfterOne:
        def on_start(self, start): pass
        def on_step(self, step): pass
        def on_epoch(self, row, best): raise KeyboardInterrupt
    with pytest.raises(TrainingInterrupted):
        train("I3", small(), DATA, device="cpu", runs_dir=tmp_path / "cut", callback=StopAfterOne())
    unfinished = next((tmp_path / "cut").iterdir())
    # a model object's run (a class from a notebook cell): nothing in its folder rebuilds it
    import torch.nn as nn

    class Cell(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.1),
                                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))

        def forward(self, x):
            return self.net(x)

    cell = train(Cell(), small(epochs=1), DATA, device="cpu", runs_dir=tmp_path / "cell").run_dir
    cases = [
        (["--teacher", "nosuch"], 2, "teacher 'nosuch' is neither a run folder nor an iteration"),
        (["--teacher", "I4"], 2, "has no finished run on the data this run trains on (synthetic, limit 256, val 0) of I4"),
        (["--teacher", str(garbled)], 1, f"teacher {garbled}"),
        (["--teacher", str(truncated)], 1, "last.pt"),
        (["--teacher", str(unfinished)], 2, "finished 1 of its 2 epochs: a teacher is a finished run"),
        (["--teacher", str(cell)], 1, "model object"),
        (["--teacher", str(teacher), "--val", "64"], 2, "trained on images this run holds out for validation"),
        (["--teacher", str(teacher), "--set", "distill_alpha=1.5"], 2, "distill_alpha must be in [0, 1]"),
    ]
    for extra, code, words in cases:
        result = _train(runner, root, student, *extra)
        line = one_line_error(result, code)
        assert words in line, (extra, line)
    assert not (root / "students").exists() or not any((root / "students").iterdir())


def test_a_cycle_of_teachers_is_one_line(lab, runner, tmp_path):
    root, teacher, student = lab
    # the student's model taught an I3 run; that run cannot teach the student's model back
    first = train(f"{student}:Net", small(epochs=1), DATA, device="cpu", runs_dir=tmp_path / "a").run_dir
    taught = train("I3", small(epochs=1, teacher=str(first)), DATA, device="cpu", runs_dir=tmp_path / "b").run_dir
    line = one_line_error(_train(runner, tmp_path, student, "--teacher", str(taught)), 2)
    assert "was taught by Net itself" in line and "a cycle" in line, line


def test_a_resumed_run_continues_only_with_the_teacher_it_started_with(lab, runner, tmp_path):
    root, teacher, student = lab
    mine = tmp_path / "teacher"
    shutil.copytree(teacher, mine)

    class StopAfterOne:
        def on_start(self, start): pass
        def on_step(self, step): pass
        def on_epoch(self, row, best): raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted):
        train(f"{student}:Net", small(teacher=str(mine)), DATA, device="cpu", runs_dir=tmp_path / "cut",
              callback=StopAfterOne())
    cut = next((tmp_path / "cut").iterdir())
    other = train("I3", small(epochs=1, seed=9), DATA, device="cpu", runs_dir=tmp_path / "other").run_dir
    shutil.copy(other / "last.pt", mine / "last.pt")   # the teacher's folder now holds other weights
    line = one_line_error(runner.invoke(app, ["train", "--resume", str(cut), "--model-code", str(student)]), 1)
    assert "can only continue with the teacher it started with" in line, line
    # moved with the project: found again where the runs folder's relpath says
    shutil.copy(teacher / "last.pt", mine / "last.pt")
    assert read_metrics(cut)[-1].epoch == 1
