"""train --tensorboard: event files in the run folder that hold exactly what metrics.jsonl holds;
without the package, one line and nothing written."""

import sys

import pytest

from mnistkit.cli import app
from mnistkit.runs import read_metrics


@pytest.mark.slow
def test_tensorboard_events_hold_the_runs_figures(runner, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = runner.invoke(app, ["train", "I4", "--dataset", "synthetic", "--limit", "256", "--epochs", "2",
                                 "--tensorboard", "--runs-dir", str(tmp_path), "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    (run,) = [p for p in tmp_path.iterdir()]
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    metrics = read_metrics(run)
    acc = events.Scalars("epoch/test_acc")
    assert [e.step for e in acc] == [1, 2]
    assert [e.value for e in acc] == pytest.approx([m.test_acc for m in metrics])
    assert [e.value for e in events.Scalars("epoch/lr")] == pytest.approx([m.lr for m in metrics])
    steps = events.Scalars("step/lr")
    assert steps and steps[-1].step == 2 * 2  # 256 images in batches of 128: 2 steps an epoch
    assert "recipe/text_summary" in events.Tags()["tensors"]


def test_without_tensorboard_it_is_one_line_and_nothing_is_written(runner, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    result = runner.invoke(app, ["train", "I4", "--dataset", "synthetic", "--limit", "64", "--epochs", "1",
                                 "--tensorboard", "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 1 and result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert "pip install 'mnistkit[tensorboard]'" in line and not (tmp_path / "runs").exists()
