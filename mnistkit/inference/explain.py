"""What the model sees: for each digit image (read and prepared exactly as ``predict`` prepares
it), the prediction, the feature maps of every convolution and a class-activation map (Grad-CAM
on the last convolution whose output still has a spatial map, for the predicted class).

The model is rebuilt as ``predict`` rebuilds it (``evaluation.load_model``: a registered name, a
YAML architecture, the user's file as ``rebuild.from_record`` allows, or a copy of a model
object) and runs in eval mode; nothing of the run is written. Convolutions are found with
forward hooks on every ``nn.Conv2d`` module; a convolution called as ``F.conv2d`` inside a
``forward`` is not a module, has no hook and is not shown (``Explanation`` says how many ran).
BatchNorm is not folded into the convolutions here (``predict`` folds it for speed): a map is
what the convolution the user wrote computes; the probabilities agree up to rounding.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_CHANNELS = 8


@dataclass
class ConvMaps:
    """One convolution's output for one image: ``maps`` holds its first channels, ``[n, H, W]``."""

    name: str            # the module's path in the model, e.g. ``features.0`` (``#2`` for a second call)
    channels: int        # how many channels the convolution has (``maps`` holds the first few)
    height: int
    width: int
    maps: torch.Tensor

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": [self.channels, self.height, self.width], "shown": len(self.maps)}


@dataclass
class Explanation:
    """One image: what the model saw, its prediction, the maps and the class-activation map
    (``cam``: ``[28, 28]``, non-negative, in the units of the layer's activations times their
    gradients; ``None`` where the model has no convolution with a spatial map)."""

    path: str
    digit: int | None = None
    probability: float | None = None
    top3: list[tuple[int, float]] = field(default_factory=list)
    error: str | None = None
    pixels: torch.Tensor | None = None
    layers: list[ConvMaps] = field(default_factory=list)
    cam: torch.Tensor | None = None
    cam_layer: str | None = None
    functional_convs: int = 0   # F.conv2d calls outside nn.Conv2d modules: not shown

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "digit": self.digit, "probability": self.probability,
                "top3": [{"digit": d, "probability": p} for d, p in self.top3], "error": self.error,
                "layers": [m.to_dict() for m in self.layers], "cam_layer": self.cam_layer,
                "cam_shape": list(self.cam.shape) if self.cam is not None else None,
                "cam_max": float(self.cam.max()) if self.cam is not None else None,
                "functional_convs_not_shown": self.functional_convs}


@dataclass
class ExplainResult:
    checkpoint: str
    model: str
    epoch: int
    trained_on: dict[str, Any]
    best_chosen_on: str | None
    seed: int
    channels: int
    explanations: list[Explanation]
    inputs: str = "as predict prepares it"   # how the pixels were made (the picture says it)

    def to_dict(self) -> dict[str, Any]:
        return {"checkpoint": self.checkpoint, "model": self.model, "epoch": self.epoch, "seed": self.seed,
                "trained_on": self.trained_on, "best_chosen_on": self.best_chosen_on, "channels": self.channels,
                "inputs": self.inputs,
                "cam": "Grad-CAM for the predicted class on the last convolution with a spatial map",
                "images": [e.to_dict() for e in self.explanations]}


class _Recorder:
    """Forward hooks on every ``nn.Conv2d``: each call's output, kept in the graph for Grad-CAM.
    The hook hands the model a copy, so an in-place op after the conv (``ReLU(inplace=True)``)
    changes the copy, not the map recorded."""

    def __init__(self, model: nn.Module) -> None:
        self.outputs: list[tuple[str, torch.Tensor]] = []
        self.inside = 0
        self.functional = 0
        self.handles = []
        for name, module in model.named_modules():
            if isinstance(module, nn.Conv2d):
                self.handles.append(module.register_forward_pre_hook(self._enter))
                self.handles.append(module.register_forward_hook(self._hook(name or type(module).__name__)))

    def _enter(self, module: nn.Module, args: Any) -> None:
        self.inside += 1

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any, out: Any) -> Any:
            self.inside -= 1
            if not isinstance(out, torch.Tensor) or out.dim() not in (3, 4):
                return None
            calls = sum(1 for n, _ in self.outputs if n == name or n.startswith(name + "#"))
            self.outputs.append((name if not calls else f"{name}#{calls + 1}", out))
            return out.clone()
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _count_functional(recorder: _Recorder) -> Any:
    """A torch-function mode that counts ``F.conv2d`` calls made outside an ``nn.Conv2d``."""
    from torch.overrides import TorchFunctionMode

    class Count(TorchFunctionMode):
        def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            if func in (F.conv2d, torch.conv2d) and recorder.inside == 0:
                recorder.functional += 1
            return func(*args, **(kwargs or {}))

    return Count()


