import csv
import io
import json
import re
import sys

import pytest

from mnistkit import compare
from mnistkit.cli import app
from mnistkit.experiments import ExperimentsError, load_experiments
from mnistkit.training import DataOptions, Recipe, train

@pytest.fixture(scope="module")
def changelog(tmp_path_factory):
    """A change-log whose I2 reports a wrong parameter count, and tiny synthetic runs of I0, I1, I3
    written by the project's own trainer (I2 is left unrun)."""
    root = tmp_path_factory.mktemp("compare")
    text = (
        "version: 1\n"
        "constraints: {max_params: 20000, batchnorm: true, dropout: true, max_epochs: 20, min_test_acc: 50.0}\n"
        "defaults: {batch_size: 128, lr: 0.05}\n"
        "iterations:\n"
        "  - {id: I0, model: I0, changes: base, reported: {params: 18060, train_acc: 93.0, test_acc: 98.0, epochs: 1, lr_scheduler: 0.1/StepLR}, recipe: {epochs: 1, scheduler: step}}\n"
        "  - {id: I1, model: I1, changes: bn, reported: {params: 20978, train_acc: 99.5, test_acc: 99.6, epochs: 2, lr_scheduler: 0.2/OneCycleLR}, recipe: {epochs: 2}}\n"
        "  - {id: I2, model: I2, changes: tr, reported: {params: 19000, test_acc: 99.6}, recipe: {epochs: 2}}\n"
        "  - {id: I3, model: I3, changes: gap, reported: {params: 14500, train_acc: 99.7, test_acc: 99.6, epochs: 2}, recipe: {epochs: 2}}\n"
    )
    path = root / "experiments.yaml"
    path.write_text(text)
    exp = load_experiments(path)
    runs = root / "runs"
    results = {}
    for model in ("I0", "I1", "I3"):
        recipe = Recipe.from_dict(exp.recipe_dict(model))
        results[model] = train(model, recipe, DataOptions("synthetic", limit=512), device="cpu", runs_dir=runs)
    return exp, runs, results


def test_measured_beside_reported(changelog):
    exp, runs, results = changelog
    report = compare.build_report(exp, runs)
    rows = {r["id"]: r for r in report["iterations"]}
    for model, result in results.items():
        m = rows[model]["measured"]
        assert m["test_acc"] == result.metrics[-1]["test_acc"]
        assert m["train_acc"] == result.metrics[-1]["train_acc"]
        assert m["epochs"] == len(result.metrics) and m["complete"]
        assert m["test_acc_curve"] == [r["test_acc"] for r in result.metrics]
        assert m["gap"] == pytest.approx(m["train_acc"] - m["test_acc"])
    assert rows["I2"]["measured"] is None
    assert rows["I1"]["reported"]["test_acc"] == 99.6  # reported figures pass through untouched
    assert rows["I1"]["delta_test_acc"] == pytest.approx(rows["I1"]["measured"]["test_acc"] - rows["I0"]["measured"]["test_acc"])
    assert rows["I3"]["delta_test_acc"] is None  # previous iteration (I2) not run
    assert rows["I1"]["delta_params"] == 20978 - 18060


def test_params_mismatch_is_flagged(changelog):
    exp, runs, _ = changelog
    report = compare.build_report(exp, runs)
    flags = {r["id"]: r["params_match"] for r in report["iterations"]}
    assert flags == {"I0": True, "I1": True, "I2": False, "I3": True}
    assert "19,000 / 19,494 **MISMATCH**" in compare.to_markdown(report)


def test_checklist_is_computed(changelog):
    exp, runs, results = changelog
    rows = {r["id"]: r["checks"] for r in compare.build_report(exp, runs)["iterations"]}
    assert rows["I0"]["batchnorm"] is False and rows["I0"]["dropout"] is False and rows["I0"]["params"] is True
    assert rows["I1"]["params"] is False  # 20,978 is not under 20,000
    assert rows["I2"]["epochs"] is None and rows["I2"]["test_acc"] is None  # not run
    assert rows["I3"]["test_acc"] is (results["I3"].metrics[-1]["test_acc"] >= 50.0)
    assert rows["I3"]["epochs"] is True


def test_newest_run_wins(changelog, tmp_path):
    exp, runs, _ = changelog
    import shutil

    copy = tmp_path / "runs"
    shutil.copytree(runs, copy)
    newer = train("I3", Recipe(epochs=1, batch_size=128, lr=0.05), DataOptions("synthetic", limit=256),
                  device="cpu", runs_dir=copy)
    row = {r["id"]: r for r in compare.build_report(exp, copy)["iterations"]}["I3"]
    assert row["measured"]["run"] == str(newer.run_dir) and row["measured"]["epochs"] == 1
    assert row["measured"]["complete"]  # its own recipe asked for one epoch


