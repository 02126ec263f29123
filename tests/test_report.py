"""mnistkit report (the write-up as a folder or one HTML file), mnistkit plot (curves of any
runs), and the data-flow graph behind the architecture diagram."""

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from mnistkit.cli import app
from mnistkit.introspect.graph import model_graph
from mnistkit.recipe import DataOptions, Recipe
from mnistkit.render.report import mermaid, text_flow
from mnistkit.introspect.summary import summarize
from mnistkit.training.loop import train
from tests.test_compare import wanted, OFFICIAL, changelog_and_runs, recorded_run

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """The test change-log; I3 has two comparable seeds: one trained here (on synthetic digits,
    its config marked as official MNIST so that it counts: only the report's drawing is tested),
    one recorded (no checkpoint)."""
    root = tmp_path_factory.mktemp("report")
    exp, runs = changelog_and_runs(root)
    recipe = wanted(exp, "I3")
    run = train("I3", recipe.replace(seed=1), DataOptions("synthetic", limit=256), device="cpu", runs_dir=runs).run_dir
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["measured_on"] = OFFICIAL
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    recorded_run(runs, "I3", recipe.replace(seed=2), [0.1, 0.1, 0.1, 0.1])  # below the trained run
    return exp, runs, run


@pytest.mark.slow   # starts processes or builds a whole report: not the quick loop's
def test_the_report_folder_has_every_part_computed(runner, project, tmp_path):
    exp, runs, run = project
    out = tmp_path / "report"
    args = ["report", "--experiments", str(exp.path), "--runs-dir", str(runs), "-o", str(out), "--device", "cpu"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    names = {p.name for p in out.iterdir()}
    explained = sorted(n for n in names if n.startswith("explain-"))   # explain on the 3 most confident mistakes
    assert names - set(explained) == {"README.md", "curves.png", "misclassified.png", "confusion.png",
                                      ".mnistkit-report"}
    assert explained == ["explain-1.png", "explain-2.png", "explain-3.png"]
    assert all((out / n).read_bytes().startswith(PNG) for n in ("curves.png", "misclassified.png", "confusion.png",
                                                                *explained))
    md = (out / "README.md").read_text()
    assert "## The model at a glance: I3, the final iteration" in md and "| Parameters | 14,500 trainable" in md
    for it in ("I0", "I1", "I2", "I3"):
        assert f"\n## {it}: " in md
    assert md.count("```mermaid\nflowchart TD") == 4 and "### Layers" in md
    # I3's result is the two seeds' final epochs; the others say they have no comparable run
    assert "over 2 seeds (1, 2): MNIST, 60,000 training images, 4 epochs" in md
    assert md.count("no comparable run yet") == 3
    assert "| I1 | params | not met | 20,978 trainable parameters" in md   # exploratory: shown, not gated
    assert "Every check of the final iteration, I3, passes." not in md and "checks of the final iteration, I3, fail" in md
    assert f"(seed 1, `{run}`)" in md and "synthetic test images" in md  # evaluated on the run's own data
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (out / link).is_file()

    # a second report replaces the folder as a whole (what it wrote, and only that)
    (out / "curves.png").write_bytes(b"old")
    assert runner.invoke(app, args).exit_code == 0 and (out / "curves.png").read_bytes().startswith(PNG)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".report.")]  # no staging folder left


