"""Predict a user's own digit images with a trained run: each image is prepared the way MNIST
was made (grayscale, dark background, the digit cropped, its longer side scaled to 20 pixels,
placed in a 28x28 field by its centre of mass), then normalised as the run was trained.

Every image is untrusted: bounded in bytes and pixels, decoded fully, and a file that cannot
be used is one ``ImageError`` for that file, never the end of the others.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from mnistkit.errors import MnistkitError, UsageError

MAX_FILE_BYTES = 20 << 20  # a photo of a digit is a few MB at most
MAX_PIXELS = 40_000_000  # decoded size cap (a "decompression bomb" is tiny on disk)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".pgm", ".ppm")
FIELD, BOX = 28, 20  # MNIST: the digit's longer side is 20 pixels in a 28x28 field


PREDICT_BATCH = 256   # images through the model at once

# what Pillow may decode, by content: raster formats only (PPM covers PBM and PGM). Pillow opens
# by content, not name, and would hand an EPS or PDF to Ghostscript
RASTER_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM")


class ImageError(MnistkitError):
    """An image file that cannot be read or holds no digit."""


def image_files(paths: list[str | os.PathLike]) -> list[Path]:
    """The files to predict: each path given (``~`` expanded), and the images in each folder
    given (sorted)."""
    out: list[Path] = []
    for p in (Path(q).expanduser() for q in paths):
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES and q.is_file())
            if not found:
                raise UsageError(f"{p} holds no image files ({', '.join(IMAGE_SUFFIXES[:3])}, ...)")
            out += found
        else:
            out.append(p)
    return out


def read_image(path: str | os.PathLike) -> Any:
    """Decode an image file with Pillow, bounded; returns a PIL image in mode L (grayscale) on
    a white background where it had transparency."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ImageError(f"{path} does not exist") from None
    except OSError as exc:
        raise ImageError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not path.is_file():
        raise ImageError(f"{path} is not a file")
    if size == 0:
        raise ImageError(f"{path} is empty")
    if size > MAX_FILE_BYTES:
        raise ImageError(f"{path} is {size / 2**20:.0f} MiB, more than a digit image needs "
                         f"({MAX_FILE_BYTES >> 20} MiB at most)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=RASTER_FORMATS) as img:   # never EPS (Ghostscript), PDF, ...
                if img.width * img.height > MAX_PIXELS:
                    raise ImageError(f"{path} is {img.width}x{img.height} pixels, too large for a digit image "
                                     f"({MAX_PIXELS:,} pixels at most)")
                img.load()  # decode now: a truncated file fails here, not later
                img = ImageOps.exif_transpose(img)   # a phone's orientation tag: upright, as it is shown
                if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                    rgba = img.convert("RGBA")
                    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                    return Image.alpha_composite(white, rgba).convert("L")
                if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                    return _eight_bits(img)
                return img.convert("L")
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{path} is not a {', '.join(RASTER_FORMATS[:-1])} or {RASTER_FORMATS[-1]} image (whatever "
                         "its name says); only raster images are read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{path} decodes to too many pixels; it is not a digit image") from None
    except Exception as exc:  # Pillow raises many types for a damaged or foreign file
        reason = str(exc).splitlines()[0][:100] if str(exc) else type(exc).__name__
        raise ImageError(f"{path} is not a readable image ({reason})") from None


def _eight_bits(img: Any) -> Any:
    """A 16-bit or float grayscale image in mode L: its own range (a 16-bit scan uses 0-65535, a
    float one 0-1) scaled onto 0-255, instead of Pillow's clipping at 255, which left a valid scan
    all white ("no digit found")."""
    from PIL import Image

    x = torch.frombuffer(bytearray(img.convert("F").tobytes()), dtype=torch.float32).double()
    if not bool(torch.isfinite(x).all()):
        raise ImageError(f"{getattr(img, 'filename', 'the image')} holds values that are not finite numbers")
    full = {"I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0}.get(img.mode)
    low, high = (0.0, full) if full else (float(x.min()), float(x.max()))
    scaled = ((x - low) / (high - low) * 255).round().clamp(0, 255) if high > low else torch.zeros_like(x)
    return Image.frombytes("L", img.size, bytes(scaled.to(torch.uint8).tolist()))


def preprocess(img: Any) -> torch.Tensor:
    """A grayscale PIL image -> ``[28, 28]`` float tensor in [0, 1], ink bright on black, as
    MNIST: inverted when the background is light, cropped to the ink, longer side scaled to 20
    pixels (aspect kept), centred on its centre of mass in a 28x28 field."""
    from PIL import Image

    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(img.height, img.width).float() / 255
    border = torch.cat([x[0], x[-1], x[:, 0], x[:, -1]])
    background = float(border.median())
    if background > 0.5:  # dark ink on light paper
        x, background = 1 - x, 1 - background
    ink = (x - background).clamp_min(0)
    peak = float(ink.max())
    if peak < 0.1:
        raise ImageError("no digit found: the image has no ink that stands out from its background")
    ink = ink / peak
    mask = ink > 0.25  # what counts as ink for the bounding box (ignores faint paper texture)
    rows, cols = mask.any(1).nonzero().squeeze(1), mask.any(0).nonzero().squeeze(1)
    crop = ink[int(rows[0]):int(rows[-1]) + 1, int(cols[0]):int(cols[-1]) + 1]
    h, w = crop.shape
    scale = BOX / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    pil = Image.frombytes("L", (w, h), bytes((crop * 255).round().to(torch.uint8).flatten().tolist()))
    small = pil.resize((nw, nh), Image.Resampling.LANCZOS)
    digit = torch.frombuffer(bytearray(small.tobytes()), dtype=torch.uint8).view(nh, nw).float() / 255
    total = float(digit.sum())
    if total <= 0:   # specks far apart: scaled to 20 pixels, their ink vanishes
        raise ImageError("no digit found: the ink is a few specks too small to keep once the image is scaled "
                         "to MNIST's 20 pixels")
    ys, xs = torch.arange(nh, dtype=torch.float32), torch.arange(nw, dtype=torch.float32)
    cy, cx = float((digit.sum(1) * ys).sum()) / total, float((digit.sum(0) * xs).sum()) / total
    # place so the centre of mass lands on the field's centre (pixel centres: 13.5 of 0..27)
    top = min(max(round((FIELD - 1) / 2 - cy), 0), FIELD - nh)
    left = min(max(round((FIELD - 1) / 2 - cx), 0), FIELD - nw)
    out = torch.zeros(FIELD, FIELD)
    out[top:top + nh, left:left + nw] = digit
    return out


@dataclass
class Prediction:
    path: str
    digit: int | None = None
    probability: float | None = None
    top3: list[tuple[int, float]] = field(default_factory=list)
    error: str | None = None
    pixels: torch.Tensor | None = field(default=None, repr=False)  # the 28x28 input the model saw (for --show)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "digit": self.digit, "probability": self.probability,
                "top3": [{"digit": d, "probability": p} for d, p in self.top3], "error": self.error}


@dataclass
class PredictResult:
    """The predictions, and what made them: the checkpoint, its model and epoch, and the data
    the model was trained on."""

    checkpoint: str
    model: str
    epoch: int
    trained_on: dict[str, Any]
    predictions: list[Prediction]
    best_chosen_on: str | None = None   # best.pt: "test" or "validation" chose its epoch; None otherwise

    def to_dict(self) -> dict[str, Any]:
        return {"checkpoint": self.checkpoint, "model": self.model, "epoch": self.epoch,
                "trained_on": self.trained_on, "best_chosen_on": self.best_chosen_on,
                "predictions": [p.to_dict() for p in self.predictions]}


def read_images(images: list[str | os.PathLike]) -> Iterator[tuple[str, torch.Tensor | None, str | None]]:
    """``(file, pixels, None)`` for each image file (folders expanded), prepared as MNIST was made,
    or ``(file, None, why)`` for one that cannot be used."""
    for file in image_files(list(images)):
        try:
            yield str(file), preprocess(read_image(file)), None
        except ImageError as exc:
            yield str(file), None, str(exc) if str(exc).startswith(str(file)) else f"{file}: {exc}"


def predict(target: str | os.PathLike, images: list[str | os.PathLike], device: str = "auto",
            model_code: str | os.PathLike | None = None, model: torch.nn.Module | None = None) -> PredictResult:
    """Predict every image with the checkpoint of ``target`` (a run folder or a .pt file).
    An image that cannot be used gets ``error`` set; the others are predicted."""
    from mnistkit.training.device import resolve_device
    from mnistkit.training.evaluation import best_chosen_on, checkpoint_recipe, fold_batchnorm, guarded, load_model
    from mnistkit.runs.checkpoint import load_checkpoint, resolve_checkpoint

    path = resolve_checkpoint(target)
    ckpt = load_checkpoint(path)
    recipe = checkpoint_recipe(ckpt, str(path))
    dev = resolve_device(device)
    given = model is not None   # the user's model raising is one line naming their file: guarded()
    model = fold_batchnorm(load_model(ckpt, recipe, path, model_code, model).to(dev).eval(),  # as evaluate computes it
                           recipe.channels_last)
    channels = torch.channels_last if recipe.channels_last else torch.contiguous_format

    def run(batch: list[Prediction]) -> None:
        x = torch.stack([p.pixels for p in batch]).unsqueeze(1).to(dev)
        x = ((x - recipe.mean) / recipe.std).contiguous(memory_format=channels)
        with torch.inference_mode(), guarded(ckpt, given):
            out = model(x).float()
        if out.dim() == 1 and len(batch) == 1:   # a `.squeeze()` head drops the batch of one
            out = out.unsqueeze(0)
        probs = torch.softmax(out, dim=1).cpu()
        for p, row in zip(batch, probs):
            values, digits = row.topk(3)
            p.top3 = [(int(d), float(v)) for d, v in zip(digits, values)]
            p.digit, p.probability = p.top3[0]

    results, batch = [], []
    for file, pixels, message in read_images(images):
        if pixels is None:
            results.append(Prediction(file, error=message))
            continue
        results.append(Prediction(file, pixels=pixels))
        batch.append(results[-1])
        if len(batch) == PREDICT_BATCH:   # bounded: 20,000 images in one batch took 2.4 GB
            run(batch)
            batch = []
    if batch:
        run(batch)
    trained_on = ckpt.get("measured_on") if isinstance(ckpt.get("measured_on"), dict) else {}
    return PredictResult(str(path), str(ckpt["model"]), int(ckpt["epoch"]), dict(trained_on), results,
                         best_chosen_on(ckpt))
