import csv
import io
import json
import re
import sys
import time
from pathlib import Path

import pytest
import yaml

from mnistkit import render

from mnistkit.results import compare

from mnistkit.files import strictjson
from mnistkit.cli import app
from mnistkit.errors import ExperimentsError
from mnistkit.experiments import find_experiments, load_experiments
from mnistkit.recipe import DataOptions, Recipe
from mnistkit.runs.metrics import EpochMetrics
from mnistkit.runs.metrics import metrics_text
from mnistkit.training.loop import train

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "mnistkit" / "experiments.yaml"
GOOD = SHIPPED.read_text()

CHANGELOG = (
    "version: 1\n"
    "constraints: {max_params: 20000, batchnorm: true, dropout: true, max_epochs: 20, min_test_acc: 99.4}\n"
    "defaults: {batch_size: 128, lr: 0.05}\n"
    "iterations:\n"
    "  - {id: I0, model: I0, changes: base, reported: {params: 18060, train_acc: 93.0, test_acc: 98.0, epochs: 1, lr_scheduler: 0.1/StepLR}, recipe: {epochs: 1, scheduler: step}}\n"
    "  - {id: I1, model: I1, changes: bn, reported: {params: 20978, train_acc: 99.5, test_acc: 99.6, epochs: 2, lr_scheduler: 0.05/OneCycleLR}, recipe: {epochs: 2}}\n"
    "  - {id: I2, model: I2, changes: tr, reported: {params: 19000, test_acc: 99.6}, recipe: {epochs: 2}}\n"
    "  - {id: I3, model: I3, changes: gap, reported: {params: 14500, train_acc: 99.7, test_acc: 99.6, epochs: 4}, recipe: {epochs: 4}}\n"
)

OFFICIAL = {"dataset": "mnist", "official_mnist": True, "train_samples": 60000, "val_samples": 0,
            "test_samples": 10000, "full_training_set": True}


def recorded_run(runs: Path, model: str, recipe: Recipe, test_accs: list[float], measured_on: dict = OFFICIAL,
                 name: str | None = None) -> Path:
    """A run folder as the trainer writes it (config.yaml and metrics.jsonl), for runs a test
    cannot afford to train: 60,000 real images. compare reads nothing else."""
    folder = runs / (name or f"{model}-seed{recipe.seed}-{time.monotonic_ns()}")
    folder.mkdir(parents=True)
    config = {"model": model, "params": 0, "recipe": recipe.replace(precision="bf16").to_dict(),
              "data": DataOptions("mnist").to_dict(), "measured_on": measured_on}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    (folder / "metrics.jsonl").write_text(metrics_text([EpochMetrics(i + 1, 0.1, acc + 0.1, 0.02, acc, 0.01, 10.0,
                                                                   5000.0) for i, acc in enumerate(test_accs)]))
    return folder


def changelog_and_runs(tmp_path: Path):
    """The small test change-log, loaded, and an (empty) runs folder beside it."""
    path = tmp_path / "experiments.yaml"
    path.write_text(CHANGELOG)
    return load_experiments(path), tmp_path / "runs"


@pytest.fixture(scope="module")
def changelog(tmp_path_factory):
    """A change-log whose I2 reports a wrong parameter count, and tiny synthetic runs of I0, I1, I3
    written by the project's own trainer (I2 is left unrun)."""
    root = tmp_path_factory.mktemp("compare")
    path = root / "experiments.yaml"
    path.write_text(CHANGELOG)
    exp = load_experiments(path)
    runs = root / "runs"
    results = {}
    for model in ("I0", "I1", "I3"):
        recipe = wanted(exp, model)
        results[model] = train(model, recipe, DataOptions("synthetic", limit=512), device="cpu", runs_dir=runs)
    return exp, runs, results


def wanted(exp, model):
    """The change-log's recipe of the iteration that trains ``model``."""
    return Recipe.from_dict(exp.recipe_for(exp.iteration_for_model(model)))


