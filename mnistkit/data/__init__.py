"""The data: MNIST's IDX files from a local folder or torchvision's download (bounded, validated
reads and the official-MNIST check), synthetic digits, the validation draw, and what a run
records of them. The batches are made in ``batches.py``, augmented in ``augment.py``.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import math
import os
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mnistkit.errors import DataError, MnistkitError, UsageError
from mnistkit.data.augment import affine_theta, augment_batch
from mnistkit.recipe import Augment, DataOptions, Dataset, choices, expand_path
from mnistkit.files.safeio import open_regular

__all__ = [
    "DataError", "Split", "Augment", "DATASETS", "default_data_dir", "resolve_data_dir", "read_idx",
    "load_mnist", "make_synthetic", "load_dataset", "load_splits", "provenance", "hold_out",
]

DATASETS = choices(Dataset)
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IMAGES_MAGIC, _LABELS_MAGIC = 0x00000803, 0x00000801  # uint8 data, 3 dims / 1 dim


@dataclass(frozen=True)
class Split:
    """One split: ``images`` uint8 ``[N, 28, 28]``, ``labels`` int64 ``[N]``. ``official``:
    read from files identical to the official MNIST release (checked by sha256)."""

    images: torch.Tensor
    labels: torch.Tensor
    official: bool = False

    def __len__(self) -> int:
        return len(self.labels)

    def head(self, n: int) -> "Split":
        return Split(self.images[:n], self.labels[:n], self.official)

    def take(self, index: torch.Tensor) -> "Split":
        return Split(self.images[index], self.labels[index], self.official)


def hold_out(split: Split, n: int, seed: int = 0) -> tuple[Split, Split]:
    """``(rest, held_out)``: ``n`` images drawn by a seeded permutation (the same ``n`` and
    ``seed`` give the same images on every machine); the rest keep their original order."""
    if not 0 < n < len(split):
        raise DataError(f"a validation split of {n:,} needs 1 to {len(split) - 1:,} of the {len(split):,} "
                        "training images")
    perm = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))
    held = perm[:n].sort().values
    keep = torch.ones(len(split), dtype=torch.bool)
    keep[held] = False
    return split.take(keep.nonzero().squeeze(1)), split.take(held)


# --------------------------------------------------------------------------- real MNIST


def default_data_dir() -> Path:
    """``$MNISTKIT_DATA``, else the per-user cache folder (``$XDG_CACHE_HOME/mnistkit``)."""
    env = os.environ.get("MNISTKIT_DATA")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "mnistkit"


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """The one place a data folder is settled: ``~`` expanded, then absolute."""
    return Path(expand_path(data_dir if data_dir else default_data_dir()))


MAX_IDX_BYTES = 256 * 2**20  # 5x the largest MNIST file: a header promising more is not MNIST

# sha256 of the decompressed official MNIST files (LeCun, Cortes, Burges): a run says whether it
# trained on exactly these, so a folder of other IDX files never passes for "real MNIST"
OFFICIAL_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}


def _read_exactly(fh, n: int) -> bytes:
    chunks, left = [], n
    while left > 0:
        chunk = fh.read(min(left, 1 << 22))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_idx(path: str | os.PathLike, expect_magic: int | None = None, digest: list[str] | None = None) -> torch.Tensor:
    """Read an IDX file (gzipped or not) into a uint8 tensor, checking its header and size.

    Reading is bounded: the header's declared size is checked against ``MAX_IDX_BYTES`` before
    the body is read, and no more than the declared size (plus one byte, to detect excess) is
    ever inflated, so a small gzip that inflates to gigabytes costs nothing. When ``digest``
    is a list, the sha256 of the decompressed file is appended to it."""
    path = Path(path)
    try:
        with open_regular(path, DataError, "an IDX") as fh:   # a named pipe or a device: refused, never read
            gz = fh.read(2) == b"\x1f\x8b"
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as fh:
            head = _read_exactly(fh, 4)
            if len(head) < 4:
                raise DataError(f"{path} is too short to be an IDX file; replace it with a complete copy")
            zero, dtype, ndim = struct.unpack(">HBB", head)
            magic = struct.unpack(">I", head)[0]
            if zero != 0 or dtype != 0x08 or not 1 <= ndim <= 4:
                raise DataError(f"{path} is not a uint8 IDX file (magic number 0x{magic:08x}); "
                                "check that it is an MNIST file")
            if expect_magic is not None and magic != expect_magic:
                want = "images" if expect_magic == _IMAGES_MAGIC else "labels"
                raise DataError(
                    f"{path} has magic number 0x{magic:08x}, expected 0x{expect_magic:08x} for {want}; "
                    "the files may be swapped or of the wrong kind"
                )
            dims_raw = _read_exactly(fh, 4 * ndim)
            if len(dims_raw) < 4 * ndim:
                raise DataError(f"{path} is truncated inside its header; replace it with a complete copy")
            dims = struct.unpack(f">{ndim}I", dims_raw)
            expected = math.prod(dims)
            if expected > MAX_IDX_BYTES:
                raise DataError(f"{path} declares {expected:,} data bytes ({list(dims)}), more than any MNIST file; "
                                "it is not an MNIST file")
            body = _read_exactly(fh, expected + 1)
    except PermissionError:
        raise DataError(f"cannot read {path}: permission denied; check its permissions") from None
    except IsADirectoryError:
        raise DataError(f"{path} is a folder, not an IDX file") from None
    except (OSError, EOFError, zlib.error) as exc:  # includes gzip's "truncated" and bad-CRC errors
        raise DataError(f"cannot read {path}: {exc}; replace it with a complete copy of the IDX file") from None
    if len(body) != expected:
        held = f"{len(body):,} data bytes" if len(body) < expected else "more data bytes"
        raise DataError(
            f"{path} holds {held} than its header {list(dims)} promises ({expected:,}); "
            "the file is truncated or corrupt: replace it"
        )
    if digest is not None:
        digest.append(hashlib.sha256(head + dims_raw + body).hexdigest())
    data = torch.frombuffer(bytearray(body), dtype=torch.uint8)
    return data.view(*dims)


def _find(root: Path, stem: str) -> Path | None:
    for folder in (root, root / "MNIST" / "raw"):
        for name in (stem, stem + ".gz"):
            path = folder / name
            if path.is_file():
                return path
            if path.exists() or path.is_symlink():  # a folder, a device, a dangling link: never "download" over it
                raise DataError(f"{path} is not a file; put the IDX file {name} there")
    return None


def _where(root: Path, data_dir: str | os.PathLike | None) -> str:
    """The data folder as a message names it, with where it came from when not given."""
    if data_dir:
        return str(root)
    if os.environ.get("MNISTKIT_DATA"):
        return f"{root} (from $MNISTKIT_DATA)"
    return f"{root} (the default data folder; set data_dir or $MNISTKIT_DATA to use another)"


def _download(root: Path, where: str) -> None:
    """torchvision's MNIST download (mirrors, checksums) into ``root/MNIST/raw``."""
    created = not root.exists()
    try:
        from torchvision.datasets import MNIST

        root.mkdir(parents=True, exist_ok=True)
        with contextlib.redirect_stdout(sys.stderr):  # keep stdout clean for --json
            MNIST(str(root), train=True, download=True)
    except Exception as exc:  # network errors come in many types; all mean the same to a user
        if created:  # a failed download leaves no empty folders behind
            for folder in (root / "MNIST" / "raw", root / "MNIST", root):
                with contextlib.suppress(OSError):
                    folder.rmdir()
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"MNIST is not in {where} and could not be downloaded ({reason}); put the four IDX files "
            f"({', '.join(s + '.gz' for pair in IDX_FILES.values() for s in pair)}) in that folder, "
            "or point the data folder (data_dir, $MNISTKIT_DATA) at a folder that has them"
        ) from None


