"""Models written the way course notebooks write them (issue 36), each habit in a file of its
own, through summary, train, evaluate, predict and export --format onnx; and the layout they
train in: channels_last where the model runs in it, PyTorch's default where it does not (a
``view`` head after a convolution), recorded in the run and kept by evaluation, predict and
export (BatchNorm folding included)."""

import json
import random
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from typer.testing import CliRunner

from mnistkit.cli import app

pytestmark = pytest.mark.slow   # most tests here train a model for a second

THREE = Path(__file__).resolve().parent.parent / "examples" / "three.png"

HEADER = "import torch\nfrom torch import nn\nimport torch.nn.functional as F\n\n\n"

# habit -> (the model file's body, defining Net; whether it trains channels_last)
HABITS = {
    "view_size": ('''
        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv1 = nn.Conv2d(1, 8, 3)
                self.bn1 = nn.BatchNorm2d(8)
                self.conv2 = nn.Conv2d(8, 8, 3)
                self.fc = nn.Linear(8 * 12 * 12, 10)

            def forward(self, x):
                x = F.relu(self.bn1(self.conv1(x)))
                x = F.max_pool2d(F.relu(self.conv2(x)), 2)
                x = x.view(x.size(0), -1)
                return F.log_softmax(self.fc(x), dim=1)
        ''', False),
    "view_n": ('''
        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv1 = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2))
                self.conv2 = nn.Sequential(nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2))
                self.fc1 = nn.Linear(200, 10)

            def forward(self, x):
                x = self.conv2(self.conv1(x))
                x = x.view(-1, 200)
                return F.log_softmax(self.fc1(x), dim=1)
        ''', False),
    "reshape": ('''
        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.features = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(4))
                self.fc = nn.Linear(8 * 6 * 6, 10)

            def forward(self, x):
                x = self.features(x)
                return self.fc(x.reshape(x.shape[0], -1))
        ''', True),
    "flatten": ('''
        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.features = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(4))
                self.fc = nn.Linear(8 * 6 * 6, 10)

            def forward(self, x):
                return self.fc(torch.flatten(self.features(x), 1))
        ''', True),
    "nn_flatten": ('''
        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.net = nn.Sequential(
                    nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(4),
                    nn.Flatten(), nn.Linear(8 * 6 * 6, 10),
                )

            def forward(self, x):
                return self.net(x)
        ''', True),
    "log_softmax": ('''
        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 10, 1))
                self.gap = nn.AdaptiveAvgPool2d(1)

            def forward(self, x):
                x = self.gap(self.conv(x)).flatten(1)
                return F.log_softmax(x, dim=-1)
        ''', True),
    "relu_before_bn": ('''
        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.convblock1 = nn.Sequential(nn.Conv2d(1, 8, 3, bias=False), nn.ReLU(), nn.BatchNorm2d(8))
                self.convblock2 = nn.Sequential(nn.Conv2d(8, 10, 3, bias=False), nn.ReLU(), nn.BatchNorm2d(10))
                self.gap = nn.AvgPool2d(24)

            def forward(self, x):
                x = self.gap(self.convblock2(self.convblock1(x)))
                x = x.view(-1, 10)
                return F.log_softmax(x, dim=-1)
        ''', True),
    "functional": ('''
        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
                self.conv2 = nn.Conv2d(8, 10, 3, padding=1)

            def forward(self, x):
                x = F.max_pool2d(F.relu(self.conv1(x)), 2)
                x = F.max_pool2d(F.relu(self.conv2(x)), 2)
                x = F.adaptive_avg_pool2d(x, 1)
                return F.log_softmax(torch.flatten(x, 1), dim=1)
        ''', True),
    "bn_after_gap": ('''
        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.BatchNorm2d(8), nn.Conv2d(8, 10, 1))
                self.gap = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.BatchNorm2d(10))

            def forward(self, x):
                x = self.gap(self.conv(x))
                return x.view(-1, 10)
        ''', True),
    "unused_layer": ('''
        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv1 = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
                self.conv2 = nn.Conv2d(8, 16, 3)       # tried once, never called any more
                self.dropout = nn.Dropout(0.1)
                self.out = nn.Conv2d(8, 10, 1)

            def forward(self, x):
                x = self.out(self.dropout(self.conv1(x)))
                return F.adaptive_avg_pool2d(x, 1).flatten(1)
        ''', True),
    "reused_module": ('''
        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
                self.conv2 = nn.Conv2d(8, 10, 3, padding=1)
                self.relu = nn.ReLU()
                self.pool = nn.MaxPool2d(2)

            def forward(self, x):
                x = self.pool(self.relu(self.conv1(x)))
                x = self.pool(self.relu(self.conv2(x)))
                return F.adaptive_avg_pool2d(x, 1).flatten(1)
        ''', True),
    "squeeze_head": ('''
        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 10, 1))
                self.gap = nn.AdaptiveAvgPool2d(1)

            def forward(self, x):
                x = self.gap(self.conv(x)).squeeze()
                return F.log_softmax(x, dim=-1)
        ''', True),
    "depthwise_separable": ('''
        class Separable(nn.Module):
            def __init__(self, cin, cout):
                super().__init__()
                self.depthwise = nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False)
                self.pointwise = nn.Conv2d(cin, cout, 1, bias=False)
                self.bn = nn.BatchNorm2d(cout)

            def forward(self, x):
                return F.relu(self.bn(self.pointwise(self.depthwise(x))))


        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU())
                self.sep = nn.Sequential(Separable(8, 8), nn.MaxPool2d(2), Separable(8, 10))

            def forward(self, x):
                return F.adaptive_avg_pool2d(self.sep(self.stem(x)), 1).flatten(1)
        ''', True),
    "residual": ('''
        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
                self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                           nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
                self.head = nn.Conv2d(8, 10, 1)

            def forward(self, x):
                x = self.stem(x)
                x = F.relu(x + self.block(x))
                x = F.max_pool2d(x, 4)
                return self.head(x).mean((2, 3))
        ''', True),
    "nested_sequential": ('''
        class ConvBlock(nn.Module):
            def __init__(self, cin, cout):
                super().__init__()
                self.block = nn.Sequential(nn.Conv2d(cin, cout, 3, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

            def forward(self, x):
                return self.block(x)


        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.features = nn.Sequential(
                    nn.Sequential(ConvBlock(1, 8), ConvBlock(8, 8)),
                    nn.MaxPool2d(2),
                    nn.Sequential(ConvBlock(8, 10), nn.Sequential(nn.Conv2d(10, 10, 1))),
                )

            def forward(self, x):
                return F.adaptive_avg_pool2d(self.features(x), 1).view(x.size(0), 10)
        ''', True),
    "bias_false_padding": ('''
        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.c1 = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
                self.c2 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
                self.pool = nn.MaxPool2d(4)
                self.fc = nn.Linear(8 * 7 * 7, 10, bias=False)

            def forward(self, x):
                x = self.pool(self.c2(self.c1(x)))
                x = x.view(x.size(0), -1)
                return F.log_softmax(self.fc(x), dim=1)
        ''', False),
    "mixed": ('''
        class Net(nn.Module):
            """Conv, ReLU before BatchNorm, a reused pool, a skip, an unused layer and a view head."""

            def __init__(self):
                super().__init__()
                self.convblock1 = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.ReLU(),
                                                nn.BatchNorm2d(8), nn.Dropout(0.05))
                self.convblock2 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
                self.trans = nn.Sequential(nn.Conv2d(8, 6, 1, bias=False))
                self.spare = nn.Linear(6, 6)
                self.pool = nn.MaxPool2d(2, 2)
                self.fc1 = nn.Linear(6 * 7 * 7, 10)

            def forward(self, x):
                x = self.convblock1(x)
                x = F.relu(x + self.convblock2(x))
                x = self.pool(self.trans(x))
                x = self.pool(x)
                x = x.view(-1, 6 * 7 * 7)
                return F.log_softmax(self.fc1(x), dim=1)
        ''', False),
}