@pytest.mark.slow
def test_synthetic_and_shortened_runs_never_turn_a_cell_green(changelog, runner, tmp_path):
    exp, runs, results = changelog
    import shutil

    copy = tmp_path / "runs"
    shutil.copytree(runs, copy)
    # an official-MNIST run that is shortened (5,000 images, 2 of 4 epochs) and reaches the target
    short = dict(OFFICIAL, train_samples=5000, full_training_set=False)
    recorded_run(copy, "I3", wanted(exp, "I3").replace(epochs=2), [99.5, 99.6], short)
    result = runner.invoke(app, ["compare", "--experiments", str(exp.path), "--runs-dir", str(copy), "--json"])
    assert result.exit_code == 0, result.output
    report = strictjson.loads(result.stdout)
    for row in report["iterations"]:
        assert row["measured"] is None
        assert row["checks"]["test_acc"] is None and row["checks"]["consistent"] is None
        assert compare.check_passed(row["checks"]["test_acc"]) is None
    i3 = {r["id"]: r for r in report["iterations"]}["I3"]
    reasons = [" ".join(r["why_not"]) for r in i3["other_runs"]]
    assert any("synthetic data" in r for r in reasons)
    assert any("5,000 training images" in r and "epochs 2 (change-log: 4)" in r for r in reasons)
    table = runner.invoke(app, ["compare", "--experiments", str(exp.path), "--runs-dir", str(copy), "--all-runs"])
    assert table.exit_code == 0, table.output
    checklist = table.stdout.split("Assignment checklist")[1].split("no comparable run")[0]
    assert not re.search(r"✓ \d+/\d+", checklist) and "no run" in checklist
    assert "no comparable run" in table.stdout and "mnistkit train I3 --seeds 3" in table.stdout
    assert "Other runs" in table.stdout and "5,000 training images" in table.stdout


def test_comparable_runs_are_aggregated_over_seeds(tmp_path):
    exp, runs = changelog_and_runs(tmp_path)
    base = wanted(exp, "I3")
    recorded_run(runs, "I3", base.replace(seed=1), [99.0, 99.45, 99.5, 99.5])   # passes, consistent
    recorded_run(runs, "I3", base.replace(seed=2), [99.0, 99.5, 99.3, 99.45])   # passes, not consistent
    recorded_run(runs, "I3", base.replace(seed=3), [99.0, 99.5, 99.5, 99.3])    # fails
    recorded_run(runs, "I3", base.replace(seed=4, lr=0.2), [99.9, 99.9, 99.9, 99.9])  # another recipe: ignored
    recorded_run(runs, "I3", base.replace(seed=5), [99.9, 99.9, 99.9, 99.9],
                 dict(OFFICIAL, official_mnist=False))  # other IDX files: ignored
    row = {r["id"]: r for r in compare.build_report(exp, runs)["iterations"]}["I3"]
    m = row["measured"]
    assert m["seeds"] == [1, 2, 3] and m["n"] == 3
    assert m["test_acc"]["mean"] == pytest.approx((99.5 + 99.45 + 99.3) / 3)
    assert m["test_acc"]["std"] == pytest.approx(0.1040833, abs=1e-6) and m["test_acc"]["min"] == 99.3
    assert (m["passes"], m["consistent"]) == (2, 1)
    assert row["checks"]["test_acc"] == {"passed": 2, "of": 3} and row["checks"]["consistent"] == {"passed": 1, "of": 3}
    assert compare.check_passed(row["checks"]["test_acc"]) is False
    why = {r["seed"]: r["why_not"] for r in row["other_runs"]}
    assert why[4] == ["lr 0.2 (change-log: 0.05)"]
    assert why[5] == ["MNIST files that differ from the official release"]
    assert render.check_cell(row["checks"]["test_acc"])[0] == "✗ 2/3"
    # all seeds pass: a green cell, and it says how many seeds it stands for
    recorded_run(runs, "I3", base.replace(seed=3), [99.0, 99.5, 99.5, 99.6])  # the newest run of seed 3 wins
    row = {r["id"]: r for r in compare.build_report(exp, runs)["iterations"]}["I3"]
    assert row["checks"]["test_acc"] == {"passed": 3, "of": 3} and render.check_cell(row["checks"]["test_acc"])[0] == "✓ 3/3"


