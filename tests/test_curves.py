"""mnistkit plot: runs overlaid and labelled by what differs between them (from the recipes they
recorded), each in its own colour, accuracy and loss of train/test/validation on shared axes,
the step losses runs record at a bounded rate, the LR."""

import io
import json
import math

import pytest
import torch
from PIL import Image

from mnistkit.cli import app
from mnistkit.results.curves import label_by_differences, run_curves, shared_facts
from mnistkit.errors import RunError
from mnistkit.runs.metrics import MAX_STEP_POINTS, EpochMetrics, StepLosses
from mnistkit.recipe import Augment, DataOptions, Recipe
from mnistkit.render.curves import curves_png, run_colours
from mnistkit.runs import read_metrics
from mnistkit.training.loop import train
from tests.test_compare import recorded_run


def sweep_folder(root, values=(0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5)):
    """A sweep's folder: seven runs of I3 that differ in lr only (recorded, not trained)."""
    for lr in values:
        recorded_run(root, "I3", Recipe(epochs=4, lr=lr), [98.0, 99.0, 99.2, 99.3])
    return root


def test_a_sweep_folder_gives_one_label_and_one_colour_per_run(tmp_path):
    curves = run_curves([str(sweep_folder(tmp_path / "sweep"))])
    assert sorted(c.label for c in curves) == ["lr 0.02", "lr 0.05", "lr 0.1", "lr 0.2", "lr 0.3", "lr 0.4", "lr 0.5"]
    assert shared_facts(curves) == "I3, mnist 60,000 images, 4 epochs, seed 42"
    from mnistkit.render.common import pyplot

    colours = run_colours([c.group for c in curves], pyplot())
    assert len(colours) == 7 and len(set(colours.values())) == 7
    many = run_colours([f"run{i}" for i in range(45)], pyplot())
    assert len(set(many.values())) == 45


def test_labels_name_the_model_the_recipe_key_and_the_seed_that_differ(tmp_path):
    a = recorded_run(tmp_path, "I3", Recipe(epochs=3, seed=1), [98.0, 99.0, 99.2])
    b = recorded_run(tmp_path, "I3", Recipe(epochs=3, seed=2), [98.0, 99.1, 99.3])
    c = recorded_run(tmp_path, "I4", Recipe(epochs=3, seed=1, augment=Augment(degrees=5)), [97.0, 98.5, 99.0])
    labels = [x.label for x in run_curves([str(a), str(b), str(c)])]
    assert labels == ["I3, augment.degrees 10, seed 1", "I3, augment.degrees 10, seed 2", "I4, augment.degrees 5, seed 1"]
    # two runs alike in everything are told apart by their folders
    d = recorded_run(tmp_path, "I3", Recipe(epochs=3, seed=1), [98.0, 99.0, 99.2], name="again")
    labels = [x.label for x in run_curves([str(a), str(d)])]
    assert labels == [a.name, "again"]
    # a run alone says what it was
    (alone,) = run_curves([str(a)])
    assert alone.label == "I3, 3 epochs, mnist 60,000 images, seed 1"
    # an unfinished run differs in its epochs
    e = recorded_run(tmp_path, "I3", Recipe(epochs=3, seed=1), [98.0])
    assert [x.label for x in run_curves([str(a), str(e)])] == ["3 epochs", "1/3 epochs"]


def test_the_picture_is_written_and_readable(runner, tmp_path):
    folder = sweep_folder(tmp_path / "sweep", (0.05, 0.2))
    out = tmp_path / "c.png"
    result = runner.invoke(app, ["plot", str(folder), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}: 2 runs" in result.stderr
    with Image.open(out) as picture:
        picture.load()
        assert picture.format == "PNG" and picture.size[0] > 1000


def test_validation_and_step_losses_are_drawn_and_a_run_without_them_still_is(tmp_path):
    rows = [EpochMetrics(e, 1 / e, 90 + e, 1.2 / e, 89 + e, 0.1, 1.0, 100.0, 1.1 / e, 89.5 + e,
                         tuple((s, 2.0 / (e + s / 10)) for s in range(2, 21, 2))) for e in range(1, 6)]
    from mnistkit.results.curves import RunCurve

    curves = label_by_differences([RunCurve("a", "", "a", tuple(rows), {"model": "I3", "seed": "1"}),
                                   RunCurve("b", "", "b", tuple(r.__class__(**{**r.to_dict(), "step_losses": None,
                                                                               "val_loss": None, "val_acc": None})
                                                                for r in rows), {"model": "I3", "seed": "2"})])
    png = curves_png(curves, title="t", shared="I3")
    with Image.open(io.BytesIO(png)) as picture:
        assert picture.format == "PNG"


def test_step_losses_are_window_means_at_a_bounded_rate():
    losses = torch.linspace(2.0, 0.1, 469)
    trace, total, seen = StepLosses(469), torch.zeros(()), 0
    for step, value in enumerate(losses, 1):
        total += value * 128
        seen += 128
        trace.add(step, total, seen)
    points = trace.points()
    assert len(points) <= MAX_STEP_POINTS and points[-1][0] == 469 and points[0][0] == trace.every == 10
    assert math.isclose(points[0][1], float(losses[:10].mean()), rel_tol=1e-4)
    assert math.isclose(points[-1][1], float(losses[460:].mean()), rel_tol=1e-3)
    small = StepLosses(7)
    assert small.every == 1


@pytest.mark.slow
def test_a_trained_run_records_its_step_losses_and_readers_take_rows_with_or_without(tmp_path):
    run = train("I0", Recipe(epochs=2, batch_size=32, scheduler="step", momentum=0.0), DataOptions("synthetic", limit=320),
                device="cpu", runs_dir=tmp_path).run_dir
    rows = read_metrics(run)
    assert [len(r.step_losses) for r in rows] == [10, 10] and rows[0].step_losses[-1][0] == 10
    # the epoch's mean training loss is the mean of its windows (equal windows here)
    assert math.isclose(rows[0].train_loss, sum(v for _, v in rows[0].step_losses) / 10, rel_tol=1e-4)
    line = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert isinstance(line["step_losses"], list) and line["step_losses"][0][0] == 1
    # a row of a run of 0.11 or before (no step_losses) reads as before, and writes as before
    old = {k: v for k, v in line.items() if k != "step_losses"}
    assert EpochMetrics.from_dict(old).step_losses is None and "step_losses" not in EpochMetrics.from_dict(old).to_dict()
    # an older reader takes only the keys it knows: the new key is one it never looks at
    assert EpochMetrics.from_dict({**old, "a_key_from_the_future": [1, 2]}).epoch == 1


@pytest.mark.parametrize("bad", ["x", [[1]], [[0, 1.0]], [[1, float("nan")]], [[True, 1.0]], [[1, 1.0]] * 1001])
def test_damaged_step_losses_are_one_line(bad):
    row = {"epoch": 1, "train_loss": 1.0, "train_acc": 50.0, "test_loss": 1.0, "test_acc": 50.0, "lr": 0.1,
           "seconds": 1.0, "train_images_per_s": 10.0, "step_losses": bad}
    with pytest.raises(RunError, match="step_losses is not a list of \\[step, loss\\] pairs; the run folder is damaged"):
        EpochMetrics.from_dict(row, where="m:1")