def cells(xfails: dict[str, pytest.MarkDecorator] | None = None) -> list:
    """One row per habit; ``xfails``: a cell that fails for a reason this file does not test
    (``pytest.mark.xfail(strict=True, reason=...)``)."""
    return [pytest.param(h, marks=(xfails or {}).get(h, ()), id=h) for h in HABITS]


def source(habit: str) -> str:
    return HEADER + textwrap.dedent(HABITS[habit][0]).lstrip()


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def model_file(folder: Path, habit: str) -> Path:
    path = folder / f"{habit}.py"
    path.write_text(source(habit))
    return path


class Trained:
    """Each habit trained once for the whole module (tiny: 128 synthetic images, one epoch),
    on first use; the other commands run on that run."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.runner, self.runs = folder, CliRunner(), {}

    def __call__(self, habit: str) -> tuple[Path, object]:
        if habit not in self.runs:
            path = model_file(self.folder, habit)
            result = self.runner.invoke(app, ["train", f"{path}:Net", "--dataset", "synthetic", "--limit", "128",
                                              "--epochs", "1", "--device", "cpu", "--runs-dir",
                                              str(self.folder / "runs"), "--json"])
            run = Path(json.loads(result.stdout)["run_dir"]) if result.exit_code == 0 else None
            self.runs[habit] = (run, result)
        return self.runs[habit]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("students")
    with pytest.MonkeyPatch.context() as mp:   # no change-log of the project's: the default recipe
        mp.chdir(folder)
        yield Trained(folder)


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


# ---------------------------------------------------------------- habits x commands


@pytest.mark.parametrize("habit", cells())
def test_summary(habit, tmp_path):
    path = model_file(tmp_path, habit)
    result = invoke("summary", f"{path}:Net", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    exec_ns: dict = {}
    exec(compile(path.read_text(), str(path), "exec"), exec_ns)
    model = exec_ns["Net"]()
    assert data["totals"]["params"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("habit", cells())
def test_train(habit, trained):
    run, result = trained(habit)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    recipe = yaml.safe_load((run / "config.yaml").read_text())["recipe"]
    channels_last = HABITS[habit][1]
    assert recipe["channels_last"] is channels_last     # the run records the layout it trained in
    note = [line for line in result.stderr.splitlines() if "layout:" in line]
    if channels_last:
        assert not note, result.stderr
    else:   # said in one line, naming the file and line that cannot run channels_last
        text = source(habit)
        where = f"{habit}.py, line {line_of(text, '.view(')}"
        assert len(note) == 1 and "not channels_last" in note[0] and where in note[0], result.stderr


@pytest.mark.parametrize("habit", cells())
def test_evaluate(habit, trained):
    run, _ = trained(habit)
    assert run is not None
    result = invoke("evaluate", str(run), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["samples"] > 0 and 0 <= report["test_acc"] <= 100
    # the very figure the run recorded in training: evaluation computes as training evaluated
    # (up to an image or so of rounding: another thread count may sum a conv in another order)
    assert report["test_acc"] == pytest.approx(report["recorded_test_acc"], abs=0.2)


@pytest.mark.parametrize("habit", cells())
def test_predict(habit, trained):
    # one image: a `.squeeze()` head returns [10] for it, which predict takes as a batch of one
    run, _ = trained(habit)
    assert run is not None
    result = invoke("predict", str(run), str(THREE), "--json")
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    [prediction] = json.loads(result.stdout)["predictions"]
    assert prediction["digit"] in range(10) and prediction["error"] is None


@pytest.mark.parametrize("habit", cells())
def test_export_onnx(habit, trained):
    run, _ = trained(habit)
    assert run is not None
    out = run.parent / f"{habit}.onnx"
    result = invoke("export", str(run), "--format", "onnx", "-o", str(out), "--json")
    assert result.exit_code == 0, result.output
    check = json.loads(result.stdout)["check"]
    assert out.is_file() and check["passed"] and check["same_predictions"] == check["images"], check


# ---------------------------------------------------------------- the layout


VIEW_AFTER_ONE_CHANNEL_CONV = HEADER + textwrap.dedent('''
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2))
            self.fc = nn.Linear(8 * 13 * 13, 10)

        def forward(self, x):
            x = self.conv1(x)
            x = x.view(x.size(0), -1)
            return F.log_softmax(self.fc(x), dim=1)
    ''').lstrip()


def test_a_run_in_the_default_layout_evaluates_predicts_and_exports_with_folded_batchnorm(tmp_path, monkeypatch):
    # channels_last off in the recipe: folding BatchNorm into a conv with one input channel
    # (strides that pass for both layouts) must not turn the model channels_last
    (tmp_path / "one.py").write_text(VIEW_AFTER_ONE_CHANNEL_CONV)
    (tmp_path / "experiments.yaml").write_text(
        "iterations:\n  - id: One\n    model: one.py:Net\n    recipe: {epochs: 1, channels_last: false}\n")
    monkeypatch.chdir(tmp_path)
    result = invoke("train", "One", "--dataset", "synthetic", "--limit", "128", "--device", "cpu", "--runs-dir",
                    "runs", "--quiet", "--json")
    assert result.exit_code == 0, result.output
    assert "layout:" not in result.stderr          # the recipe asked for the default layout: nothing to say
    run = Path(json.loads(result.stdout)["run_dir"])
    assert yaml.safe_load((run / "config.yaml").read_text())["recipe"]["channels_last"] is False
    evaluated = invoke("evaluate", str(run), "--json")
    assert evaluated.exit_code == 0, evaluated.output
    predicted = invoke("predict", str(run), str(THREE), "--json")
    assert predicted.exit_code == 0, predicted.output
    exported = invoke("export", str(run), "--format", "onnx", "-o", str(tmp_path / "one.onnx"), "--json")
    assert exported.exit_code == 0 and json.loads(exported.stdout)["check"]["passed"], exported.output


def _trained_like(channels_last: bool) -> nn.Module:
    """A conv with one input channel and a 1x1 conv, each followed by BatchNorm, with
    statistics that are not the identity, in the layout it trained in."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                                        nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 1, 28, 28))
    return model.eval()


