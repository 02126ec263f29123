"""mnistkit check: the change-log's constraints as a CI gate (exit 0 all pass, 1 a check failed,
2 when the checks cannot run), --static with no runs, JUnit XML a CI shows, JSON."""

import json
from xml.etree import ElementTree as ET

import pytest

from mnistkit.results.check import run_checks
from mnistkit.cli import app
from mnistkit.experiments import find_experiments
from mnistkit.recipe import Recipe
from tests.test_compare import wanted, changelog_and_runs, recorded_run


def test_static_checks_of_the_shipped_change_log(runner):
    # I3 is marked final: its checks gate; I0's missing BatchNorm and I1's 20,978 parameters are
    # an exploratory baseline's, shown and never failing the gate (issue 40 goal 6)
    result = runner.invoke(app, ["check", "--static"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert ("note  I1 params: 20,978 trainable parameters; fewer than 20,000 allowed (978 over) "
            "(exploratory: not gated)") in lines
    assert "note  I0 batchnorm: the model has no BatchNorm layer (exploratory: not gated)" in lines
    assert "pass  I3 params: 14,500 trainable parameters; fewer than 20,000 allowed (5,500 to spare)" in lines
    assert ("pass  I4 params: 4,964 trainable parameters; fewer than 20,000 allowed (15,036 to spare) "
            "(exploratory)") in lines
    assert not any("test_acc" in line for line in lines)  # static: no accuracy check, no runs read
    assert "pass  I5 epochs: the recipe trains 19 epochs; fewer than 20 allowed (exploratory)" in lines
    assert ("all 4 static checks (no training) of the final iteration I3 passed; exploratory iterations, not "
            "gated: 3 of 20 checks not met") in result.stderr

    # every iteration gates on request, as before 0.12; a named iteration gates, final or not
    every = runner.invoke(app, ["check", "--static", "--all-iterations"])
    assert every.exit_code == 1 and "3 of 24 static checks (no training) failed" in every.stderr
    assert "FAIL  I1 params: 20,978 trainable parameters; fewer than 20,000 allowed (978 over)" in every.stdout
    named = runner.invoke(app, ["check", "--static", "--iteration", "I1"])
    assert named.exit_code == 1 and "FAIL  I1 params" in named.stdout

    ok = runner.invoke(app, ["check", "--static", "--iteration", "I4"])
    assert ok.exit_code == 0 and len(ok.stdout.splitlines()) == 4 and "all 4 static checks" in ok.stderr


def test_accuracy_checks_use_comparable_runs_and_no_run_fails(tmp_path, runner):
    exp, runs = changelog_and_runs(tmp_path)
    i3 = wanted(exp, "I3")
    for seed, accs in ((1, [99.0, 99.45, 99.5, 99.52]), (2, [99.0, 99.3, 99.5, 99.41])):
        recorded_run(runs, "I3", i3.replace(seed=seed), accs)
    # a shortened run is no evidence: it never makes a check pass
    recorded_run(runs, "I1", wanted(exp, "I1").replace(epochs=1), [99.9])

    report = run_checks(exp, runs, iteration="I3")
    cases = {c.check: c for c in report.cases}
    assert cases["test_acc"].passed and "2 of 2 seeds (1, 2)" in cases["test_acc"].detail
    assert "min 99.41%" in cases["test_acc"].detail
    assert not cases["consistent"].passed  # seed 2's epoch 2 (99.30%) is below 99.4% in its last 3
    assert "1 of 2 seeds" in cases["consistent"].detail

    i1 = {c.check: c for c in run_checks(exp, runs, iteration="I1").cases}
    assert not i1["test_acc"].passed and "no comparable run" in i1["test_acc"].detail

    result = runner.invoke(app, ["check", "--experiments", str(exp.path), "--runs-dir", str(runs), "-i", "I3"])
    assert result.exit_code == 1
    assert result.stdout.splitlines()[-1].startswith("FAIL  I3 consistent: 1 of 2 seeds")


def test_junit_and_json_reports(tmp_path, runner):
    out = tmp_path / "check.xml"
    result = runner.invoke(app, ["check", "--static", "--all-iterations", "--format", "junit", "-o", str(out)])
    assert result.exit_code == 1 and result.stdout == ""
    # the failing checks still reach the log, one line each, beside the file
    assert "FAIL  I1 params" in result.stderr and f"wrote {out}" in result.stderr
    root = ET.parse(out).getroot()
    assert root.tag == "testsuites" and (root.get("tests"), root.get("failures")) == ("24", "3")
    assert [s.get("name") for s in root] == ["I0", "I1", "I2", "I3", "I4", "I5"]
    failure = root.find("testsuite[@name='I1']/testcase[@name='params']/failure")
    assert failure is not None and "978 over" in failure.get("message")
    assert root.find("testsuite[@name='I4']/testcase[@name='params']/failure") is None

    # by default an exploratory iteration's unmet check is a skipped case, not a failure
    assert runner.invoke(app, ["check", "--static", "--format", "junit", "-o", str(out)]).exit_code == 0
    root = ET.parse(out).getroot()
    assert (root.get("tests"), root.get("failures"), root.get("skipped")) == ("24", "0", "3")
    skipped = root.find("testsuite[@name='I1']/testcase[@name='params']/skipped")
    assert skipped is not None and skipped.get("message").startswith("exploratory iteration, not gated: 20,978")
    assert root.find("testsuite[@name='I1']/testcase[@name='params']/failure") is None

    data = json.loads(runner.invoke(app, ["check", "--static", "--json", "-i", "I2"]).stdout)
    assert data["passed"] is True and data["static"] is True and data["runs_dir"] is None
    assert [c["check"] for c in data["cases"]] == ["params", "batchnorm", "dropout", "epochs"]
    data = json.loads(runner.invoke(app, ["check", "--static", "--json"]).stdout)
    assert (data["final"], data["passed"], data["gated"], data["failed"], data["not_gated_failed"]) == \
        ("I3", True, 4, 0, 3)
    assert {c["iteration"] for c in data["cases"] if c["gated"]} == {"I3"}


@pytest.mark.parametrize("args, needle", [
    (["--iteration", "I9"], "no iteration 'I9'; known iterations: I0"),
    (["--format", "xml"], "unknown format 'xml'; choose one of: text, junit, json"),
    (["--experiments", "nope.yaml"], "nope.yaml"),
    (["--bogus"], "No such option"),
])
def test_a_check_that_cannot_run_exits_2_in_one_line(runner, args, needle):
    result = runner.invoke(app, ["check", "--static", *args])
    assert result.exit_code == 2, result.output
    assert result.stdout == "" and len(result.stderr.strip().splitlines()) == 1 and needle in result.stderr


def test_a_users_own_iteration_is_checked_statically(tmp_path, runner, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert runner.invoke(app, ["init", "proj"]).exit_code == 0
    monkeypatch.chdir(tmp_path / "proj")
    report = run_checks(find_experiments(None), static=True)
    assert {c.iteration for c in report.cases} == {"S1", "S2"} and report.passed
    result = runner.invoke(app, ["check", "--static"])
    assert result.exit_code == 0 and "pass  S1 params: 11,480 trainable parameters" in result.stdout


def test_zero_checks_never_read_as_a_pass(runner, tmp_path):
    empty = tmp_path / "e.yaml"
    empty.write_text("version: 1\niterations: []\n")
    result = runner.invoke(app, ["check", "--static", "--experiments", str(empty)])
    assert result.exit_code == 2 and "gives nothing to check" in result.stderr


def test_a_check_whose_report_cannot_be_written_is_2_not_a_failed_constraint(runner, tmp_path):
    result = runner.invoke(app, ["check", "--static", "-i", "I4", "-o", "/dev/full"])
    assert result.exit_code == 2 and "No space left on device" in result.stderr


def test_the_final_iterations_accuracy_gates_and_an_exploratory_baseline_below_it_does_not(tmp_path, runner):
    exp, runs = changelog_and_runs(tmp_path)   # I0..I3, none marked: the last (I3) is final
    for it, accs in (("I3", [99.0, 99.45, 99.5, 99.52]), ("I2", [98.9, 99.0])):
        recorded_run(runs, it, wanted(exp, it).replace(seed=1), accs)
    args = ["check", "--experiments", str(exp.path), "--runs-dir", str(runs)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "note  I2 test_acc: 0 of 1 seeds (1) reached 99.4% final test accuracy" in result.stdout
    assert "pass  I3 test_acc: 1 of 1 seeds (1) reached 99.4%" in result.stdout
    assert "of the final iteration I3 passed" in result.stderr

    # marking I2 final moves the gate: its 99.0% now fails it
    text = exp.path.read_text()
    marked = text.replace("{id: I2, ", "{id: I2, final: true, ")
    assert marked != text
    exp.path.write_text(marked)
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    assert "FAIL  I2 test_acc: 0 of 1 seeds (1) reached 99.4% final test accuracy" in result.stdout
    assert "pass  I3 test_acc: 1 of 1 seeds (1) reached 99.4% final test accuracy (99.52%; min 99.52%) " \
           "(exploratory)" in result.stdout
    compare = runner.invoke(app, ["compare", "--experiments", str(exp.path), "--runs-dir", str(runs),
                                  "--format", "markdown"])
    assert compare.exit_code == 0
    rows = [line.split(" | ")[0] for line in compare.stdout.splitlines()
            if line.startswith("| I") and not line.startswith("| Iter")]
    assert rows[:4] == ["| I0", "| I1", "| I2 (final)", "| I3"]   # every iteration, the final one marked
    assert "mnistkit check gates the final iteration, I2 (marked final: true)" in compare.stdout


@pytest.mark.parametrize("entry, needle", [
    ("    final: true\n  - id: B\n    model: I3\n    final: true\n",
     "line 9: iterations[1].final: A and B are both marked final; mark one iteration final: true"),
    ("    final: yes please\n", "iterations[0].final: must be bool, not str ('yes please')"),
])
def test_a_change_log_with_two_finals_or_a_wrong_final_is_one_line(tmp_path, runner, entry, needle):
    path = tmp_path / "experiments.yaml"
    path.write_text("version: 1\nconstraints: {max_params: 20000}\niterations:\n"
                    "  - id: A\n    model: I3\n" + entry)
    result = runner.invoke(app, ["check", "--static", "--experiments", str(path)])
    assert result.exit_code == 2 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and needle in result.stderr, result.stderr
