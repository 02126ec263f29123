import json
import re
import subprocess
import sys

import pytest
import torch

from mnistkit.cli import app
from mnistkit.models import get_model


def test_summary_table(runner):
    result = runner.invoke(app, ["summary", "I3"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "14,500" in out and "PASS" in out
    assert "c6.conv" in out and "22 (j2)" in out and "global" in out
    assert "Buffers: 230" in out


def test_summary_budget_fail_for_i1(runner):
    result = runner.invoke(app, ["summary", "I1"])
    assert result.exit_code == 0
    assert "FAIL" in result.stdout and "978 over" in result.stdout


@pytest.mark.parametrize("name", ["I0", "I1", "I2", "I3", "I4", "I5"])
def test_summary_json_totals_match_the_model(runner, name):
    result = runner.invoke(app, ["summary", name, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    model = get_model(name)
    assert data["totals"]["params"] == sum(p.numel() for p in model.parameters())
    assert data["totals"]["buffers"] == sum(b.numel() for b in model.buffers())
    assert sum(layer["params"] for layer in data["layers"]) == data["totals"]["params"]
    assert data["budget"]["pass"] == (data["totals"]["trainable_params"] < 20_000)
    assert data["layers"][0]["input_shape"] == [1, 1, 28, 28]
    assert data["layers"][-1]["output_shape"] == [1, 10]


def test_summary_without_model_lists_all(runner):
    for args in (["summary"], ["models"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        for name, params in (("I0", "18,060"), ("I1", "20,978"), ("I2", "19,494"), ("I3", "14,500"), ("I4", "4,964"), ("I5", "2,882")):
            assert name in result.stdout and params in result.stdout


def test_models_json(runner):
    data = json.loads(runner.invoke(app, ["models", "--json"]).stdout)
    assert [m["name"] for m in data["models"]] == ["I0", "I1", "I2", "I3", "I4", "I5"]
    assert [m["head"] for m in data["models"]] == ["FC", "FC", "FC", "GAP", "GAP", "GAP"]


def test_custom_budget(runner):
    result = runner.invoke(app, ["summary", "I3", "--budget", "10000", "--json"])
    assert json.loads(result.stdout)["budget"] == {"limit": 10000, "params": 14500, "pass": False, "margin": -4500}
    bad = runner.invoke(app, ["summary", "I3", "--budget", "0"])
    assert bad.exit_code == 2 and bad.stdout == ""
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and "--budget" in lines[0] and "summary --help" in lines[0], bad.stderr


def test_unknown_model_is_one_clean_line(runner):
    result = runner.invoke(app, ["summary", "NOPE"])
    assert result.exit_code == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "NOPE" in lines[0] and "I0, I1, I2, I3, I4, I5" in lines[0]
    assert "Traceback" not in result.output


def test_version(runner):
    from mnistkit import __version__

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("args", [["--help"], ["--version"], ["summary", "--help"]])
def test_help_and_version_do_not_import_torch(args):
    code = (
        "import sys\n"
        "from mnistkit.cli import app\n"
        f"try:\n    app({args!r})\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n"
        "print('TORCH_LOADED' if 'torch' in sys.modules else 'TORCH_ABSENT')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("TORCH_ABSENT")


@pytest.mark.slow
def test_console_script_runs_as_a_process():
    out = subprocess.run([sys.executable, "-m", "mnistkit", "summary", "NOPE"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 1
    assert "Traceback" not in out.stderr and "known models" in out.stderr


# ---------------------------------------------------------------- train and evaluate

@pytest.mark.slow
def test_train_and_evaluate_through_the_cli(runner, tmp_path):
    result = runner.invoke(app, ["train", "I3", "--dataset", "synthetic", "--epochs", "1", "--limit", "600",
                                 "--runs-dir", str(tmp_path), "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert {"run_dir", "model", "params", "epochs", "best_test_acc", "final_test_acc", "seconds"} <= set(data)
    assert data["model"] == "I3" and data["params"] == 14_500 and data["epochs"] == 1
    assert "epoch" in result.stderr  # the human display went to stderr under --json
    assert data["experiments"].endswith("experiments.yaml") and "change-log:" in result.stderr

    ev = runner.invoke(app, ["evaluate", data["run_dir"], "--json", "--device", "cpu"])
    assert ev.exit_code == 0, ev.output
    report = json.loads(ev.stdout)
    assert report["test_acc"] == pytest.approx(data["best_test_acc"])
    assert data["best_selected_on"] == "test" and data["measured_on"]["dataset"] == "synthetic"
    assert len(report["confusion_matrix"]) == 10 and len(report["per_class"]) == 10

    table = runner.invoke(app, ["evaluate", data["run_dir"], "--device", "cpu"])
    assert table.exit_code == 0 and "Confusion matrix" in table.stdout and "Precision" in table.stdout


@pytest.mark.slow
def test_train_plain_output_has_one_row_per_epoch(runner, tmp_path):
    result = runner.invoke(app, ["train", "I0", "--dataset", "synthetic", "--epochs", "2", "--limit", "300",
                                 "--runs-dir", str(tmp_path), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    rows = [line for line in result.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert len(rows) == 2 and "Done:" in result.stdout


@pytest.mark.slow
def test_train_defaults_to_the_final_iteration(runner, tmp_path):
    result = runner.invoke(app, ["train", "--dataset", "synthetic", "--epochs", "1", "--limit", "256",
                                 "--runs-dir", str(tmp_path), "--device", "cpu", "--quiet", "--json"])
    assert result.exit_code == 0, result.output
    from mnistkit.experiments import find_experiments

    assert json.loads(result.stdout)["model"] == find_experiments().final.model == "I3"   # final: true in the change-log


@pytest.mark.parametrize("args,needle", [
    (["train", "NOPE"], "unknown model"),
    (["train", "--epochs", "0"], "'--epochs'"),
    (["train", "--batch-size", "0"], "'--batch-size'"),
    (["train", "--lr", "-1"], "lr must be"),
    (["train", "--dataset", "cifar"], "'cifar' is not one of"),
    (["train", "--precision", "fp8"], "'fp8' is not one of"),
    (["train", "--seeds", "x"], "seeds must be"),
    (["train", "--seed", "1", "--seeds", "3"], "not both"),
    (["train", "--val", "-1"], "'--val'"),
    (["train", "--limit", "0"], "'--limit'"),
    (["train", "--unknown-flag"], "No such option"),
    (["models", "--budget", "-5"], "'--budget'"),
    (["compare", "--format", "xml"], "unknown format"),
    (["runs", "--runs-dir", "/etc/passwd"], "is not a folder"),
    (["train", "--device", "tpu"], "unknown device"),
    (["train", "--dataset", "synthetic", "--limit", "100000"], "larger than"),
    (["train", "--resume", "x", "--epochs", "3"], "drop --epochs"),
    (["evaluate", "no/such/run"], "does not exist"),
] + ([] if torch.cuda.is_available() else [(["train", "--device", "cuda"], "no CUDA GPU")]))
def test_bad_input_is_one_line_without_traceback(runner, tmp_path, args, needle):
    result = runner.invoke(app, args + ["--runs-dir", str(tmp_path)] if args[0] == "train" else args)
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.stderr
    assert lines[0].startswith("error: ")


@pytest.mark.slow
@pytest.mark.parametrize("args", [["--precision", "BF16"], ["--precision", "Fp32"], ["--dataset", "SYNTHETIC"]])
def test_choices_accept_any_case(runner, tmp_path, args):
    result = runner.invoke(app, ["train", "I3", "--dataset", "synthetic", "--epochs", "1", "--limit", "256",
                                 "--runs-dir", str(tmp_path), "--device", "cpu", "--quiet", "--json", *args])
    assert result.exit_code == 0, result.output
    config = (tmp_path / json.loads(result.stdout)["run_dir"] / "config.yaml").read_text()
    if args[0] == "--precision":
        assert f"precision: {args[1].lower()}" in config


@pytest.mark.slow
def test_data_dir_with_a_tilde_is_the_home_folder(runner, tmp_path, monkeypatch):
    # "~/mnist" once became <cwd>/~/mnist, and a folder literally named "~" appeared
    from helpers import write_fake_mnist

    home = tmp_path / "home"
    write_fake_mnist(home / "mnist", n_train=64, n_test=32)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    result = runner.invoke(app, ["train", "I3", "--data-dir", "~/mnist", "--epochs", "1", "--device", "cpu",
                                 "--runs-dir", str(tmp_path / "runs"), "--quiet", "--json"])
    assert result.exit_code == 0, result.output
    assert not (work / "~").exists()
    run = json.loads(result.stdout)["run_dir"]
    assert f"data_dir: {home / 'mnist'}" in (tmp_path / run / "config.yaml").read_text()
    ev = runner.invoke(app, ["evaluate", run, "--data-dir", "~/mnist", "--device", "cpu", "--json"])
    assert ev.exit_code == 0, ev.output
    assert not (work / "~").exists()


def test_missing_mnist_offline_is_one_line(runner, tmp_path, monkeypatch):
    import torchvision.datasets

    def no_network(*args, **kwargs):
        raise RuntimeError("Error downloading: [Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "MNIST", no_network)
    result = runner.invoke(app, ["train", "--data-dir", str(tmp_path / "none"), "--runs-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert "could not be downloaded" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_recipe_prints_the_resolved_recipe_as_yaml_naming_the_changelog_once(runner, tmp_path, monkeypatch):
    import yaml

    from mnistkit.experiments import find_experiments, resolve_recipe

    monkeypatch.chdir(tmp_path)  # no ./experiments.yaml: the shipped change-log
    result = runner.invoke(app, ["recipe", "I2"])
    assert result.exit_code == 0, result.output
    printed = yaml.safe_load(result.stdout)
    assert printed == resolve_recipe("I2", find_experiments(None)).to_dict()
    assert printed["nesterov"] is True and printed["label_smoothing"] == 0.05  # I2's own entry, not the defaults
    assert result.stdout.splitlines()[0].startswith("# I2: change-log: ")
    assert "change-log" not in result.stderr  # said once, on stdout, where the YAML keeps it

    unknown = runner.invoke(app, ["recipe", "I9"])
    assert unknown.exit_code != 0 and unknown.stdout == ""
    assert len(unknown.stderr.strip().splitlines()) == 1 and "I9" in unknown.stderr


def test_help_shows_flags_as_flags_and_values_with_their_type(runner):
    from typer.main import get_command

    group = get_command(app)
    for name, command in [("", group), *group.commands.items()]:
        result = runner.invoke(app, [*([name] if name else []), "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, (name, result.output)
        assert "<bool>" not in result.output, (name, result.output)   # --json, --version, --debug take no value
    summary = runner.invoke(app, ["summary", "--help"], env={"COLUMNS": "200"}).output
    assert re.search(r"--json\s+The same as --format json", summary) and re.search(r"--budget\s+<int range>", summary)