def load_mnist(split: str = "train", data_dir: str | os.PathLike | None = None, download: bool = True) -> Split:
    """Load one split of real MNIST from ``data_dir`` (IDX files directly, gzipped or not, or
    torchvision's ``MNIST/raw`` layout); download it there when absent and ``download`` is set."""
    if split not in IDX_FILES:
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    root = resolve_data_dir(data_dir)
    stems = IDX_FILES[split]
    if root.exists() and not root.is_dir():
        raise DataError(f"{_where(root, data_dir)} is not a folder; give the folder that holds the MNIST files")
    paths = [_find(root, stem) for stem in stems]
    where = _where(root, data_dir)
    if None in paths:
        if root.exists() and not root.is_dir():
            raise DataError(f"{where} is not a folder; give the folder that holds the MNIST files")
        if not download:
            missing = [s for s, p in zip(stems, paths) if p is None]
            raise DataError(f"MNIST file {missing[0]}(.gz) not found in {where}; put the IDX files there "
                            "or give another data folder")
        _download(root, where)
        paths = [_find(root, stem) for stem in stems]
        if None in paths:
            raise DataError(f"the download finished but the MNIST files are not in {root}; put them there by hand")
    digests: list[str] = []
    images = read_idx(paths[0], _IMAGES_MAGIC, digests)
    labels = read_idx(paths[1], _LABELS_MAGIC, digests)
    official = digests == [OFFICIAL_SHA256[stem] for stem in stems]
    if images.dim() != 3 or tuple(images.shape[1:]) != (28, 28):
        raise DataError(f"{paths[0]} holds images of shape {list(images.shape[1:])}, expected 28x28")
    if len(images) != len(labels):
        raise DataError(f"{paths[0]} has {len(images):,} images but {paths[1]} has {len(labels):,} labels; "
                        "the files do not belong together")
    if len(labels) and int(labels.max()) > 9:
        raise DataError(f"{paths[1]} holds labels above 9; it is not an MNIST label file")
    return Split(images, labels.long(), official)