def explain_pixels(model: nn.Module, x: torch.Tensor, channels: int = DEFAULT_CHANNELS) -> dict[str, Any]:
    """Run ``model`` (eval mode, gradients on) on one normalised input ``x`` ``[1, 1, H, W]``:
    the probabilities, each convolution's first ``channels`` maps and the Grad-CAM map for the
    predicted class, upsampled to ``H x W``."""
    recorder = _Recorder(model)
    try:
        with torch.enable_grad(), _count_functional(recorder):
            out = model(x)
            if out.dim() == 1:   # a `.squeeze()` head drops the batch of one
                out = out.unsqueeze(0)
            probs = torch.softmax(out.detach().float(), dim=1)[0].cpu()
            digit = int(probs.argmax())
            spatial = [(n, a) for n, a in recorder.outputs if a.dim() == 4 and a.shape[-1] * a.shape[-2] > 1]
            cam, cam_layer = None, None
            if spatial and out.requires_grad:
                cam_layer, act = spatial[-1]
                # the score of the predicted class as the model outputs it (a logit, or a
                # log-probability for a log_softmax head: the same ranking, the same sign)
                (grad,) = torch.autograd.grad(out[0, digit], act, allow_unused=True)
                if grad is not None:
                    weights = grad.float().mean(dim=(2, 3), keepdim=True)
                    raw = F.relu((weights * act.detach().float()).sum(dim=1, keepdim=True))
                    cam = F.interpolate(raw, size=tuple(x.shape[-2:]), mode="bilinear",
                                        align_corners=False)[0, 0].clamp_min(0).cpu()
                else:
                    cam_layer = None
        layers = []
        for name, a in recorder.outputs:
            a = a.detach().float().cpu()
            a = a[0] if a.dim() == 4 else a
            layers.append(ConvMaps(name, a.shape[0], a.shape[1], a.shape[2], a[:channels].contiguous()))
    finally:
        recorder.close()
    values, digits = probs.topk(min(3, len(probs)))
    return {"digit": digit, "probability": float(probs[digit]),
            "top3": [(int(d), float(v)) for d, v in zip(digits, values)], "layers": layers,
            "cam": cam, "cam_layer": cam_layer, "functional_convs": recorder.functional}


def _loaded(target: str | os.PathLike, channels: int, device: str, model_code: Any, model: nn.Module | None) -> Any:
    """The checkpoint, its recipe, the model (a fresh copy in eval mode) and the device."""
    from mnistkit.runs.checkpoint import load_checkpoint, resolve_checkpoint
    from mnistkit.training.device import resolve_device
    from mnistkit.errors import UsageError
    from mnistkit.training.evaluation import checkpoint_recipe, load_model

    if not isinstance(channels, int) or isinstance(channels, bool) or not 1 <= channels <= 1024:
        raise UsageError(f"channels must be a whole number from 1 to 1024, not {channels!r}", key="channels")
    path = resolve_checkpoint(target)
    ckpt = load_checkpoint(path)
    recipe = checkpoint_recipe(ckpt, str(path))
    dev = resolve_device(device)
    net = load_model(ckpt, recipe, path, model_code, model).to(dev).eval()   # a fresh copy: the run is only read
    return path, ckpt, recipe, net, dev


def _one(ckpt: dict[str, Any], recipe: Any, net: nn.Module, dev: Any, name: str, pixels: torch.Tensor,
         channels: int, given: bool) -> Explanation:
    from mnistkit.training.evaluation import guarded

    layout = torch.channels_last if recipe.channels_last else torch.contiguous_format
    x = ((pixels.view(1, 1, *pixels.shape).to(dev) - recipe.mean) / recipe.std).contiguous(memory_format=layout)
    with guarded(ckpt, given):
        found = explain_pixels(net, x, channels)
    return Explanation(name, pixels=pixels, **found)


def _result(path: Any, ckpt: dict[str, Any], recipe: Any, channels: int, out: list[Explanation],
            inputs: str = "as predict prepares it") -> ExplainResult:
    from mnistkit.training.evaluation import best_chosen_on

    trained_on = ckpt.get("measured_on") if isinstance(ckpt.get("measured_on"), dict) else {}
    return ExplainResult(str(path), str(ckpt["model"]), int(ckpt["epoch"]), dict(trained_on),
                         best_chosen_on(ckpt), recipe.seed, channels, out, inputs)


def explain(target: str | os.PathLike, images: list[str | os.PathLike], channels: int = DEFAULT_CHANNELS,
            device: str = "auto", model_code: str | os.PathLike | None = None,
            model: nn.Module | None = None) -> ExplainResult:
    """Explain every image with the checkpoint of ``target`` (a run folder or a .pt file), one
    image at a time. An image that cannot be used gets ``error`` set; the others are explained.
    ``model``: a model object of the run's architecture (a copy gets the weights), as ``predict``."""
    from mnistkit.inference.predict import read_images

    path, ckpt, recipe, net, dev = _loaded(target, channels, device, model_code, model)
    out: list[Explanation] = []
    for file, pixels, message in read_images(images):
        out.append(Explanation(file, error=message) if pixels is None else
                   _one(ckpt, recipe, net, dev, file, pixels, channels, model is not None))
    return _result(path, ckpt, recipe, channels, out)


def explain_digits(target: str | os.PathLike, digits: torch.Tensor, names: list[str] | None = None,
                   channels: int = DEFAULT_CHANNELS, device: str = "cpu", model_code: Any = None,
                   model: nn.Module | None = None) -> ExplainResult:
    """The same for digits already in MNIST's form (``[N, 28, 28]``, uint8 0-255 or floats in
    [0, 1]: test images, the report's mistakes); nothing is read from files or re-prepared."""
    path, ckpt, recipe, net, dev = _loaded(target, channels, device, model_code, model)
    digits = digits.float() / 255 if not digits.is_floating_point() else digits.float()
    names = names or [f"digit {i}" for i in range(len(digits))]
    out = [_one(ckpt, recipe, net, dev, n, d, channels, model is not None) for n, d in zip(names, digits)]
    return _result(path, ckpt, recipe, channels, out, "as stored, not re-prepared")
