"""A model of the user's own (issue 27): a Python file, a module, a change-log iteration, through
summary, train, resume, evaluate, predict, export and compare; what a run records of it; the
hash and trust checks that keep a run folder from running code the user did not name; and every
error a user can make with a reference, through the CLI."""

import json
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from helpers import one_line_error
from mnistkit.cli import app
from mnistkit.errors import ModelCodeError, RunError, UsageError
from mnistkit.usermodels.modelref import build, parse_model_args, resolve

pytestmark = pytest.mark.slow   # most tests here train a model for a second

MODELS_PY = '''
"""My models."""
import torch
from torch import nn
import torch.nn.functional as F


class S1(nn.Module):
    """Three conv blocks, a 1x1 to 10 channels, global average pooling."""

    def __init__(self, width: int = 6, dropout: float = 0.05):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.MaxPool2d(2), nn.Dropout(dropout),
            nn.Conv2d(width, 10, 1),
        )

    def forward(self, x):
        return torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1)


def build(width):
    """S1 at a width of your choice."""
    return S1(width)
'''

CHANGELOG = '''
constraints: {max_params: 20000, batchnorm: true, dropout: true, max_epochs: 20, min_test_acc: 99.4}
iterations:
  - id: S1
    model: models.py:S1
    changes: my first model
    target: reach 99% in 1 epoch
    analysis: it did not
    recipe: {epochs: 1, batch_size: 64, lr: 0.05}
  - id: step-2
    model: models.py:build
    model_args: {width: 4}
    recipe: {epochs: 1, batch_size: 64, lr: 0.05}
'''



@pytest.fixture
def project(tmp_path, monkeypatch):
    (tmp_path / "models.py").write_text(MODELS_PY)
    (tmp_path / "experiments.yaml").write_text(CHANGELOG)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def train_cli(runner, *args):
    result = runner.invoke(app, ["train", *args, "--dataset", "synthetic", "--limit", "256", "--device", "cpu",
                                 "--quiet", "--json"])
    assert result.exit_code == 0, result.output
    return Path(json.loads(result.stdout)["run_dir"])


# ---------------------------------------------------------------- the whole path, Python file