def test_params_mismatch_is_flagged(tmp_path):
    path = tmp_path / "experiments.yaml"
    path.write_text(CHANGELOG)
    report = compare.build_report(load_experiments(path), tmp_path / "none")
    flags = {r["id"]: r["params_match"] for r in report["iterations"]}
    assert flags == {"I0": True, "I1": True, "I2": False, "I3": True}
    assert "19,000 / 19,494 **MISMATCH**" in render.compare_markdown(report)
    checks = {r["id"]: r["checks"] for r in report["iterations"]}
    assert checks["I0"]["batchnorm"] is False and checks["I0"]["dropout"] is False and checks["I0"]["params"] is True
    assert checks["I1"]["params"] is False  # 20,978 is not under 20,000
    assert checks["I3"]["epochs"] is True  # the recipe's 4 epochs < 20


def test_exports_hold_the_same_numbers(tmp_path):
    exp, runs = changelog_and_runs(tmp_path)
    for seed, accs in ((1, [99.1, 99.2, 99.41, 99.52]), (2, [99.0, 99.3, 99.44, 99.48])):
        recorded_run(runs, "I3", wanted(exp, "I3").replace(seed=seed), accs)
    report = compare.build_report(exp, runs)
    flat = compare.flat_rows(report)
    assert strictjson.loads(render.json_text(report)) == json.loads(json.dumps(report))
    parsed = list(csv.DictReader(io.StringIO(render.compare_csv(report))))
    assert [r["id"] for r in parsed] == ["I0", "I1", "I2", "I3"]
    for got, want in zip(parsed, flat):
        for key in ("params_measured", "test_acc_mean", "seeds_passing", "train_samples"):
            assert got[key] == ("" if want[key] is None else str(want[key]))
    md = render.compare_markdown(report)
    i3 = next(line for line in md.splitlines() if line.startswith("| I3 (final) | gap"))
    assert "99.50 ± 0.03%" in i3 and "| 2 |" in i3
    checklist = next(line for line in md.splitlines() if line.startswith("| I3 (final) | ✅"))
    assert "✅ 2/2" in checklist


def test_cli_compare_formats_and_output(runner, tmp_path):
    path = tmp_path / "experiments.yaml"
    path.write_text(CHANGELOG)
    base = ["compare", "--experiments", str(path), "--runs-dir", str(tmp_path / "runs")]
    table = runner.invoke(app, base)
    assert table.exit_code == 0, table.output
    assert "no run" in table.stdout and "Assignment checklist" in table.stdout
    assert f"change-log: {path} (as given)" in table.stderr
    out = tmp_path / "report.json"
    result = runner.invoke(app, base + ["--format", "json", "--output", str(out)])
    assert result.exit_code == 0 and result.stdout == ""
    assert strictjson.loads(out.read_text())["iterations"][2]["params_match"] is False
    assert runner.invoke(app, base + ["--json"]).stdout == runner.invoke(app, base + ["-f", "JSON"]).stdout
    csv_out = runner.invoke(app, base + ["-f", "csv"])
    assert csv_out.stdout.splitlines()[0].startswith("id,changes,")
    bad = runner.invoke(app, base + ["--format", "xml"])
    assert bad.exit_code == 2 and "unknown format" in bad.stderr


def test_compare_works_from_a_folder_without_a_changelog(runner, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["compare", "--json"])
    assert result.exit_code == 0, result.output
    report = strictjson.loads(result.stdout)
    assert [r["id"] for r in report["iterations"]] == ["I0", "I1", "I2", "I3", "I4", "I5"]
    assert report["experiments_source"] == "packaged" and "shipped with mnistkit" in result.stderr