# --------------------------------------------------------------------------- synthetic digits

SYNTHETIC_SIZES = {"train": 6000, "test": 1000}


@functools.lru_cache(maxsize=1)
def _glyphs() -> torch.Tensor:
    """Templates ``[10, V, 28, 28]`` in [0, 1]: each digit in a few sizes and stroke widths,
    from Pillow's scalable default font, centred by their centre of mass like MNIST."""
    from PIL import Image, ImageDraw, ImageFont

    variants = []
    for size in (17, 20, 23):
        try:
            font = ImageFont.load_default(size=size)
        except TypeError:  # Pillow < 10.1: a fixed bitmap font only
            font = ImageFont.load_default()
        for stroke in (0, 1):
            row = []
            for digit in range(10):
                img = Image.new("L", (56, 56))
                ImageDraw.Draw(img).text((28, 28), str(digit), fill=255, font=font, anchor="mm",
                                         stroke_width=stroke, stroke_fill=255)
                t = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(56, 56).float() / 255
                total = t.sum().clamp_min(1e-6)
                ys, xs = torch.meshgrid(torch.arange(56.0), torch.arange(56.0), indexing="ij")
                cy, cx = int(round(float((t * ys).sum() / total))), int(round(float((t * xs).sum() / total)))
                row.append(t[cy - 14:cy + 14, cx - 14:cx + 14])
            variants.append(torch.stack(row))
    return torch.stack(variants, dim=1)