def test_a_python_model_through_summary_train_evaluate_predict_export_resume(runner, project, tmp_path):
    summary = runner.invoke(app, ["summary", "S1", "--json"])
    assert summary.exit_code == 0, summary.output
    data = json.loads(summary.stdout)
    built = build(resolve("models.py:S1"))[0]
    assert data["totals"]["params"] == sum(p.numel() for p in built.parameters())
    assert data["source"]["kind"] == "file" and data["source"]["attr"] == "S1"

    run = train_cli(runner, "S1")
    config = yaml.safe_load((run / "config.yaml").read_text())
    source = config["model_source"]
    assert config["model"] == "S1" and source["reference"] == "models.py:S1"
    assert source["path"] == str(project / "models.py")
    import hashlib
    assert source["sha256"] == hashlib.sha256((project / "models.py").read_bytes()).hexdigest()
    assert (run / "model.py").read_text() == MODELS_PY          # the copy, for the record
    assert source["description"].startswith("Three conv blocks")

    evaluated = runner.invoke(app, ["evaluate", str(run), "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["model"] == "S1"

    from PIL import Image
    img = Image.new("L", (28, 28), 255)
    img.paste(0, (10, 4, 16, 24))
    img.save(tmp_path / "one.png")
    predicted = runner.invoke(app, ["predict", str(run), str(tmp_path / "one.png"), "--json"])
    assert predicted.exit_code == 0, predicted.output
    assert json.loads(predicted.stdout)["predictions"][0]["digit"] in range(10)

    exported = runner.invoke(app, ["export", str(run), "--format", "onnx", "-o", str(tmp_path / "s1.onnx"), "--json"])
    assert exported.exit_code == 0, exported.output
    check = json.loads(exported.stdout)["check"]
    assert check["passed"] and check["same_predictions"] == check["images"]

    # resume: a 2-epoch run interrupted in epoch 2 continues from its folder, from its recorded model
    import mnistkit.training.loop as training
    from mnistkit.errors import TrainingInterrupted
    from mnistkit.recipe import DataOptions, Recipe

    real = training.train_one_epoch

    def ctrl_c_in_epoch_2(s, epoch, *args, **kwargs):
        if epoch == 2:
            raise KeyboardInterrupt
        return real(s, epoch, *args, **kwargs)

    training.train_one_epoch = ctrl_c_in_epoch_2
    try:
        with pytest.raises(TrainingInterrupted):
            training.train("models.py:S1", Recipe(epochs=2, batch_size=64, lr=0.05),
                           DataOptions("synthetic", limit=256), device="cpu", runs_dir=tmp_path / "r")
    finally:
        training.train_one_epoch = real
    (folder,) = (tmp_path / "r").iterdir()
    resumed = training.resume(folder, device="cpu")
    assert [r.epoch for r in resumed.metrics] == [1, 2] and resumed.model == "S1"


def test_model_args_from_the_change_log_and_the_command_line(runner, project):
    run = train_cli(runner, "step-2")
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"] == "step-2" and config["model_source"]["args"] == {"width": 4}
    assert config["params"] == sum(p.numel() for p in build(resolve("models.py:build", args={"width": 4}))[0].parameters())
    wide = runner.invoke(app, ["summary", "models.py:build", "--model-arg", "width=8", "--json"])
    narrow = runner.invoke(app, ["summary", "models.py:build", "--model-arg", "width=4", "--json"])
    assert json.loads(wide.stdout)["totals"]["params"] > json.loads(narrow.stdout)["totals"]["params"]
    assert parse_model_args(["width=12", "widths=[8, 16]", "name=wide", "on=true"]) == \
        {"width": 12, "widths": [8, 16], "name": "wide", "on": True}


def test_a_builder_that_does_not_take_dropout_is_fine_and_says_so(project):
    model, notes = build(resolve("models.py:build", args={"width": 4}), {"dropout": 0.1, "dropout_at": "model"})
    assert isinstance(model, nn.Module)
    assert any("takes no dropout argument" in n for n in notes)
    with pytest.raises(UsageError, match="dropout_at convs rearranges mnistkit's registered models only"):
        build(resolve("models.py:build", args={"width": 4}), {"dropout": 0.1, "dropout_at": "convs"})
    # the class takes dropout: the recipe's value reaches it
    s1, notes = build(resolve("models.py:S1"), {"dropout": 0.3})
    assert not notes and [m.p for m in s1.modules() if isinstance(m, nn.Dropout)] == [0.3]


def test_an_importable_module_and_a_model_object_from_python(project, monkeypatch, tmp_path):
    pkg = project / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(MODELS_PY)
    monkeypatch.syspath_prepend(str(project))
    source = resolve("mypkg.nets:S1")
    assert source.kind == "module" and source.path == str(pkg / "nets.py") and len(source.sha256) == 64

    from mnistkit.recipe import DataOptions, Recipe
    from mnistkit.training.loop import train
    from mnistkit.usermodels.modelref import _file  # noqa: F401 - the class below comes from the user's file
    module = __import__("mypkg.nets", fromlist=["S1"])
    result = train(module.S1(width=4), Recipe(epochs=1, batch_size=64, lr=0.05), DataOptions("synthetic", limit=128),
                   device="cpu", runs_dir=tmp_path / "runs")
    cfg = yaml.safe_load((result.run_dir / "config.yaml").read_text())
    assert cfg["model_source"]["kind"] == "file" and cfg["model_source"]["path"] == str(pkg / "nets.py")
    # a model object whose class has no file of its own is trained, and said not to be rebuildable
    seq = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    result = train(seq, Recipe(epochs=1, batch_size=64, lr=0.05), DataOptions("synthetic", limit=128), device="cpu",
                   runs_dir=tmp_path / "runs")
    from mnistkit.training.evaluation import evaluate_checkpoint
    with pytest.raises(RunError, match="mnistkit cannot rebuild it"):
        evaluate_checkpoint(result.run_dir, device="cpu")


# ---------------------------------------------------------------- trust: never code the user did not name


MARKER_PY = MODELS_PY + '''

class Marker:   # a definition runs when the file's definitions do
    import pathlib
    pathlib.Path(__file__).with_name("IMPORTED").write_text("this file ran")
'''


def test_a_run_whose_file_changed_rebuilds_from_its_trusted_copy_and_nothing_else_runs(runner, project, monkeypatch,
                                                                                        tmp_path):
    (project / "models.py").write_text(MARKER_PY)
    run = train_cli(runner, "S1")
    (project / "IMPORTED").unlink()
    edited = MARKER_PY.replace("IMPORTED", "EDITED")
    (project / "models.py").write_text(edited)
    ok = runner.invoke(app, ["evaluate", str(run), "--json"])   # the run's copy holds the code that trained
    assert ok.exit_code == 0, ok.output
    assert not (project / "EDITED").exists() and (run / "IMPORTED").exists()   # the copy's definitions ran
    (run / "IMPORTED").unlink()
    # on another machine (no trust), the copy is named, never run unasked
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "elsewhere"))
    line = one_line_error(runner.invoke(app, ["evaluate", str(run)]), 1)
    assert "that you have not used on this machine" in line and "--model-code" in line and str(run / "model.py") in line
    assert not list(run.glob("IMPORTED"))
    # the user names the run's own copy: they trust it, and it is used
    ok = runner.invoke(app, ["evaluate", str(run), "--model-code", str(run / "model.py"), "--json"])
    assert ok.exit_code == 0, ok.output
    (project / "models.py").unlink()
    (run / "model.py").unlink()
    line = one_line_error(runner.invoke(app, ["export", str(run), "--format", "onnx", "-o", "x.onnx"]), 1)
    assert "is missing" in line and not (project / "x.onnx").exists()