@pytest.mark.slow
def test_train_from_a_folder_without_a_changelog_uses_the_iterations_recipe(runner, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["train", "I0", "--dataset", "synthetic", "--epochs", "1", "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    data = strictjson.loads(result.stdout)
    assert data["experiments"] == str(find_experiments().path) and "shipped with mnistkit" in result.stderr
    recipe = yaml.safe_load((Path(data["run_dir"]) / "config.yaml").read_text())["recipe"]
    # I0's own recipe, not the shared defaults (lr 0.2, momentum 0.9) that once killed it
    assert (recipe["lr"], recipe["momentum"], recipe["scheduler"], recipe["batch_size"]) == (0.1, 0.0, "step", 64)


def test_the_repo_changelog_is_the_packaged_one():
    top = ROOT / "experiments.yaml"
    assert top.read_text() == SHIPPED.read_text()


def test_plot_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "experiments.yaml"
    path.write_text(CHANGELOG)
    exp = load_experiments(path)
    recorded_run(tmp_path / "runs", "I3", wanted(exp, "I3"), [98.0, 99.0, 99.3, 99.5])
    data = render.compare_plot(compare.build_report(exp, tmp_path / "runs"))
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_plot_without_matplotlib_says_how_to_install(tmp_path, monkeypatch, runner):
    path = tmp_path / "experiments.yaml"
    path.write_text(CHANGELOG)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "r.md"
    result = runner.invoke(app, ["compare", "--experiments", str(path), "--runs-dir", str(tmp_path),
                                 "-f", "markdown", "-o", str(out), "--plot", str(tmp_path / "x.png")])
    assert result.exit_code == 1 and "pip install" in result.stderr and "matplotlib" in result.stderr
    assert not (tmp_path / "x.png").exists() and not out.exists()  # nothing half-done


def test_sparkline():
    assert render.sparkline([1, 2, 3]) == "▁▅█"
    assert render.sparkline([5, 5]) == "██"
    assert render.sparkline([]) == ""


# ---------------------------------------------------------------- schema errors


I2_RECIPE = "recipe: {epochs: 12, grad_clip: 5, batch_size: 128, weight_decay: 0.0002, augment: {interpolation: bilinear}, nesterov: true, label_smoothing: 0.05}"


def i2_recipe(text: str, new: str) -> str:
    """The shipped change-log with I2's recipe replaced by ``{<new>}``."""
    assert text.count(I2_RECIPE) == 1, "the shipped change-log changed: update I2_RECIPE"
    return text.replace(I2_RECIPE, "recipe: {" + new + "}")


@pytest.mark.parametrize("edit,needle", [
    (lambda t: i2_recipe(t, "epochs: 12, learning_rate: 3"),
     r"line \d+: iterations\[2\]\.recipe\.learning_rate: unknown key"),
    (lambda t: i2_recipe(t, "epochs: twelve"),
     r"line \d+: iterations\[2\]\.recipe\.epochs: must be int, not str"),
    (lambda t: t.replace("  - id: I2", "  - id: I1"), r"iterations\[2\]\.id: iteration id 'I1' appears twice"),
    (lambda t: t.replace("    model: I2", "    model: I7"), r"model 'I7' is not registered \(known models: I0, I1, I2, I3, I4, I5\) nor a FILE.py:Name"),
    (lambda t: t.replace("  max_params: 20000", "  max_parms: 20000"), r"line \d+: constraints\.max_parms: unknown key"),
    (lambda t: t.replace("train_acc: 99.6, test_acc", "train_acc: high, test_acc"),
     r"reported\.train_acc: must be int or float, not str"),
    (lambda t: i2_recipe(t, "epochs: 12, augment: {degreez: 10}"),
     r"iterations\[2\]\.recipe\.augment\.degreez: unknown key"),
    (lambda t: t + "defaults: {augment: {degreez: 10}}\n", r"defaults\.augment\.degreez: unknown key"),
    (lambda t: t + "extra: 1\n", r"extra: unknown key"),
    (lambda t: t.replace("iterations:", "iterations: 3\nold:"), r"iterations: must be list"),
    (lambda t: "a: [\n", r"line 2: not valid YAML"),
    (lambda t: "", r"the file is empty"),
    (lambda t: "- 1\n", r"must be a mapping, not list"),
])
def test_schema_errors_are_clear(tmp_path, edit, needle):
    path = tmp_path / "experiments.yaml"
    path.write_text(edit(GOOD))
    with pytest.raises(ExperimentsError) as info:
        load_experiments(path)
    message = str(info.value)
    assert message.startswith(str(path)) and "\n" not in message
    assert re.search(needle, message), message


def test_nested_aliases_and_endless_files_are_refused_quickly(tmp_path):
    laughs = "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
    for i in range(1, 12):  # 10**11 nodes once expanded
        laughs += f"{chr(97 + i)}: &{chr(97 + i)} [" + ", ".join(f"*{chr(96 + i)}" for _ in range(10)) + "]\n"
    path = tmp_path / "laughs.yaml"
    path.write_text(laughs + "iterations: []\n")
    # no clock here: expanded, these files would never end (10**11 nodes, an endless device),
    # so a refusal at all is the proof that neither was expanded or read to its end
    with pytest.raises(ExperimentsError, match="more than 20,000 YAML nodes"):
        load_experiments(path)
    with pytest.raises(ExperimentsError, match="a character device, not a regular file"):
        load_experiments("/dev/zero")


def test_the_shipped_changelog_is_valid_and_exact():
    exp = load_experiments(SHIPPED)
    assert [it.id for it in exp.iterations] == ["I0", "I1", "I2", "I3", "I4", "I5"]
    reported = [(it.reported["params"], it.reported["train_acc"], it.reported["test_acc"], it.reported["epochs"],
                 it.reported["lr_scheduler"]) for it in exp.iterations]
    assert reported == [(18060, 93.0, 98.0, 1, "0.1/StepLR"), (20978, 99.5, 99.6, 10, "0.2/OneCycleLR"),
                        (19494, 99.6, 99.6, 12, "0.2/OneCycleLR"), (14500, 99.7, 99.6, 15, "0.2/OneCycleLR"),
                        (4964, 99.29, 99.47, 15, "0.3/OneCycleLR"),    # I4: measured here (README)
                        (2882, 99.12, 99.42, 19, "0.3/OneCycleLR")]    # I5 taught by I3: the means of seeds 1, 2, 3, 42 (docs/distillation.md)
    assert exp.constraints == {"max_params": 20000, "batchnorm": True, "dropout": True, "max_epochs": 20,
                               "min_test_acc": 99.4}


def test_missing_experiments_file_on_the_cli(runner, tmp_path):
    result = runner.invoke(app, ["compare", "--experiments", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 1 and "not found" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_sweeps_trials_are_seen_by_compare(tmp_path):
    exp, runs = changelog_and_runs(tmp_path)
    recorded_run(runs / "my-sweep", "I3", wanted(exp, "I3").replace(seed=1), [99.1, 99.5, 99.5, 99.5], name="I3-seed1")
    row = {r["id"]: r for r in compare.build_report(exp, runs)["iterations"]}["I3"]
    assert row["measured"]["seeds"] == [1] and row["measured"]["runs"] == [str(runs / "my-sweep" / "I3-seed1")]


def test_the_per_seed_table_lists_each_seeds_final_accuracy_and_epoch_seconds(tmp_path):
    exp, runs = changelog_and_runs(tmp_path)
    base = wanted(exp, "I3")
    recorded_run(runs, "I3", base.replace(seed=2), [99.0, 99.45, 99.5, 99.52])
    recorded_run(runs, "I3", base.replace(seed=42), [99.0, 99.5, 99.3, 99.44])
    recorded_run(runs, "I1", wanted(exp, "I1").replace(seed=1), [99.1, 99.2])
    report = compare.build_report(exp, runs)
    m = {r["id"]: r for r in report["iterations"]}["I3"]["measured"]
    assert [(s["seed"], s["test_acc"], s["consistent"]) for s in m["per_seed"]] == [(2, 99.52, True), (42, 99.44, False)]
    assert m["seconds_per_epoch"]["mean"] == 10.0  # recorded_run writes 10 s per epoch
    text = render.compare_markdown(report)
    header = next(line for line in text.splitlines() if "| Seed 1 |" in line)
    assert header.startswith("| Iter | Params | Epochs | Seed 1 | Seed 2 | Seed 42 | Mean ± std | Min |")
    assert "| I3 | 14,500 | 4 |  | 99.52% | 99.44% | 99.48 ± 0.06% | 99.44% | 1/2 | 10.0 |" in text
    assert "| I1 | 20,978 | 2 | 99.20% |  |  | 99.20% | 99.20% | n/a (2 epochs) | 10.0 |" in text
