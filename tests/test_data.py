import gzip
import math

import pytest
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from mnistkit import data as D
from mnistkit.data.augment import affine_theta, augment_batch, sample_affine
from mnistkit.data.batches import TrainBatches
from mnistkit.data import Augment, DataError, load_mnist, make_synthetic, read_idx
from mnistkit.recipe import MEAN, STD

from helpers import idx_bytes, write_fake_mnist


# ---------------------------------------------------------------- loading IDX files

@pytest.mark.parametrize("gz", [True, False])
def test_flat_folder_gz_or_raw(tmp_path, gz):
    truth = write_fake_mnist(tmp_path, gz=gz)
    train = load_mnist("train", tmp_path, download=False)
    test = load_mnist("test", tmp_path, download=False)
    assert torch.equal(train.images, truth["train"][0]) and torch.equal(train.labels, truth["train"][1].long())
    assert len(test) == 20 and train.labels.dtype == torch.int64


def test_torchvision_layout(tmp_path):
    truth = write_fake_mnist(tmp_path / "MNIST" / "raw")
    assert torch.equal(load_mnist("train", tmp_path, download=False).images, truth["train"][0])


def test_env_var_sets_the_default_folder(tmp_path, monkeypatch):
    write_fake_mnist(tmp_path)
    monkeypatch.setenv("MNISTKIT_DATA", str(tmp_path))
    assert len(load_mnist("train", None, download=False)) == 40


def test_truncated_file(tmp_path):
    write_fake_mnist(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match="truncated"):
        load_mnist("train", tmp_path, download=False)


def test_truncated_gzip(tmp_path):
    write_fake_mnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError, match="cannot read"):
        load_mnist("train", tmp_path, download=False)


def test_labels_where_images_belong(tmp_path):
    write_fake_mnist(tmp_path)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes((tmp_path / "train-labels-idx1-ubyte.gz").read_bytes())
    with pytest.raises(DataError, match="swapped or of the wrong kind"):
        load_mnist("train", tmp_path, download=False)


def test_wrong_magic_number(tmp_path):
    write_fake_mnist(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"PK\x03\x04" + bytes(100)))
    with pytest.raises(DataError, match="magic number"):
        load_mnist("train", tmp_path, download=False)


def test_mismatched_counts(tmp_path):
    write_fake_mnist(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(torch.zeros(7, dtype=torch.uint8))))
    with pytest.raises(DataError, match="do not belong together"):
        load_mnist("train", tmp_path, download=False)


def test_missing_files_without_network_is_one_clear_message(tmp_path, monkeypatch):
    import torchvision.datasets

    class NoNetwork(torchvision.datasets.MNIST):
        def __init__(self, *args, **kwargs):
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: [Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "MNIST", NoNetwork)
    with pytest.raises(DataError) as info:
        load_mnist("train", tmp_path / "empty")
    message = str(info.value)
    assert "could not be downloaded" in message and "train-images-idx3-ubyte.gz" in message
    assert str(tmp_path / "empty") in message and "\n" not in message


def test_read_idx_shapes(tmp_path):
    path = tmp_path / "x"
    path.write_bytes(idx_bytes(torch.arange(24, dtype=torch.uint8).view(2, 3, 4)))
    assert read_idx(path).shape == (2, 3, 4)
    assert int(read_idx(path)[1, 2, 3]) == 23


# ---------------------------------------------------------------- synthetic digits

def test_synthetic_is_deterministic_and_mnist_shaped():
    a, b = make_synthetic("train", 200, seed=3), make_synthetic("train", 200, seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert a.images.shape == (200, 28, 28) and a.images.dtype == torch.uint8
    assert set(a.labels.tolist()) == set(range(10))
    assert not torch.equal(a.images, make_synthetic("train", 200, seed=4).images)
    assert not torch.equal(make_synthetic("test", 200, seed=3).images, a.images)  # splits differ


# ---------------------------------------------------------------- batched augmentation

PARAMS = [(10.0, 1, -1, 1.02), (-7.3, 0, 1, 0.98), (3.0, -1, 0, 1.0), (-10.0, 1, 1, 0.99)]


@pytest.mark.parametrize("mode,interp", [("nearest", InterpolationMode.NEAREST), ("bilinear", InterpolationMode.BILINEAR)])
def test_batched_affine_matches_torchvision(mode, interp):
    x = make_synthetic("train", len(PARAMS), seed=1).images.unsqueeze(1).float() / 255
    angle, tx, ty, scale = (torch.tensor([p[i] for p in PARAMS], dtype=torch.float32) for i in range(4))
    mine = augment_batch(x, affine_theta(angle, tx, ty, scale, None, 28, 28), mode)
    ref = torch.stack([TF.affine(img, angle=a, translate=[int(dx), int(dy)], scale=s, shear=[0.0, 0.0],
                                 interpolation=interp) for img, (a, dx, dy, s) in zip(x, PARAMS)])
    if mode == "nearest":
        assert torch.equal(mine, ref)
    else:
        torch.testing.assert_close(mine, ref, atol=1e-5, rtol=0)


def test_random_parameters_follow_random_affine():
    aug = Augment(degrees=10, translate=0.05, scale_min=0.98, scale_max=1.02)
    theta = sample_affine(20000, aug, 28, torch.Generator().manual_seed(0), torch.device("cpu"))
    # recover scale and angle from the inverse matrix: [[cos, sin], [-sin, cos]] / scale
    scale = 1 / torch.sqrt(theta[:, 0, 0] ** 2 + theta[:, 0, 1] ** 2)
    angle = torch.rad2deg(torch.atan2(theta[:, 0, 1], theta[:, 0, 0]))
    assert 0.98 - 1e-5 <= scale.min() and scale.max() <= 1.02 + 1e-5
    assert angle.abs().max() <= 10 + 1e-3 and angle.abs().max() > 9.9
    # translations are whole pixels within round(0.05 * 28) = 1, as RandomAffine draws them
    m = theta[:, :, :2] * scale.view(-1, 1, 1)  # rotation only
    t = -torch.linalg.solve(theta[:, :, :2], theta[:, :, 2:]).squeeze(-1) * 14
    assert torch.allclose(t, t.round(), atol=1e-3)
    assert set(t.round().flatten().tolist()) == {-1.0, 0.0, 1.0}
    assert torch.allclose(torch.linalg.det(m), torch.ones(len(m)), atol=1e-4)


def test_train_batches_cover_the_dataset_once_per_epoch_and_normalise():
    split = make_synthetic("train", 600, seed=0)
    batches = TrainBatches(split, 256, torch.device("cpu"), Augment(enabled=False), torch.Generator().manual_seed(0))
    xs, ys = zip(*batches)
    assert [len(y) for y in ys] == [256, 256, 88] and len(batches) == 3
    assert sorted(torch.cat(ys).tolist()) == sorted(split.labels.tolist())
    background = (0 - MEAN) / STD
    assert math.isclose(float(torch.cat(xs).min()), background, rel_tol=1e-5)