def test_a_planted_run_folder_never_runs_its_code(runner, project, tmp_path, monkeypatch):
    """Someone sends a run folder whose config names a file it brought along, with that file's
    own hash: the hash matches, but the user never named that file, so nothing is imported."""
    run = train_cli(runner, "S1")
    planted = tmp_path / "sent"
    shutil.copytree(run, planted)
    evil = planted / "evil.py"
    evil.write_text(MARKER_PY + "# code this user never named\n")
    import hashlib
    sha = hashlib.sha256(evil.read_bytes()).hexdigest()
    for name in ("config.yaml",):
        cfg = yaml.safe_load((planted / name).read_text())
        cfg["model_source"].update(path=str(evil), sha256=sha)
        (planted / name).write_text(yaml.safe_dump(cfg, sort_keys=False))
    for name in ("best.pt", "last.pt"):
        ckpt = torch.load(planted / name, weights_only=True)
        ckpt["model_source"].update(path=str(evil), sha256=sha)
        torch.save(ckpt, planted / name)
    for args in (["evaluate", str(planted)], ["export", str(planted), "--format", "onnx", "-o", "y.onnx"],
                 ["train", "--resume", str(planted)]):
        line = one_line_error(runner.invoke(app, args), 1)
        assert "that you have not used on this machine" in line, line
        assert not (planted / "IMPORTED").exists()
    # and on another machine (another state folder) the user's own run is refused the same way
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "elsewhere"))
    line = one_line_error(runner.invoke(app, ["evaluate", str(run)]), 1)
    assert "you have not used on this machine" in line


def test_the_trust_record_must_be_private(project, tmp_path, monkeypatch):
    from mnistkit.usermodels import trust

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert trust.remember(project / "models.py", "a" * 64)
    assert trust.is_trusted("a" * 64)
    assert not trust.is_trusted("b" * 64)
    trust.store_path().chmod(0o666)   # writable by others: it could have been forged
    assert not trust.is_trusted("a" * 64)
    trust.store_path().chmod(0o600)
    trust.store_path().write_text("{not json")
    assert not trust.is_trusted("a" * 64)
    trust.store_path().write_text('{"files": ' * 100_000)   # nested past Python's recursion limit: damaged
    assert not trust.is_trusted("a" * 64)


# ---------------------------------------------------------------- compare