def make_synthetic(split: str = "train", n: int | None = None, seed: int = 0) -> Split:
    """An MNIST-shaped dataset drawn from real digit glyphs with random affine, stroke width,
    blur and noise. Deterministic for ``(split, n, seed)``; needs no network."""
    n = SYNTHETIC_SIZES[split] if n is None else n
    g = torch.Generator().manual_seed(seed * 2 + (split == "test"))
    templates = _glyphs()  # [10, V, 28, 28]
    labels = torch.randint(0, 10, (n,), generator=g)
    variant = torch.randint(0, templates.shape[1], (n,), generator=g)
    x = templates[labels, variant].unsqueeze(1)
    angle = (torch.rand(n, generator=g) * 2 - 1) * 15
    scale = 0.85 + torch.rand(n, generator=g) * 0.25
    shear = (torch.rand(n, generator=g) * 2 - 1) * 12
    tx, ty = ((torch.rand(2, n, generator=g) * 2 - 1) * 2.5)
    x = augment_batch(x, affine_theta(angle, tx, ty, scale, shear, 28, 28), "bilinear")
    contrast = 0.7 + 0.3 * torch.rand(n, 1, 1, 1, generator=g)
    x = (x * contrast + 0.08 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    return Split((x.squeeze(1) * 255).round().to(torch.uint8), labels)


@functools.lru_cache(maxsize=2)
def _synthetic_cached(split: str) -> Split:
    return make_synthetic(split)


def _synthetic(split: str) -> Split:
    cached = _synthetic_cached(split)   # drawn once per process (a test session trains a hundred times)
    return Split(cached.images.clone(), cached.labels.clone(), cached.official)


def run_test_split(recorded: Any, dataset: str | None = None, data_dir: str | os.PathLike | None = None
                   ) -> tuple[str, Split]:
    """(dataset, test split) to measure a run on: ``dataset``/``data_dir`` where the user gives
    them, else the run's own. A data folder the run records (a received run names any path) is
    only read, never created or downloaded into, and used only where it holds the official MNIST
    files (a sender cannot choose the test set); else the user's own data folder
    ($MNISTKIT_DATA, else the cache) is used."""
    try:
        saved = DataOptions.from_dict(recorded if isinstance(recorded, dict) else {})
    except MnistkitError:
        saved = DataOptions()
    name = dataset or saved.dataset
    if data_dir is None and name == saved.dataset and saved.data_dir is not None:
        try:
            split = load_dataset(name, "test", saved.data_dir, download=False)
            if split.official:
                return name, split
        except DataError:
            pass
    return name, load_dataset(name, "test", data_dir)


def load_dataset(dataset: str, split: str, data_dir: str | os.PathLike | None = None, download: bool = True) -> Split:
    """One split of ``dataset``. The synthetic digits are one fixed set, whatever the run's seed
    (as MNIST is): two seeds are measured on the same test images."""
    if dataset == "mnist":
        return load_mnist(split, data_dir, download=download)
    if dataset == "synthetic":
        return _synthetic(split)
    raise DataError(f"unknown dataset {dataset!r}; choose one of: {', '.join(DATASETS)}")


# --------------------------------------------------------------------------- a run's splits


def load_splits(options: DataOptions) -> tuple[Split, Split | None, Split]:
    """``(train, val, test)``: the validation images (``options.val``) are held out of the
    training set first, then ``options.limit`` keeps the first images of the rest."""
    train = load_dataset(options.dataset, "train", options.data_dir)
    test = load_dataset(options.dataset, "test", options.data_dir)
    val = None
    if options.val:
        if options.val >= len(train):
            raise UsageError(f"val {options.val:,} leaves no training images: the {options.dataset} training set "
                             f"has {len(train):,}", key="val")
        train, val = hold_out(train, options.val, options.val_seed)
    if options.limit is not None:
        if options.limit > len(train):
            raise UsageError(f"limit {options.limit:,} is larger than the {options.dataset} training set "
                             f"({len(train):,} samples{' after the validation split' if val else ''}); "
                             f"use at most {len(train):,}", key="limit")
        train = train.head(options.limit)
    return train, val, test


def provenance(data: DataOptions, train: Split, val: Split | None, test: Split) -> dict[str, Any]:
    """What a run's figures were measured on, recorded in its config: the dataset, whether the
    files are the official MNIST release, and how many images each split held."""
    official = data.dataset == "mnist" and train.official and test.official
    return {"dataset": data.dataset, "official_mnist": official, "train_samples": len(train),
            "val_samples": len(val) if val is not None else 0, "test_samples": len(test),
            "full_training_set": official and data.limit is None and not data.val}



# --------------------------------------------------------------------------- batched augmentation