@pytest.mark.slow   # starts processes or builds a whole report: not the quick loop's
def test_the_html_report_is_one_self_contained_file(runner, project, tmp_path):
    exp, runs, _ = project
    out = tmp_path / "r.html"
    result = runner.invoke(app, ["report", "--experiments", str(exp.path), "--runs-dir", str(runs),
                                 "--format", "html", "-o", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    # curves, misclassified, confusion, and explain on the 3 most confident mistakes
    assert page.count("<img ") == 6 and page.count('src="data:image/png;base64,') == 6
    assert not re.search(r"(src|href)=\"(https?:)?//", page)  # nothing fetched from anywhere
    assert "default-src 'none'" in page and "<script" not in page
    assert page.count("<table>") >= 4 and "<h2>I3: gap</h2>" in page and "<pre>[0] input 1x28x28\n   ↓\n[1] c1.conv" in page
    assert "```" not in page and "|---" not in page  # every Markdown construct was converted


def test_an_empty_runs_folder_gives_a_report_that_says_nothing_is_measured(runner, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["report", "--runs-dir", "nothing-here"])
    assert result.exit_code == 0, result.output
    md = (tmp_path / "report" / "README.md").read_text()
    assert "No comparable run yet: nothing measured." in md and "No comparable run to evaluate yet." in md
    assert not (tmp_path / "report" / "curves.png").exists()


def test_report_never_replaces_a_folder_it_did_not_write(runner, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    result = runner.invoke(app, ["report", "--runs-dir", "r", "-o", "mine"])
    assert result.exit_code == 1 and "notes.txt, which mnistkit did not write" in result.stderr
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep" and len(list((tmp_path / "mine").iterdir())) == 1
    (tmp_path / "runs").mkdir()
    result = runner.invoke(app, ["report", "--runs-dir", str(tmp_path / "runs"), "-o", str(tmp_path)])
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.body = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = x + self.body(x)
        return self.head(x.mean((2, 3)))


class Branchy(nn.Module):
    """Data-dependent control flow: fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 10, 28)

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > 0:
            y = y * 2
        return y.flatten(1)


def test_the_diagram_follows_the_data_flow_of_a_residual_model():
    model = Residual()
    g = model_graph(model, summarize(model))
    assert g.traced
    add = next(n for n in g.nodes if n.op == "add")
    assert set(add.inputs) == {"relu", "body"}
    chart = mermaid(g, summarize(model))
    assert "relu --> add" in chart and "body --> add" in chart and 'body["body: Conv2d 3x3/1/1 → 4x28x28' in chart
    assert "← [" in text_flow(g, summarize(model))  # the add names both of its inputs

    untraceable = Branchy()
    g = model_graph(untraceable, summarize(untraceable))
    assert not g.traced and "TraceError" in g.why and g.nodes[0].op == "input"
    assert [n.layer for n in g.nodes[1:]] == list(range(len(summarize(untraceable).layers)))  # the rows in order


@pytest.mark.slow
def test_plot_draws_any_runs_and_labels_them(runner, tmp_path):
    runs = tmp_path / "runs"
    a = train("I4", Recipe(epochs=2), DataOptions("synthetic", limit=128), device="cpu", runs_dir=runs).run_dir
    out = tmp_path / "c.png"
    result = runner.invoke(app, ["plot", str(a), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_bytes().startswith(PNG) and "1 run" in result.stderr
    from mnistkit.results.curves import run_curves

    (curve,) = run_curves([str(runs)])
    assert curve.label == "I4, 2 epochs, synthetic 128 images, seed 42" and len(curve.metrics) == 2

    for bad, needle in ((tmp_path / "nope", "is not a run folder"), (a / "best.pt", "is not a run folder")):
        result = runner.invoke(app, ["plot", str(bad), "-o", str(out)])
        assert result.exit_code == 2 and needle in result.stderr
    result = runner.invoke(app, ["plot", str(a), "-o", str(a / "last.pt")])
    assert result.exit_code == 1 and "file of the run folder" in result.stderr


def test_user_text_cannot_break_the_write_ups_tables_or_headings(runner, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "experiments.yaml").write_text(
        "version: 1\nconstraints: {batchnorm: true}\niterations:\n"
        "  - {id: I1, model: I1, changes: 'pipe | here', target: 'a <script>x</script>', "
        "analysis: \"line one\\n# not a heading\\n| a | b |\"}\n")
    assert runner.invoke(app, ["report", "--runs-dir", "r"]).exit_code == 0
    md = (tmp_path / "report" / "README.md").read_text()
    assert "| I1 | pipe \\| here |" in md                       # one cell, as written
    assert "- **Analysis:** line one # not a heading \\| a \\| b \\|" in md or \
        "- **Analysis:** line one # not a heading | a | b |" in md
    assert "\n# not a heading" not in md
    assert "| Parameters | 20,978 trainable (the change-log sets no parameter limit) |" in md
    assert runner.invoke(app, ["report", "--runs-dir", "r", "--format", "html", "-o", "r.html"]).exit_code == 0
    page = (tmp_path / "r.html").read_text()
    assert "<script>" not in page and "&lt;script&gt;" in page and "<h1>not a heading" not in page


def test_a_report_folder_keeps_what_you_added_and_never_takes_the_current_folder(runner, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert runner.invoke(app, ["report", "--runs-dir", "r"]).exit_code == 0
    (tmp_path / "report" / "my-notes.md").write_text("mine")
    result = runner.invoke(app, ["report", "--runs-dir", "r"])
    assert result.exit_code == 1 and "my-notes.md, which mnistkit did not write" in result.stderr
    assert (tmp_path / "report" / "my-notes.md").read_text() == "mine"
    (tmp_path / "report" / "my-notes.md").unlink()
    assert runner.invoke(app, ["report", "--runs-dir", "r"]).exit_code == 0   # its own files: replaced
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path / "empty")
    for target in (".", ".."):
        result = runner.invoke(app, ["report", "--runs-dir", "r", "-o", target])
        assert result.exit_code == 1 and "it is the current folder or holds it" in result.stderr
    assert (tmp_path / "empty").is_dir() and not list((tmp_path / "empty").iterdir())


def test_the_at_a_glance_and_the_checklist_show_the_final_iteration_not_the_last(runner, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "experiments.yaml").write_text(
        "version: 1\nconstraints: {max_params: 20000, batchnorm: true}\niterations:\n"
        "  - {id: I0, model: I0, changes: base}\n  - {id: I3, model: I3, changes: gap, final: true}\n"
        "  - {id: I1, model: I1, changes: a later experiment}\n")
    result = runner.invoke(app, ["report", "--runs-dir", "r"])
    assert result.exit_code == 0, result.output
    md = (tmp_path / "report" / "README.md").read_text()
    assert "## The model at a glance: I3, the final iteration\n\nI3 is the iteration handed in (marked " \
           "`final: true` in the change-log)" in md and "| Parameters | 14,500 trainable" in md
    assert "Every check of the final iteration, I3, passes." in md
    gated = md.split("| Iteration | Check |")[1].split("\n\n")[0]
    assert "| I3 | params | pass |" in gated and "| I0 |" not in gated and "| I1 |" not in gated
    assert "| I0 | batchnorm | not met |" in md and "| I1 | params | not met |" in md   # shown, not gated
    assert "The mistakes shown here are the final iteration's (I3)" in md
    assert "| I3 (final) |" in md   # compare's tables in the write-up show every iteration, the final marked