def test_compare_keeps_runs_of_an_edited_file_and_moves_out_a_changed_model(runner, project):
    from mnistkit.results.compare import build_report
    from mnistkit.experiments import load_experiments

    def s1_report():
        return build_report(load_experiments(project / "experiments.yaml"), project / "runs")["iterations"]

    run = train_cli(runner, "S1")
    s1 = s1_report()[0]
    assert s1["target"] == "reach 99% in 1 epoch" and s1["analysis"] == "it did not"
    assert [Path(r["run"]).resolve() for r in s1["other_runs"]] == [run.resolve()]
    assert "model changed" not in s1["other_runs"][0]["why_not"]
    # a docstring, a comment and another class (what init's template says to do) change nothing
    (project / "models.py").write_text('"""My models."""\n' + MODELS_PY + "\n# a comment\n\nclass S3(S1):\n    pass\n")
    iterations = s1_report()
    assert "model changed" not in iterations[0]["other_runs"][0]["why_not"]
    step2 = iterations[1]
    assert step2["other_runs"] == [] and step2["measured"] is None
    # a real change does, naming the layer
    (project / "models.py").write_text(MODELS_PY.replace("nn.Conv2d(width, 10, 1)", "nn.Conv2d(width, 10, 1, bias=False)"))
    why = " ".join(s1_report()[0]["other_runs"][0]["why_not"])
    assert "the model changed since this run" in why and "features.8: Conv2d(6, 10, kernel_size=(1, 1)" in why, why
    assert "bias=False" in why


# ---------------------------------------------------------------- errors, one line each


BROKEN = {
    "syntax.py": "import torch\ndef build(:\n    pass\n",
    "raises.py": "from torch import nn\ndef build():\n    x = 1\n    return undefined_name\n",
    "notmodule.py": "def build():\n    return 42\n",
    "shape.py": "from torch import nn\ndef build():\n    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten())\n",
    "args.py": "from torch import nn\ndef build(width, depth):\n    return nn.Linear(1, 1)\n",
    "instance.py": "from torch import nn\nnet = nn.Linear(784, 10)\n",
    "forward.py": ("from torch import nn\nclass Net(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
                   "        self.fc = nn.Linear(100, 10)\n    def forward(self, x):\n        return self.fc(x)\n"),
}


@pytest.mark.parametrize("reference, code, needles", [
    ("missing.py:Net", 2, ["missing.py not found"]),
    ("models.py:Nope", 2, ["models.py has no 'Nope'", "its nn.Module classes: S1", "its functions: build"]),
    ("models.py", 2, []),   # one nn.Module class: it is the model (exit 0, checked below)
    ("syntax.py:build", 1, ["syntax.py, line 2: SyntaxError"]),
    ("raises.py:build", 1, ["raises.py, line 4, in build: NameError: name 'undefined_name' is not defined",
                            "--debug"]),
    ("notmodule.py:build", 2, ["returned int, not an nn.Module"]),
    ("shape.py:build", 2, ["returns [2, 2704] for a [2, 1, 28, 28] batch", "not [2, 10] class scores"]),
    ("args.py:build", 2, ["needs width, depth", "--model-arg width=VALUE"]),
    ("instance.py:net", 2, ["net is a variable, not a class or a function the file defines"]),
    ("forward.py:Net", 1, ["forward.py, line 7, in forward: RuntimeError"]),
    ("models.S1", 1, ["did you mean models.py:S1?"]),
    ("nosuchpkg.mod:Net", 2, ["no module named 'nosuchpkg'"]),
    ("models.py:1bad", 2, ["is not a Python name"]),
    ("s1.yaml:Net", 2, ["a YAML architecture is one model"]),
])
def test_reference_errors_are_one_line(runner, project, reference, code, needles):
    for name, text in BROKEN.items():
        (project / name).write_text(text)
    result = runner.invoke(app, ["summary", reference])
    if not needles:
        assert result.exit_code == 0, result.output
        return
    line = one_line_error(result, code)
    for needle in needles:
        assert needle in line, line


def test_debug_shows_the_whole_traceback_of_the_users_code(runner, project):
    (project / "raises.py").write_text(BROKEN["raises.py"])
    result = runner.invoke(app, ["--debug", "summary", "raises.py:build"])
    assert result.exit_code != 0
    assert isinstance(result.exception, ModelCodeError)
    import traceback
    frames = traceback.extract_tb(result.exception.__cause__.__traceback__)
    assert any(f.filename.endswith("raises.py") and f.lineno == 4 for f in frames)


def test_train_refuses_a_bad_model_before_anything_is_written(runner, project):
    (project / "shape.py").write_text(BROKEN["shape.py"])
    result = runner.invoke(app, ["train", "shape.py:build", "--dataset", "synthetic", "--limit", "64"])
    one_line_error(result, 2)
    assert not (project / "runs").exists()