@pytest.mark.parametrize("channels_last", [False, True], ids=["default", "channels_last"])
def test_folding_batchnorm_keeps_the_layout_the_model_trained_in(channels_last):
    from mnistkit.training.evaluation import fold_batchnorm

    model = _trained_like(channels_last)
    x = torch.randn(4, 1, 28, 28)
    first = model[0][0]
    assert first.weight.is_contiguous() and first.weight.is_contiguous(memory_format=torch.channels_last)  # both
    for told in (None, channels_last):   # read from the weights' strides, or told
        folded = fold_batchnorm(model) if told is None else fold_batchnorm(model, told)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
        with torch.no_grad():
            out = folded(x)
            torch.testing.assert_close(out, model(x), atol=1e-5, rtol=1e-5)
            conv1 = folded[0][0](x)
        for y in (conv1, out):
            assert y.is_contiguous() is not channels_last
            assert y.is_contiguous(memory_format=torch.channels_last) is channels_last
        if not channels_last:
            out.view(out.size(0), -1)      # a view head runs on the output


def test_the_layout_probe_changes_nothing_and_says_why():
    from mnistkit.backends import choose_layout

    torch.manual_seed(1)
    exec_ns: dict = {}
    text = source("mixed")
    exec(compile(text, "mixed.py", "exec"), exec_ns)
    model = exec_ns["Net"]()     # Dropout and BatchNorm: draws random numbers and moves statistics
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng, py = torch.get_rng_state(), random.getstate()
    layout = choose_layout(model, torch.device("cpu"), True, path="mixed.py")
    assert layout.channels_last is False and f"mixed.py, line {line_of(text, '.view(')}" in layout.note and "view size" in layout.note
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in model.parameters())
    assert all(p.is_contiguous() for p in model.parameters()) and model.training
    assert torch.equal(torch.get_rng_state(), rng) and random.getstate() == py
    assert choose_layout(model, torch.device("cpu"), False).channels_last is False   # not asked: not probed


