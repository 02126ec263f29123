"""`mnistkit explain` (issue 40 goal 4): what the model sees, for a registered model, a YAML
architecture and a student-style file model (and the same model as an object, as predict takes
it): a picture per digit, JSON naming every Conv2d, a Grad-CAM map of the input's size that is
non-negative and not all zero, the run's files untouched, a bad image one line. Also (goal 7):
evaluate and predict say when best.pt was chosen on the test set."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import one_line_error
from mnistkit.cli import app

pytestmark = pytest.mark.slow   # each run trains a model for a second or two

ROOT = Path(__file__).resolve().parent.parent
THREE = ROOT / "examples" / "three.png"
SEVEN = ROOT / "examples" / "seven.jpg"

STUDENT = '''
import torch
from torch import nn
import torch.nn.functional as F


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.BatchNorm2d(8))
        self.conv2 = nn.Sequential(nn.Conv2d(8, 12, 3), nn.ReLU(), nn.BatchNorm2d(12), nn.MaxPool2d(2))
        self.conv3 = nn.Conv2d(12, 10, 3)
        self.fc = nn.Linear(10 * 10 * 10, 10)

    def forward(self, x):
        x = self.conv2(self.conv1(x))
        x = F.relu(self.conv3(x))
        x = x.view(x.size(0), -1)
        return F.log_softmax(self.fc(x), dim=1)
'''


def tree_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from typer.testing import CliRunner

    root = tmp_path_factory.mktemp("explain")
    (root / "net.py").write_text(STUDENT)
    runner, out = CliRunner(), {}
    for key, ref in (("registered", "I1"), ("student", f"{root / 'net.py'}:Net"),
                     ("yaml", str(ROOT / "examples" / "architectures" / "s2.yaml"))):
        result = runner.invoke(app, ["train", ref, "--dataset", "synthetic", "--limit", "256", "--epochs", "1",
                                     "--device", "cpu", "--quiet", "--json", "--runs-dir", str(root / "runs")])
        assert result.exit_code == 0, result.output
        out[key] = Path(json.loads(result.stdout)["run_dir"])
    return root, out


def conv_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


@pytest.mark.parametrize("kind", ["registered", "student", "yaml"])
def test_explain_draws_a_picture_and_names_every_conv(runner, runs, kind, tmp_path):
    from PIL import Image

    from mnistkit.runs.checkpoint import load_checkpoint
    from mnistkit.training.evaluation import load_model

    root, folders = runs
    run = folders[kind]
    before = tree_hashes(run)
    out = tmp_path / "seen.png"
    result = runner.invoke(app, ["explain", str(run), str(THREE), "-o", str(out), "--channels", "4", "--json",
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    with Image.open(out) as img:
        img.load()
        assert img.width > 200 and img.height > 200
    ckpt = load_checkpoint(run / "best.pt")
    expected = conv_names(load_model(ckpt, path=run / "best.pt"))
    [item] = data["images"]
    assert [layer["name"] for layer in item["layers"]] == expected and expected
    assert all(len(layer["shape"]) == 3 and layer["shown"] == min(4, layer["shape"][0]) for layer in item["layers"])
    assert item["digit"] in range(10) and item["cam_layer"] in expected and item["picture"] == str(out)
    assert item["cam_shape"] == [28, 28] and item["cam_max"] > 0
    assert "pixels" not in json.dumps(data)
    assert tree_hashes(run) == before     # the run's files are only read


def test_the_python_api_with_a_model_object(runs):
    from mnistkit.inference.explain import explain

    root, folders = runs
    namespace: dict = {}
    exec(compile(STUDENT, "net.py", "exec"), namespace)
    obj = namespace["Net"]()
    weights = {k: v.clone() for k, v in obj.state_dict().items()}
    before = tree_hashes(folders["student"])
    result = explain(folders["student"], [THREE, SEVEN], channels=3, device="cpu", model=obj)
    assert [e.error for e in result.explanations] == [None, None]
    for e in result.explanations:
        assert [m.name for m in e.layers] == ["conv1.0", "conv2.0", "conv3"]
        assert [tuple(m.maps.shape) for m in e.layers] == [(3, 26, 26), (3, 24, 24), (3, 10, 10)]
        assert e.cam_layer == "conv3" and e.cam.shape == (28, 28)
        assert bool((e.cam >= 0).all()) and float(e.cam.max()) > 0
        assert 0 < e.probability <= 1 and e.digit == e.top3[0][0]
    # the object given is copied, never loaded into or changed; the run stays as it was
    assert all(torch.equal(weights[k], v) for k, v in obj.state_dict().items())
    assert tree_hashes(folders["student"]) == before


def test_grad_cam_by_hand_and_functional_convs_counted():
    from mnistkit.inference.explain import explain_pixels

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.w = nn.Parameter(torch.randn(4, 4, 3, 3))
            self.fc = nn.Linear(4, 10)

        def forward(self, x):
            x = nn.functional.relu(self.conv(x), inplace=True)
            x = nn.functional.conv2d(x, self.w)    # a functional conv: no module, no hook
            return self.fc(x.mean((2, 3)))

    torch.manual_seed(0)
    model = Mixed().eval()
    x = torch.randn(1, 1, 28, 28)
    found = explain_pixels(model, x, channels=2)
    assert found["functional_convs"] == 1 and [m.name for m in found["layers"]] == ["conv"]
    # Grad-CAM by hand: channel weights = mean gradient of the class score over the map
    act = model.conv(x).detach().requires_grad_(True)
    out = model.fc(nn.functional.conv2d(torch.relu(act), model.w).mean((2, 3)))
    (grad,) = torch.autograd.grad(out[0, found["digit"]], act)
    raw = torch.relu((grad.mean((2, 3), keepdim=True) * act).sum(1, keepdim=True))
    want = nn.functional.interpolate(raw, size=(28, 28), mode="bilinear", align_corners=False)[0, 0]
    assert torch.allclose(found["cam"], want.detach(), atol=1e-5)
    assert torch.equal(found["layers"][0].maps, model.conv(x)[0, :2].detach())   # before the in-place ReLU


def test_a_bad_image_is_one_line(runner, runs, tmp_path):
    root, folders = runs
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    result = runner.invoke(app, ["explain", str(folders["registered"]), str(bad), "-o", str(tmp_path / "x.png"),
                                 "--device", "cpu"])
    line = one_line_error(result, 1)
    assert "bad.png" in line and not (tmp_path / "x.png").exists()


def test_evaluate_and_predict_say_best_was_chosen_on_the_test_set(runner, runs):
    root, folders = runs
    run = folders["registered"]     # no validation split: best.pt was chosen on the test set
    evaluated = runner.invoke(app, ["evaluate", str(run), "--device", "cpu"])
    predicted = runner.invoke(app, ["predict", str(run), str(THREE), "--device", "cpu"])
    for result in (evaluated, predicted):
        assert result.exit_code == 0, result.output
        assert "was chosen on the test set" in " ".join(result.stdout.split()), result.stdout
    assert json.loads(runner.invoke(app, ["predict", str(run), str(THREE), "--json"]).stdout)["best_chosen_on"] == "test"
    last = runner.invoke(app, ["evaluate", str(run / "last.pt"), "--device", "cpu", "--json"])
    assert json.loads(last.stdout)["best_chosen_on"] is None    # last.pt: no choice was made


def test_runs_json_names_each_runs_device_and_precision(runner, runs):
    import yaml

    root, folders = runs
    listed = json.loads(runner.invoke(app, ["runs", "--runs-dir", str(root / "runs"), "--json"]).stdout)["runs"]
    assert {r["device"] for r in listed} == {"cpu"}   # as config.yaml records it
    recorded = yaml.safe_load((folders["registered"] / "config.yaml").read_text())["recipe"]["precision"]
    assert recorded in {r["precision"] for r in listed} and recorded in ("bf16", "fp32")