def test_change_log_model_references_are_checked_with_their_line(project):
    from mnistkit.errors import ExperimentsError
    from mnistkit.experiments import load_experiments

    bad = CHANGELOG.replace("models.py:S1", "nothere.py:S1")
    (project / "bad.yaml").write_text(bad)
    with pytest.raises(ExperimentsError, match=r"line 5: iterations\[0\]\.model: .*nothere.py not found"):
        load_experiments(project / "bad.yaml")
    (project / "bad.yaml").write_text(CHANGELOG.replace("id: step-2", "id: ../up"))
    with pytest.raises(ExperimentsError, match="must be 1-40 letters"):
        load_experiments(project / "bad.yaml")
    (project / "bad.yaml").write_text(CHANGELOG.replace("{width: 4}", "{width: {deep: 1}}"))
    with pytest.raises(ExperimentsError, match="model_args.width must be a number"):
        load_experiments(project / "bad.yaml")


def test_a_change_log_model_is_taken_from_the_change_logs_folder(project, tmp_path, monkeypatch):
    from mnistkit.experiments import load_experiments

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    exp = load_experiments(project / "experiments.yaml")
    assert exp.model_source(exp.iterations[0]).path == str(project / "models.py")


# ---------------------------------------------------------------- mnistkit init, and from Python


def test_init_writes_a_project_where_summary_train_and_compare_work(runner, tmp_path, monkeypatch):
    result = runner.invoke(app, ["init", str(tmp_path / "demo")])
    assert result.exit_code == 0, result.output
    demo = tmp_path / "demo"
    assert sorted(p.name for p in demo.iterdir()) == [".gitignore", "experiments.yaml", "models.py", "s2.yaml"]
    assert "runs/" in (demo / ".gitignore").read_text().splitlines()
    monkeypatch.chdir(demo)
    for it in ("S1", "S2"):
        s = json.loads(runner.invoke(app, ["summary", it, "--json"]).stdout)
        assert s["budget"]["pass"] and s["uses"]["batchnorm"] and s["uses"]["dropout"] and s["uses"]["gap_head"], s
    assert json.loads(runner.invoke(app, ["summary", "S2", "--json"]).stdout)["source"]["kind"] == "yaml"
    run = train_cli(runner, "S2", "--epochs", "1")
    assert (run / "model.yaml").read_text() == (demo / "s2.yaml").read_text()
    report = json.loads(runner.invoke(app, ["compare", "--json", "--all-runs"]).stdout)
    rows = {r["id"]: r for r in report["iterations"]}
    assert set(rows) == {"S1", "S2"} and rows["S1"]["target"].startswith("under 20,000 parameters")
    assert [Path(r["run"]).name for r in rows["S2"]["other_runs"]] == [run.name]
    table = runner.invoke(app, ["compare"])
    assert "Target and analysis" in table.stdout and "mnistkit train S1 --seeds 3" in table.stdout
    # evaluate and export the YAML model's run: rebuilt from the run's own copy (data: no trust needed)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "another-machine"))
    (demo / "s2.yaml").write_text("layers: [relu]\n")   # the project's file changed: the run does not care
    assert runner.invoke(app, ["evaluate", str(run), "--json"]).exit_code == 0
    exported = runner.invoke(app, ["export", str(run), "--format", "onnx", "-o", str(tmp_path / "s2.onnx"), "--json"])
    assert exported.exit_code == 0 and json.loads(exported.stdout)["check"]["passed"], exported.output
    before = {p.name: p.read_bytes() for p in demo.iterdir() if p.is_file()}
    line = one_line_error(runner.invoke(app, ["init", str(demo)]), 2)
    assert "never overwrites a file" in line
    assert {p.name: p.read_bytes() for p in demo.iterdir() if p.is_file()} == before


def test_init_refuses_a_folder_with_any_of_its_files_even_a_dangling_symlink(runner, tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "models.py").symlink_to(tmp_path / "nowhere")
    line = one_line_error(runner.invoke(app, ["init", str(tmp_path / "p")]), 2)
    assert "already has models.py" in line
    assert not (tmp_path / "nowhere").exists() and not (tmp_path / "p" / "experiments.yaml").exists()


