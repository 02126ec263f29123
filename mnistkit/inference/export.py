"""Export a trained run for use without mnistkit: ONNX (checked against PyTorch on the whole
test set with ONNX Runtime) and safetensors (weights without pickle, with the model name and
recipe in the metadata, so ``mnistkit.get_model`` can rebuild it). Both libraries are the
optional extra ``mnistkit[export]``."""

from __future__ import annotations

import io
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mnistkit.errors import MnistkitError

FORMATS = ("onnx", "safetensors")
LOGIT_TOLERANCE = 1e-4


def _need(module: str, package: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MnistkitError(f"exporting needs {package}, which is not installed; install it with "
                            f"pip install 'mnistkit[export]' (or pip install {package})") from None


@dataclass(frozen=True)
class ParityCheck:
    """ONNX Runtime's outputs beside PyTorch's on a test set."""

    dataset: str
    images: int
    same_predictions: int
    max_abs_logit_difference: float   # infinite where either side's logits are not finite
    tolerance: float = LOGIT_TOLERANCE
    finite: bool = True   # every logit of both sides a finite number

    @property
    def passed(self) -> bool:
        return self.finite and self.same_predictions == self.images and self.max_abs_logit_difference <= self.tolerance

    def to_dict(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "images": self.images, "same_predictions": self.same_predictions,
                "max_abs_logit_difference": self.max_abs_logit_difference, "tolerance": self.tolerance,
                "finite": self.finite, "passed": self.passed}


@dataclass(frozen=True)
class ExportResult:
    path: str
    format: str
    model: str
    checkpoint: str
    bytes: int
    check: ParityCheck | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "format": self.format, "model": self.model, "checkpoint": self.checkpoint,
                "bytes": self.bytes, "check": self.check.to_dict() if self.check else None}


def _load(target: str | os.PathLike, model_code: str | os.PathLike | None = None,
          model: torch.nn.Module | None = None) -> tuple[Path, dict[str, Any], Any, torch.nn.Module]:
    from mnistkit.training.evaluation import checkpoint_recipe, load_model
    from mnistkit.runs.checkpoint import load_checkpoint, resolve_checkpoint

    path = resolve_checkpoint(target)
    ckpt = load_checkpoint(path)
    recipe = checkpoint_recipe(ckpt, str(path))
    model = load_model(ckpt, recipe.replace(channels_last=False), path, model_code, model).eval()
    return path, ckpt, recipe, model


def onnx_bytes(model: torch.nn.Module) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript-based exporter warns about its own future
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 1, 28, 28),), buffer, dynamo=False, input_names=["images"],
                          output_names=["logits"], dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
    return buffer.getvalue()


def onnx_parity(data: bytes, model: torch.nn.Module, images: torch.Tensor, dataset: str) -> ParityCheck:
    """Run ``images`` (normalised ``[N, 1, 28, 28]``) through ONNX Runtime and PyTorch (fp32)."""
    ort = _need("onnxruntime", "onnxruntime")
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    same, worst, finite = 0, 0.0, True
    with torch.inference_mode():
        for chunk in images.split(1000):
            theirs = torch.from_numpy(session.run(["logits"], {"images": chunk.numpy()})[0])
            ours = model(chunk).float()
            same += int((theirs.argmax(1) == ours.argmax(1)).sum())
            finite = finite and bool(torch.isfinite(theirs).all() and torch.isfinite(ours).all())
            # NaN compares false with everything: max(worst, nan) would keep worst
            worst = max(worst, float((theirs - ours).abs().nan_to_num(float("inf")).max()))
    return ParityCheck(dataset, len(images), same, worst, finite=finite)


def export(target: str | os.PathLike, fmt: str, output: str | os.PathLike | None = None, check: bool = True,
           data_dir: str | None = None, model_code: str | os.PathLike | None = None,
           model: torch.nn.Module | None = None) -> ExportResult:
    """Write the checkpoint of ``target`` as ``fmt`` (onnx or safetensors) to ``output``
    (default: beside the checkpoint, ``model.onnx`` / ``model.safetensors``). An ONNX file is
    checked on the run's own test set unless ``check`` is off."""
    from mnistkit.training.evaluation import guarded
    from mnistkit.files.outputs import check_output_path, write_output

    if fmt not in FORMATS:
        from mnistkit.errors import UsageError

        raise UsageError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    given = model is not None   # the user's model raising is one line naming their file: guarded()
    path, ckpt, recipe, model = _load(target, model_code, model)

    out = Path(output) if output else path.parent / f"model.{fmt}"
    check_output_path(out, inputs=(path,))
    parity = None
    if fmt == "onnx":
        _need("onnx", "onnx")
        with guarded(ckpt, given):
            data = onnx_bytes(model)
        if check:
            from mnistkit.data import run_test_split

            dataset, test = run_test_split(ckpt.get("data"), data_dir=data_dir)
            x = (test.images.unsqueeze(1).float() / 255 - recipe.mean) / recipe.std
            with guarded(ckpt, given):
                parity = onnx_parity(data, model, x, dataset)
            if not parity.finite:
                raise MnistkitError(f"{path}'s model gives logits that are not finite numbers (NaN or infinite "
                                    "weights?), so no export can agree with it; nothing was written")
            if not parity.passed:  # never leave a file that disagrees with the model
                raise MnistkitError(
                    f"the ONNX export disagrees with PyTorch: {parity.same_predictions:,} of {parity.images:,} "
                    f"predictions agree, max |logit difference| {parity.max_abs_logit_difference:.2e} "
                    f"(tolerance {LOGIT_TOLERANCE:g}); nothing was written")
    else:
        st = _need("safetensors.torch", "safetensors")
        source = {"model_source": json.dumps(ckpt["model_source"])} if ckpt.get("model_source") else {}
        text = {"model_text": ckpt["model_text"]} if isinstance(ckpt.get("model_text"), str) else {}
        metadata = {"format": "mnistkit-safetensors", "mnistkit_model": str(ckpt["model"]), **source, **text,
                    "epoch": str(ckpt.get("epoch")), "recipe": json.dumps(recipe.to_dict()),
                    "mean": repr(recipe.mean), "std": repr(recipe.std)}
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        data = st.save(state, metadata=metadata)
    write_output(out, data)
    return ExportResult(str(out), fmt, str(ckpt["model"]), str(path), len(data), parity)


def load_safetensors(path: str | os.PathLike, model_code: str | os.PathLike | None = None) -> torch.nn.Module:
    """Rebuild a model from an exported ``.safetensors`` file, without pickle (a Python model of
    the user's own as ``rebuild.from_record`` allows)."""
    from mnistkit.usermodels.modelref import build
    from mnistkit.usermodels.rebuild import from_record
    from mnistkit.recipe import Recipe

    st = _need("safetensors", "safetensors")
    try:
        with st.safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            state = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:
        raise MnistkitError(f"{path} is not a readable safetensors file ({type(exc).__name__})") from None
    if meta.get("format") != "mnistkit-safetensors":
        raise MnistkitError(f"{path} was not exported by mnistkit (no model name in its metadata)")
    recipe = Recipe.from_dict(json.loads(meta["recipe"]))
    try:
        record = json.loads(meta["model_source"]) if "model_source" in meta else None
    except ValueError:
        raise MnistkitError(f"{path}: its model_source metadata is not JSON; the file is damaged") from None
    source = from_record(record, str(path), meta.get("model_text"), model_code, fallback_name=meta["mnistkit_model"])
    model, _ = build(source, recipe.model_kwargs(), check=False)
    model.load_state_dict(state)
    return model.eval()