def test_exports_hold_the_same_numbers(changelog):
    exp, runs, _ = changelog
    report = compare.build_report(exp, runs)
    flat = compare.flat_rows(report)
    # JSON
    assert json.loads(compare.to_json(report)) == json.loads(json.dumps(report))
    # CSV
    parsed = list(csv.DictReader(io.StringIO(compare.to_csv(report))))
    assert [r["id"] for r in parsed] == ["I0", "I1", "I2", "I3"]
    for got, want in zip(parsed, flat):
        for key in ("params_measured", "test_acc_measured", "train_acc_measured", "best_epoch"):
            assert got[key] == ("" if want[key] is None else str(want[key]))
    # Markdown: a header, a separator and one row per iteration in each table
    md = compare.to_markdown(report)
    table_rows = [line for line in md.splitlines() if line.startswith("| I") and not line.startswith("| Iter")]
    assert len(table_rows) == 8
    i3 = next(line for line in table_rows if line.startswith("| I3 | gap"))
    assert f"{flat[3]['test_acc_measured']:.2f}%" in i3


def test_cli_compare_formats_and_output(changelog, runner, tmp_path):
    exp, runs, _ = changelog
    base = ["compare", "--experiments", str(exp.path), "--runs-dir", str(runs)]
    table = runner.invoke(app, base)
    assert table.exit_code == 0, table.output
    assert "not run" in table.stdout and "Assignment checklist" in table.stdout
    out = tmp_path / "report.json"
    result = runner.invoke(app, base + ["--format", "json", "--output", str(out)])
    assert result.exit_code == 0 and result.stdout == ""
    assert json.loads(out.read_text())["iterations"][2]["params_match"] is False
    csv_out = runner.invoke(app, base + ["-f", "csv"])
    assert csv_out.stdout.splitlines()[0].startswith("id,changes,")
    bad = runner.invoke(app, base + ["--format", "xml"])
    assert bad.exit_code == 2 and "unknown format" in bad.stderr


def test_plot_png(changelog, tmp_path):
    pytest.importorskip("matplotlib")
    exp, runs, _ = changelog
    path = tmp_path / "acc.png"
    compare.plot(compare.build_report(exp, runs), path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_plot_without_matplotlib_says_how_to_install(changelog, tmp_path, monkeypatch, runner):
    exp, runs, _ = changelog
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    result = runner.invoke(app, ["compare", "--experiments", str(exp.path), "--runs-dir", str(runs),
                                 "--plot", str(tmp_path / "x.png")])
    assert result.exit_code == 1 and "pip install" in result.stderr and "matplotlib" in result.stderr
    assert not (tmp_path / "x.png").exists()


def test_sparkline():
    assert compare.sparkline([1, 2, 3]) == "▁▅█"
    assert compare.sparkline([5, 5]) == "██"
    assert compare.sparkline([]) == ""


# ---------------------------------------------------------------- schema errors

from pathlib import Path

SHIPPED = Path(__file__).resolve().parent.parent / "experiments.yaml"
GOOD = SHIPPED.read_text()


@pytest.mark.parametrize("edit,needle", [
    (lambda t: t.replace("recipe: {epochs: 12}", "recipe: {epochs: 12, learning_rate: 3}"),
     r"line \d+: iterations\[2\]\.recipe\.learning_rate: unknown key"),
    (lambda t: t.replace("recipe: {epochs: 12}", "recipe: {epochs: twelve}"),
     r"line \d+: iterations\[2\]\.recipe\.epochs: must be int, not str"),
    (lambda t: t.replace("  - id: I2", "  - id: I1"), r"iterations\[2\]\.id: iteration id 'I1' appears twice"),
    (lambda t: t.replace("    model: I2", "    model: I7"), r"model 'I7' is not registered; known models: I0, I1, I2, I3"),
    (lambda t: t.replace("  max_params: 20000", "  max_parms: 20000"), r"line 8: constraints\.max_parms: unknown key"),
    (lambda t: t.replace("train_acc: 99.6, test_acc", "train_acc: high, test_acc"),
     r"reported\.train_acc: must be int or float, not str"),
    (lambda t: t.replace("    degrees: 10", "    degreez: 10"), r"defaults\.augment\.degreez: unknown key"),
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


def test_the_shipped_changelog_is_valid_and_exact():
    exp = load_experiments(SHIPPED)
    assert [it.id for it in exp.iterations] == ["I0", "I1", "I2", "I3"]
    reported = [(it.reported["params"], it.reported["train_acc"], it.reported["test_acc"], it.reported["epochs"],
                 it.reported["lr_scheduler"]) for it in exp.iterations]
    assert reported == [(18060, 93.0, 98.0, 1, "0.1/StepLR"), (20978, 99.5, 99.6, 10, "0.2/OneCycleLR"),
                        (19494, 99.6, 99.6, 12, "0.2/OneCycleLR"), (14500, 99.7, 99.6, 15, "0.2/OneCycleLR")]
    assert exp.constraints == {"max_params": 20000, "batchnorm": True, "dropout": True, "max_epochs": 20,
                               "min_test_acc": 99.4}


def test_missing_experiments_file_on_the_cli(runner, tmp_path):
    result = runner.invoke(app, ["compare", "--experiments", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 1 and "not found" in result.stderr and len(result.stderr.strip().splitlines()) == 1