def test_train_from_python_shows_the_clis_progress_display(project, tmp_path, capsys):
    import mnistkit
    from mnistkit.recipe import DataOptions, Recipe

    result = mnistkit.train("models.py:S1", Recipe(epochs=1, batch_size=64, lr=0.05),
                            DataOptions("synthetic", limit=128), device="cpu", runs_dir=tmp_path / "runs",
                            callback=mnistkit.progress())
    out = capsys.readouterr().out
    assert "Training S1 (" in out and f"Run folder: {result.run_dir}" in out
    assert "train loss" in out and "    1  " in out


def test_a_model_registered_from_the_users_code_trains_and_is_rebuilt_from_its_file(project, tmp_path, monkeypatch):
    """register_model in the user's process: the builder takes no dropout_at (it trained before
    0.10 only with both), and the run records the class's file so another process rebuilds it."""
    import mnistkit
    from mnistkit.training.evaluation import evaluate_checkpoint
    from mnistkit.models import _REGISTRY
    from mnistkit.recipe import DataOptions, Recipe

    monkeypatch.syspath_prepend(str(project))
    module = __import__("models")
    mnistkit.register_model("S9")(module.S1)
    try:
        result = mnistkit.train("S9", Recipe(epochs=1, batch_size=64, lr=0.05), DataOptions("synthetic", limit=128),
                                device="cpu", runs_dir=tmp_path / "runs")
    finally:
        _REGISTRY.pop("S9")
    cfg = yaml.safe_load((result.run_dir / "config.yaml").read_text())
    assert cfg["model"] == "S9" and cfg["model_source"]["kind"] == "file"
    assert cfg["model_source"]["path"] == str(project / "models.py") and cfg["model_source"]["attr"] == "S1"
    # S9 is no longer registered: the run is rebuilt from the recorded (and trusted) file
    assert evaluate_checkpoint(result.run_dir, device="cpu").model == "S9"


@pytest.mark.parametrize("text, needles", [
    ("layers:\n  - conv3d: {channels: 8}\n", ["unknown layer 'conv3d'", "known layers: avgpool, bn"]),
    ("layers:\n  - conv: {channels: 1000000}\n", ["line 2", "channels must be a whole number from 1 to 1024"]),
    ("layers:\n" + "  - relu\n" * 300, ["256"]),
    ("layers:\n  - conv: {channels: 8}\n  - flatten\n  - conv: {channels: 8}\n", ["layers[2] (conv)"]),
    ("layers:\n  - conv: {channels: 16}\n  - flatten\n", ["not 10 class scores"]),
    ("layers: !!python/object/apply:os.system ['echo hi']\n", ["bad.yaml"]),
])
def test_yaml_architecture_errors_through_the_cli_are_one_line_and_write_nothing(runner, project, text, needles):
    (project / "bad.yaml").write_text(text)
    for args in (["summary", "bad.yaml"], ["train", "bad.yaml", "--dataset", "synthetic", "--limit", "64"]):
        line = one_line_error(runner.invoke(app, args), 2)
        for needle in needles:
            assert needle in line, line
    assert not (project / "runs").exists()


def _plant(folder: Path, **source) -> None:
    """Rewrite a run folder's recorded model source (config and both checkpoints) as a sender could."""
    cfg = yaml.safe_load((folder / "config.yaml").read_text())
    cfg["model_source"].update(source)
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    for name in ("best.pt", "last.pt"):
        ckpt = torch.load(folder / name, weights_only=True)
        ckpt["model_source"].update(source)
        torch.save(ckpt, folder / name)


def test_a_run_folder_cannot_call_other_code_through_a_trusted_file(runner, project, tmp_path):
    """The recorded file is one the user trusts (their own models.py, same hash), but the record
    names another module, or a function the file imports: nothing of it is imported or called."""
    run = train_cli(runner, "S1")
    import hashlib
    sha = hashlib.sha256((project / "models.py").read_bytes()).hexdigest()
    marker = tmp_path / "PWNED"
    cases = [
        dict(kind="module", module="os", attr="system", path=str(project / "models.py"), sha256=sha,
             args={"command": f"touch {marker}"}),
        dict(kind="file", attr="nn.init.zeros_", path=str(project / "models.py"), sha256=sha, args={}),
    ]
    for i, source in enumerate(cases):
        planted = tmp_path / f"sent{i}"
        shutil.copytree(run, planted)
        _plant(planted, **source)
        line = one_line_error(runner.invoke(app, ["evaluate", str(planted), "--dataset", "synthetic"]), 1)
        assert "that you have not used on this machine" in line   # trust covers what was built of the file: S1
        assert not marker.exists()


