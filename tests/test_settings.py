"""Every recipe key from the command line (issue 40, goal 5): `--set KEY=VALUE` for train, sweep and
lr-find, typed and checked as the change-log is, recorded by the run like any override;
`--threads N` recorded; `sweep --device` defaults to train's `auto`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.main import get_command

from mnistkit.cli import app
from mnistkit.errors import UsageError
from mnistkit.recipe import Recipe
from mnistkit.settings import parse_settings

TRAIN = ["--dataset", "synthetic", "--limit", "256", "--epochs", "1", "--device", "cpu", "--quiet"]


def config(run_dir: str | Path) -> dict:
    return yaml.safe_load((Path(run_dir) / "config.yaml").read_text())


def one_line(result) -> str:
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    return lines[0]


def test_values_are_typed_as_the_change_log_types_them():
    assert parse_settings(["weight_decay=5e-4", "augment.degrees=7", "channels_last=false", "epochs=3",
                           "scheduler=STEP", "lr=.1"]) == {
        "weight_decay": 0.0005, "augment.degrees": 7.0, "channels_last": False, "epochs": 3, "scheduler": "STEP",
        "lr": 0.1}
    recipe = Recipe(augment=Recipe().augment).with_settings(parse_settings(["augment.degrees=7", "scheduler=STEP"]))
    assert recipe.augment.degrees == 7.0 and recipe.augment.translate == 0.05 and recipe.scheduler == "step"


@pytest.mark.parametrize("pairs,message", [
    (["weight_decay=abc"], "weight_decay must be float, not str ('abc')"),
    (["epochs=1.5"], "epochs must be int, not float (1.5)"),
    (["channels_last=maybe"], "channels_last must be bool, not str ('maybe')"),
    (["augment.degrees=[7]"], "augment.degrees must be float, not list ([7])"),
    (["augment=off"], "augment is a group: set its keys one at a time"),
    (["bn_relu=torch"], "bn_relu was replaced by backend in 0.9"),
    (["lr"], "setting 'lr' is not KEY=VALUE"),
    (["lr=0.1", "lr=0.2"], "lr is set twice (lr=0.1 and lr=0.2); set it once"),
])
def test_a_bad_setting_is_one_message_naming_the_key(pairs, message):
    with pytest.raises(UsageError) as caught:
        parse_settings(pairs)
    assert str(caught.value).startswith(message)


def test_an_unknown_key_lists_the_known_ones():
    with pytest.raises(UsageError) as caught:
        parse_settings(["wd=1e-4"])
    assert str(caught.value).startswith("'wd' is not a recipe key; known keys: augment.degrees, augment.enabled")
    assert "weight_decay" in str(caught.value) and "seed" in str(caught.value)


@pytest.mark.parametrize("args,line", [
    (["--set", "weight_decay=abc"], "error: weight_decay must be float, not str ('abc')"),
    (["--set", "augment.degrees=x"], "error: augment.degrees must be float, not str ('x')"),
    (["--set", "dropout=1.5"], "error: dropout must be in [0, 1)"),
    (["--set", "momentum_cycle=0.5"], "error: momentum plus momentum_cycle (0.5) must be below 1"),
    (["--set", "learning_rate=0.1"], "error: 'learning_rate' is not a recipe key; known keys: augment.degrees,"),
    (["--lr", "0.1", "--set", "lr=0.2"], "error: lr is given twice, by --lr and by --set lr=...; give it once"),
    (["--seeds", "2", "--set", "seed=3"], "error: give --seeds or --set seed=..., not both"),
])
def test_train_refuses_a_bad_setting_in_one_line_before_anything_trains(runner, tmp_path, monkeypatch, args, line):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["train", "I3", *TRAIN, *args])
    assert result.exit_code == 2, result.output
    assert one_line(result).startswith(line)
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_a_setting_and_the_thread_count_reach_the_recorded_recipe(runner, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["train", "I1", *TRAIN, "--set", "weight_decay=1e-4", "--set", "augment.degrees=7",
                                 "--set", "channels_last=false", "--set", "label_smoothing=0", "--set", "seed=3",
                                 "--threads", "1", "--json"])
    assert result.exit_code == 0, result.output
    run = json.loads(result.stdout)["run_dir"]
    recorded = config(run)
    r = recorded["recipe"]
    assert r["weight_decay"] == 1e-4 and r["label_smoothing"] == 0.0 and r["channels_last"] is False
    assert r["augment"] == {**r["augment"], "degrees": 7.0, "interpolation": "bilinear"}   # I1's own key kept
    assert r["seed"] == 3 and r["epochs"] == 1 and r["batch_size"] == 128   # --epochs, the change-log's batch
    assert recorded["threads"] == 1


SPEC = """name: syn
models: [I3]
seeds: [1]
grid: {lr: [0.05]}
recipe: {epochs: 1, batch_size: 64}
data: {dataset: synthetic, limit: 128}
"""


@pytest.mark.slow
def test_sweep_takes_settings_and_threads_for_every_trial(runner, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "spec.yaml").write_text(SPEC)
    result = runner.invoke(app, ["sweep", "spec.yaml", "--workers", "1", "--device", "cpu", "--set",
                                 "weight_decay=0.001", "--set", "augment.enabled=false", "--threads", "1", "--json"])
    assert result.exit_code == 0, result.output
    recorded = config(tmp_path / "runs" / "syn" / "I3-lr0.05-seed1")
    assert recorded["recipe"]["weight_decay"] == 0.001 and recorded["recipe"]["augment"]["enabled"] is False
    assert recorded["recipe"]["lr"] == 0.05 and recorded["recipe"]["batch_size"] == 64 and recorded["threads"] == 1


@pytest.mark.parametrize("args,line", [
    (["--set", "lr=0.1"], "spec.yaml: lr is varied by the spec's grid; a setting cannot fix it"),
    (["--set", "seed=2"], "spec.yaml: seed is varied by the spec's seeds; a setting cannot fix it"),
    (["--set", "epochs=1.5"], "error: epochs must be int, not float (1.5)"),
    (["--set", "batch_size=0"], "error: spec.yaml: trial I3-lr0.05-seed1: batch_size must be at least 1"),
])
def test_sweep_refuses_a_bad_setting_in_one_line(runner, tmp_path, monkeypatch, args, line):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "spec.yaml").write_text(SPEC)
    result = runner.invoke(app, ["sweep", "spec.yaml", "--workers", "1", *args])
    assert result.exit_code != 0, result.output
    assert line in one_line(result)
    assert not (tmp_path / "runs").exists()


def test_sweep_device_defaults_to_what_train_defaults_to():
    group = get_command(app)

    def default(command: str) -> str:
        return next(p.default for p in group.commands[command].params if p.name == "device")

    assert default("sweep") == default("train") == default("lr-find") == "auto"
    import inspect

    from mnistkit.sweeps.sweep import run_sweep
    assert inspect.signature(run_sweep).parameters["device"].default == "auto"


@pytest.mark.parametrize("command", ["train", "sweep", "lr-find"])
def test_set_and_threads_are_options_of_train_sweep_and_lr_find(command):
    names = {o for p in get_command(app).commands[command].params for o in p.opts}
    assert {"--set", "--threads"} <= names


def test_resume_refuses_settings_and_threads(runner, tmp_path):
    result = runner.invoke(app, ["train", "--resume", str(tmp_path), "--set", "lr=0.1", "--threads", "1"])
    assert result.exit_code == 2
    assert "drop --set, --threads" in one_line(result)
