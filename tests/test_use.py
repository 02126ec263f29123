"""Using a trained model: predict a user's own images, export to ONNX and safetensors, pictures of
the mistakes, and the list of runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from mnistkit.cli import app
from mnistkit.errors import TrainingDiverged, TrainingInterrupted, UsageError
from mnistkit.inference.predict import preprocess, read_image
from mnistkit.recipe import DataOptions, Recipe
from mnistkit.runs import list_runs
from mnistkit.training.loop import train

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
from make_digits import draw_digit  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """I3 trained briefly on synthetic digits (font glyphs, like the user-style images)."""
    runs = tmp_path_factory.mktemp("use")
    return train("I3", Recipe(epochs=3), DataOptions("synthetic"), device="cpu", runs_dir=runs).run_dir


def centre_of_mass(x: torch.Tensor) -> tuple[float, float]:
    total = float(x.sum())
    idx = torch.arange(28, dtype=torch.float32)
    return float((x.sum(1) * idx).sum()) / total, float((x.sum(0) * idx).sum()) / total


@pytest.mark.parametrize("digit,size,at,height", [
    ("3", (240, 180), (60, 60), 120),    # off-centre, top left
    ("1", (300, 400), (220, 300), 200),  # tall and thin, bottom right
    ("7", (500, 120), (400, 60), 90),    # a wide photo
    ("0", (28, 28), (14, 14), 24),       # already small
])
def test_preprocessing_centres_the_mass_and_scales_the_longer_side_to_20(tmp_path, digit, size, at, height):
    path = tmp_path / "d.png"
    draw_digit(digit, size, at, height, seed=1).save(path)
    x = preprocess(read_image(path))
    assert x.shape == (28, 28) and 0 <= float(x.min()) and float(x.max()) <= 1
    assert float(x.median()) == 0.0 and float(x.max()) > 0.9  # ink bright on a black field: light paper inverted
    cy, cx = centre_of_mass(x)
    assert abs(cy - 13.5) <= 1 and abs(cx - 13.5) <= 1
    rows, cols = (x > 0.25).any(1).nonzero(), (x > 0.25).any(0).nonzero()
    extent = max(int(rows[-1] - rows[0]) + 1, int(cols[-1] - cols[0]) + 1)
    assert 19 <= extent <= 20  # the longer side is 20 pixels (the LANCZOS edge may fall under the threshold)


def test_a_dark_background_photo_is_not_inverted(tmp_path):
    from PIL import Image, ImageOps

    draw_digit("4", (200, 200), (100, 100), 140, seed=2).save(tmp_path / "light.png")
    ImageOps.invert(Image.open(tmp_path / "light.png")).save(tmp_path / "dark.png")
    a, b = (preprocess(read_image(tmp_path / name)) for name in ("light.png", "dark.png"))
    assert torch.allclose(a, b, atol=0.02)


def test_user_style_digits_are_predicted_correctly(runner, trained, tmp_path):
    for d in "0123456789":
        draw_digit(d, (260, 200), (110 + 7 * int(d), 95), 110, seed=int(d)).save(tmp_path / f"{d}.png")
    result = runner.invoke(app, ["predict", str(trained), str(tmp_path), "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["model"] == "I3" and data["epoch"] == 3 and data["checkpoint"].endswith("best.pt")
    assert data["trained_on"]["dataset"] == "synthetic" and data["trained_on"]["train_samples"] == 6000
    got = {Path(p["path"]).stem: p for p in data["predictions"]}
    correct = [d for d in "0123456789" if got[d]["digit"] == int(d)]
    assert len(correct) >= 9, {d: got[d]["top3"] for d in got}
    for p in got.values():
        assert abs(sum(t["probability"] for t in p["top3"]) - 1) < 0.5 and p["probability"] == p["top3"][0]["probability"]


def test_the_example_images_and_show(runner, trained):
    result = runner.invoke(app, ["predict", str(trained), str(ROOT / "examples" / "three.png"),
                                 str(ROOT / "examples" / "seven.jpg"), "--show", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "what the model saw (28x28)" in result.stdout and "█" in result.stdout
    rows = [line for line in result.stdout.splitlines() if "three.png" in line and "│" in line]
    assert rows and "│     3 │" in rows[0]


def test_bad_images_are_one_line_each_and_the_others_still_predicted(runner, trained, tmp_path):
    from PIL import Image

    draw_digit("7", (200, 200), (100, 100), 140, seed=7).save(tmp_path / "good.png")
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    full = (tmp_path / "good.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(full[: len(full) // 2])
    Image.new("L", (50, 50), 255).save(tmp_path / "blank.png")
    huge = Image.new("L", (8000, 6000), 255)  # 48 million pixels: over the cap, tiny on disk
    huge.save(tmp_path / "huge.png", optimize=True)
    names = ["text.png", "good.png", "empty.png", "cut.png", "blank.png", "huge.png", "missing.png"]
    result = runner.invoke(app, ["predict", str(trained), *[str(tmp_path / n) for n in names], "--device", "cpu"])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 6 and all(line.startswith("error: ") for line in lines), result.stderr
    for name, needle in (("text.png", "only raster images are read"), ("empty.png", "is empty"),
                         ("cut.png", "not a readable image"), ("blank.png", "no digit found"),
                         ("huge.png", "too large"), ("missing.png", "does not exist")):
        assert any(name in line and needle in line for line in lines), (name, result.stderr)
    good = [line for line in result.stdout.splitlines() if "good.png" in line]
    assert good and "│     7 │" in good[0]


def test_onnx_export_agrees_with_pytorch_on_the_whole_test_set(runner, trained, tmp_path):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "i3.onnx"
    result = runner.invoke(app, ["export", str(trained), "--format", "ONNX", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    check = json.loads(result.stdout)["check"]
    assert check["images"] == check["same_predictions"] == 1000 and check["passed"]
    assert check["max_abs_logit_difference"] <= 1e-4
    import onnxruntime as ort

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for batch in (1, 7):  # the batch dimension is dynamic
        assert session.run(None, {"images": torch.zeros(batch, 1, 28, 28).numpy()})[0].shape == (batch, 10)
    text = runner.invoke(app, ["export", str(trained), "-f", "onnx", "-o", str(tmp_path / "b.onnx")])
    assert "1,000 of 1,000 predictions agree" in text.stdout and "passed" in text.stdout


def test_safetensors_round_trip_without_pickle(runner, trained, tmp_path):
    pytest.importorskip("safetensors")
    from mnistkit.training.evaluation import load_model
    from mnistkit.inference.export import load_safetensors
    from mnistkit.runs.checkpoint import load_checkpoint

    out = tmp_path / "i3.safetensors"
    assert runner.invoke(app, ["export", str(trained), "-f", "safetensors", "-o", str(out)]).exit_code == 0
    raw = out.read_bytes()
    assert b"mnistkit_model" in raw[8:8 + int.from_bytes(raw[:8], "little")]  # the JSON header, readable without pickle
    rebuilt = load_safetensors(out)
    original = load_model(load_checkpoint(trained / "best.pt")).eval()
    x = torch.randn(16, 1, 28, 28)
    with torch.inference_mode():
        torch.testing.assert_close(rebuilt(x), original(x.contiguous(memory_format=torch.channels_last)),
                                   atol=1e-5, rtol=1e-5)


def test_export_without_the_extras_says_how_to_install(runner, trained, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)
    result = runner.invoke(app, ["export", str(trained), "-f", "onnx", "-o", str(tmp_path / "x.onnx")])
    assert result.exit_code == 1 and "mnistkit[export]" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "x.onnx").exists()


def test_pictures_of_the_mistakes(runner, trained, tmp_path):
    from PIL import Image

    errors, confusion = tmp_path / "errors.png", tmp_path / "confusion.png"
    result = runner.invoke(app, ["evaluate", str(trained), "--device", "cpu", "--errors", str(errors),
                                 "--confusion", str(confusion), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    probs = [m["probability"] for m in report["mistakes"]]
    assert probs == sorted(probs, reverse=True) and len(probs) == 1000 - round(report["test_acc"] * 10)
    assert all(m["label"] != m["predicted"] for m in report["mistakes"])
    for path in (errors, confusion):
        img = Image.open(path)
        assert img.format == "PNG" and round(img.info["dpi"][0]) >= 150 and img.width >= 500


def test_runs_lists_states(runner, tmp_path):
    runs = tmp_path / "runs"
    data = DataOptions("synthetic", limit=300)
    train("I3", Recipe(epochs=1, batch_size=128, lr=0.05), data, device="cpu", runs_dir=runs)

    class StopAfterOne:
        def on_start(self, start): pass
        def on_step(self, step): pass
        def on_epoch(self, row, best): raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted):
        train("I2", Recipe(epochs=3, batch_size=128, lr=0.05), data, device="cpu", runs_dir=runs,
              callback=StopAfterOne())
    with pytest.raises(TrainingDiverged):
        train("I0", Recipe(epochs=2, batch_size=128, lr=1e6, scheduler="none"), DataOptions("synthetic", limit=1000),
              device="cpu", runs_dir=runs)
    damaged = runs / "I1-damaged"
    damaged.mkdir()
    (damaged / "config.yaml").write_text("model: [\n")
    states = {r.model or "damaged": r.state for r in list_runs(runs)}
    assert states == {"I3": "finished", "I2": "interrupted", "I0": "diverged", "damaged": "damaged"}
    result = runner.invoke(app, ["runs", "--runs-dir", str(runs)])
    assert result.exit_code == 0 and "interrupted: resumable" in result.stdout and "diverged" in result.stdout
    listed = json.loads(runner.invoke(app, ["runs", "--runs-dir", str(runs), "--json"]).stdout)["runs"]
    assert [r["modified"] for r in listed] == sorted((r["modified"] for r in listed), reverse=True)
    i2 = next(r for r in listed if r["model"] == "I2")
    assert (i2["epochs_done"], i2["epochs_planned"], i2["seed"], i2["train_samples"]) == (1, 3, 42, 300)


def test_several_seeds_and_iterations_from_python(tmp_path):
    # what `mnistkit train --seeds 2` and `--all` do, as a library call
    from mnistkit import make_plan, train_plan
    from mnistkit.experiments import find_experiments

    exp = find_experiments(None)
    plan = make_plan(exp, "i4", seeds=[1, 2])
    assert [m.reference for m in plan.models] == ["I4"] and plan.models[0].kind == "registered" and plan.seeds == (1, 2) and plan.notes == ()
    groups = []
    results = train_plan(plan, DataOptions("synthetic", limit=128), {"epochs": 1, "batch_size": 64}, device="cpu",
                         runs_dir=tmp_path, on_group=lambda name, group: groups.append((name, len(group))))
    assert [r.seed for r in results] == [1, 2] and groups == [("I4", 2)]
    assert all(r.epochs == 1 and r.run_dir.parent == tmp_path for r in results)
    every = make_plan(exp, all_iterations=True)
    assert [m.reference for m in every.models] == [it.model for it in exp.iterations] and every.seeds == (None,)
    with pytest.raises(UsageError, match="give no model"):
        make_plan(exp, "I3", all_iterations=True)


def test_an_export_of_nan_weights_is_refused_not_passed(runner, trained, tmp_path):
    # issue 29, item 14: max(worst, nan) kept worst, and a NaN model "passed" its parity check
    pytest.importorskip("onnxruntime")
    from mnistkit.runs.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(trained / "best.pt")
    name = next(k for k in ckpt["state_dict"] if k.endswith("conv.weight"))
    ckpt["state_dict"][name] = torch.full_like(ckpt["state_dict"][name], float("nan"))
    save_checkpoint(tmp_path / "nan.pt", ckpt)
    out = tmp_path / "nan.onnx"
    result = runner.invoke(app, ["export", str(tmp_path / "nan.pt"), "-f", "onnx", "-o", str(out)])
    assert result.exit_code == 1, result.output
    assert "not finite numbers" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_exif_orientation_and_16_bit_scans_are_read_as_they_are_shown(tmp_path):
    # issue 29, item 15: a phone photo tagged orientation 8 was fed rotated by 90 degrees; a valid
    # 16-bit scan was clipped to 8 bits and gave "no digit found"
    from PIL import Image

    upright = draw_digit("7", (200, 200), (100, 100), 140, seed=3)
    upright.save(tmp_path / "upright.png")
    expected = preprocess(read_image(tmp_path / "upright.png"))
    # stored turned 90 degrees clockwise, with the tag that tells a viewer to turn it back
    exif = Image.Exif()
    exif[0x0112] = 8
    upright.rotate(-90, expand=True).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    assert torch.allclose(preprocess(read_image(tmp_path / "phone.jpg")), expected, atol=0.15)
    assert not torch.allclose(preprocess(read_image(tmp_path / "upright.png")).rot90(1), expected, atol=0.15)
    # the same digit as a 16-bit grayscale scan (paper near 65535)
    x = torch.frombuffer(bytearray(upright.convert("L").tobytes()), dtype=torch.uint8).to(torch.int32) * 257
    Image.frombytes("I;16", upright.size, x.to(torch.int16).numpy().tobytes()).save(tmp_path / "scan16.png")
    img = read_image(tmp_path / "scan16.png")
    assert img.mode == "L"
    assert torch.allclose(preprocess(img), expected, atol=0.02)


def test_many_images_are_predicted_in_bounded_batches(trained, tmp_path, monkeypatch):
    # issue 29, item 15: every image went through the model in one batch (2.4 GB for 20,000 PNGs)
    import mnistkit.training.evaluation as E
    import mnistkit.inference.predict as P

    for i in range(5):
        draw_digit(str(i), (60, 60), (30, 30), 40, seed=i).save(tmp_path / f"{i}.png")
    seen = []
    real = E.load_model

    def spy(*args, **kwargs):
        model = real(*args, **kwargs)
        model.register_forward_pre_hook(lambda m, inputs: seen.append(len(inputs[0])))
        return model

    monkeypatch.setattr(P, "PREDICT_BATCH", 2)
    monkeypatch.setattr("mnistkit.training.evaluation.load_model", spy)
    result = P.predict(trained, [tmp_path], device="cpu")
    assert seen == [2, 2, 1] and all(p.digit is not None for p in result.predictions)


def test_two_specks_far_apart_are_no_digit_not_a_traceback(runner, trained, tmp_path):
    # issue 29, item 11: a 400x400 image with two specks of ink raised ZeroDivisionError, and the
    # command's other images were dropped
    from PIL import Image

    im = Image.new("L", (400, 400), 255)
    im.putpixel((10, 10), 0)
    im.putpixel((390, 390), 0)
    im.save(tmp_path / "specks.png")
    draw_digit("3", (120, 120), (60, 60), 90, seed=4).save(tmp_path / "three.png")
    result = runner.invoke(app, ["predict", str(trained), str(tmp_path / "specks.png"), str(tmp_path / "three.png"),
                                 "--json", "--device", "cpu"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    (line,) = result.stderr.strip().splitlines()
    assert "specks.png" in line and "no digit found" in line
    predictions = json.loads(result.stdout)["predictions"]
    assert [p["path"].endswith("three.png") and p["digit"] is not None for p in predictions][1]