def test_a_name_the_file_imports_is_not_a_model_builder(runner, project):
    (project / "imp.py").write_text("from subprocess import run\nfrom torch import nn\n\n"
                                    "def build():\n    return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))\n")
    line = one_line_error(runner.invoke(app, ["summary", "imp.py:run"]), 2)
    assert "imp.py:run is subprocess.run, not an nn.Module class or a function imp.py defines" in line
    assert "its functions: build" in line


def test_a_module_class_without_an_init_of_its_own_builds(runner, project):
    (project / "noinit.py").write_text("import torch\nfrom torch import nn\n\nclass Plain(nn.Module):\n"
                                       "    def forward(self, x):\n        return x.flatten(1)[:, :10] * 1.0\n")
    result = runner.invoke(app, ["summary", "noinit.py:Plain"])
    assert result.exit_code == 0, result.output
    assert "Parameters: 0" in result.stdout


@pytest.mark.parametrize("body, needle", [
    ("    def forward(self, x):\n        if self.training:\n            raise RuntimeError('boom in training')\n"
     "        return self.fc(x.flatten(1))\n", "tr.py, line 12, in forward: RuntimeError: boom in training"),
])
def test_an_error_of_the_users_model_while_training_is_one_line_and_leaves_no_folder(runner, project, body, needle):
    (project / "tr.py").write_text("import torch\nfrom torch import nn\n\n\nclass Net(nn.Module):\n"
                                   "    def __init__(self):\n        super().__init__()\n"
                                   "        self.fc = nn.Linear(784, 10)\n\n" + body)
    result = runner.invoke(app, ["train", "tr.py:Net", "--dataset", "synthetic", "--limit", "64", "--epochs", "1",
                                 "--quiet", "--runs-dir", "r", "--device", "cpu"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    line = result.stderr.strip().splitlines()[-1]   # after the start's notes: the error, one line
    assert line.startswith("error: training Net failed: ")
    assert needle in line and "no epoch finished, so its run folder was removed" in line
    assert not list((project / "r").iterdir())


def test_a_model_with_nothing_to_train_is_one_line(runner, project):
    (project / "np.py").write_text("import torch\nfrom torch import nn\n\n\nclass NoParams(nn.Module):\n"
                                   "    def forward(self, x):\n        return x.flatten(1)[:, :10] * 1.0\n")
    result = runner.invoke(app, ["train", "np.py:NoParams", "--dataset", "synthetic", "--limit", "64", "--epochs",
                                 "1", "--runs-dir", "r"])
    assert "has no trainable parameters: there is nothing to train" in one_line_error(result, 2)
    assert not (project / "r").exists() or not list((project / "r").iterdir())


def test_module_file_finds_what_import_would_run_without_importing(tmp_path, monkeypatch):
    from mnistkit.usermodels.usercode import module_file

    (tmp_path / "foo").mkdir()
    (tmp_path / "foo.py").write_text("raise SystemExit('the module, not the package')\n")
    (tmp_path / "foo" / "__init__.py").write_text("import pathlib; pathlib.Path(__file__).with_name('RAN').touch()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert module_file("foo") == (tmp_path / "foo" / "__init__.py").resolve()   # a package comes first, as import has it
    assert not (tmp_path / "foo" / "RAN").exists() and module_file("foo.nothing") is None


def test_a_builder_a_package_re_exports_is_its_own(runner, tmp_path, monkeypatch):
    (tmp_path / "mymodels").mkdir()
    (tmp_path / "mymodels" / "__init__.py").write_text("from .small import build\n")
    (tmp_path / "mymodels" / "small.py").write_text(
        "from torch import nn\n\ndef build():\n    return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["summary", "mymodels:build"])
    assert result.exit_code == 0, result.output