def test_registered_models_keep_channels_last():
    from mnistkit.usermodels.modelref import resolve
    from mnistkit.recipe import DataOptions, Recipe
    from mnistkit.training.session import Session

    s = Session.build(resolve("I1"), Recipe(epochs=1), DataOptions(dataset="synthetic", limit=64), "cpu")
    assert s.recipe.channels_last is True and not any(n.startswith("layout:") for n in s.notes)
    assert any(p.dim() == 4 and not p.is_contiguous() for p in s.model.parameters())


def test_a_model_that_fails_in_both_layouts_is_reported_as_before(tmp_path, monkeypatch):
    # the probe never masks the model's own error: one line naming the file and line, no layout note
    (tmp_path / "bad.py").write_text(text := HEADER + textwrap.dedent('''
        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(1, 8, 3)
                self.fc = nn.Linear(8 * 26 * 26, 10)

            def forward(self, x):
                x = self.conv(x)
                if self.training:
                    x = x[:, :4]
                return self.fc(x.view(x.size(0), -1))
        ''').lstrip())
    monkeypatch.chdir(tmp_path)
    result = invoke("train", "bad.py:Net", "--dataset", "synthetic", "--limit", "64", "--epochs", "1", "--quiet",
                    "--runs-dir", "r", "--device", "cpu")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "layout:" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: training Net failed: ") and f"bad.py, line {line_of(text, 'x.view(')}, in forward" in line, line
