"""mnistkit augment: the grid is the trainer's own first batch (same split, generator, seed and
augmentation code), the parameters drawn per digit, the settings and provenance in the title."""

import io
import json

import pytest
import torch
from PIL import Image

from mnistkit.data.augment import recording
from mnistkit.training.augpreview import augment_preview
from mnistkit.cli import app
from mnistkit.experiments import resolve_recipe
from mnistkit.usermodels.modelref import resolve
from mnistkit.recipe import Augment, DataOptions, Recipe
from mnistkit.render.augment import augment_png, shown_pixels
from mnistkit.training.session import Session

DATA = DataOptions("synthetic", limit=600)


def trainers_first_batch(recipe: Recipe, data: DataOptions = DATA) -> tuple[torch.Tensor, torch.Tensor]:
    """What the trainer trains on first: the Session a run builds, its first batch."""
    s = Session.build(resolve("I3"), recipe, data, "cpu")
    return next(iter(s.batches))


@pytest.mark.parametrize("recipe", [
    Recipe(batch_size=64, seed=3, augment=Augment(degrees=25, translate=0.1, scale_min=0.9, scale_max=1.1)),
    Recipe(batch_size=32, seed=42, augment=Augment(interpolation="bilinear")),
])
def test_the_grid_is_pixel_identical_to_the_batch_the_trainer_draws(recipe):
    x, y = trainers_first_batch(recipe)
    preview = augment_preview("I3", recipe, DATA, device="cpu", count=24)
    assert torch.equal(preview.images, x[:24]) and list(preview.labels) == y[:24].tolist()
    # what the picture draws is that batch, un-normalised, and nothing else
    assert torch.equal(shown_pixels(preview), (x[:24] * recipe.std + recipe.mean).clamp(0, 1))
    # ...and not merely any augmentation: the same digits warped by another draw differ, and the
    # digits before augmentation are the same digits, unwarped
    other = augment_preview("I3", recipe.replace(seed=recipe.seed + 1), DATA, device="cpu", count=24)
    assert not torch.equal(other.images, preview.images)
    assert not torch.equal(preview.originals, shown_pixels(preview))
    plain = trainers_first_batch(recipe.replace(augment=Augment(enabled=False)))[0][:24]
    assert torch.allclose(preview.originals, (plain * recipe.std + recipe.mean).clamp(0, 1))


def test_the_parameters_drawn_are_those_that_warped_each_digit():
    from mnistkit.data.augment import affine_theta, augment_batch

    recipe = Recipe(batch_size=16, seed=5, augment=Augment(degrees=30, translate=0.1))
    preview = augment_preview("I3", recipe, DATA, device="cpu", count=16)
    p = preview.params
    assert len(p) == 16 and all(abs(d["angle"]) <= 30 and abs(d["translate_x"]) <= 3 and d["shear"] == 0 for d in p)
    assert len({d["angle"] for d in p}) == 16   # one draw per digit
    # warping the digits as stored with the reported parameters gives the digits as trained
    theta = affine_theta(*(torch.tensor([float(d[k]) for d in p]) for k in ("angle", "translate_x", "translate_y",
                                                                               "scale")), None, 28, 28)
    warped = augment_batch(preview.originals, theta, "nearest")
    assert (warped - shown_pixels(preview)).abs().max() < 0.02


def test_augment_off_shows_the_digits_as_stored():
    recipe = Recipe(batch_size=16, augment=Augment(enabled=False))
    preview = augment_preview("I0", recipe, DATA, device="cpu", count=8)
    assert torch.allclose(shown_pixels(preview), preview.originals, atol=1e-6)
    assert preview.settings.startswith("augmentation off") and preview.params[0]["angle"] == 0.0


def test_the_cli_writes_the_picture_and_json(runner, tmp_path):
    out = tmp_path / "aug.png"
    args = ["augment", "I4", "--dataset", "synthetic", "--limit", "600", "--device", "cpu", "--seed", "7", "-n", "10"]
    result = runner.invoke(app, [*args, "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}: I4, epoch 1, batch 1 of seed 7 on the synthetic training set (600 images)" in result.stderr
    with Image.open(out) as picture:
        assert picture.format == "PNG" and picture.size[0] > 600
    data = json.loads(runner.invoke(app, [*args, "--json"]).stdout)
    assert (data["model"], data["seed"], data["batch_size"], data["train_samples"]) == ("I4", 7, 128, 600)
    assert data["augment"]["degrees"] == 5.0 and len(data["images"]) == 10   # I4's recipe: degrees 5
    assert set(data["images"][0]) == {"position", "label", "angle", "translate_x", "translate_y", "scale", "shear"}
    recipe = resolve_recipe("I4", None).replace(seed=7)
    preview = augment_preview("I4", recipe, DATA, device="cpu", count=10)
    assert [d["angle"] for d in data["images"]] == [d["angle"] for d in preview.params]


def test_the_title_carries_the_settings_and_the_provenance():
    recipe = Recipe(batch_size=16, seed=9, augment=Augment(degrees=7, translate=0.1, scale_min=0.9, scale_max=1.1))
    preview = augment_preview("S1", recipe, DATA, device="cpu", count=4)
    assert preview.settings == ("degrees ±7, translate ±0.1 (±2.8 px, rounded), scale 0.9-1.1, shear none, nearest")
    assert preview.provenance == ("epoch 1, batch 1 of seed 9 on the synthetic training set (600 images), device cpu: "
                                  "the first 4 of its 16 digits")
    png = augment_png(preview)
    with Image.open(io.BytesIO(png)) as picture:
        assert picture.format == "PNG"


def test_recording_keeps_nothing_outside_its_block():
    from mnistkit.data.augment import _local, sample_affine

    g = torch.Generator().manual_seed(0)
    with recording() as drawn:
        sample_affine(3, Augment(), 28, g, torch.device("cpu"))
    sample_affine(3, Augment(), 28, g, torch.device("cpu"))
    assert len(drawn) == 1 and drawn[0].angle.shape == (3,) and _local.recorders == []


def test_set_previews_a_recipe_change_before_the_change_log_has_it(runner):
    args = ["augment", "I3", "--dataset", "synthetic", "--limit", "600", "--device", "cpu", "-n", "6", "--json"]
    data = json.loads(runner.invoke(app, [*args, "--set", "augment.degrees=30", "--set", "seed=4"]).stdout)
    assert data["augment"]["degrees"] == 30.0 and data["seed"] == 4
    assert max(abs(d["angle"]) for d in data["images"]) > 10   # the recipe's 10 could not draw it
    twice = runner.invoke(app, [*args, "--seed", "1", "--set", "seed=2"])
    assert twice.exit_code != 0 and "seed is given twice" in twice.stderr


@pytest.mark.parametrize("args, needle", [
    (["augment", "I9"], "I9"),
    (["augment", "I3", "-n", "0"], "--count"),
    (["augment", "I3", "--dataset", "cifar"], "dataset must be one of mnist, synthetic"),
    (["augment", "I3", "--set", "augment.degrees=500"], "augment.degrees must be in [0, 180]"),
])
def test_wrong_input_is_one_line(runner, args, needle):
    result = runner.invoke(app, args)
    assert result.exit_code != 0 and len(result.stderr.strip().splitlines()) == 1 and needle in result.stderr, \
        result.stderr
