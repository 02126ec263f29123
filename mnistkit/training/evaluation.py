"""Evaluation: loss and accuracy of a model on a split, per-class figures, and the evaluation of
a saved checkpoint (rebuilt from the registry, weights loaded safely)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mnistkit.data.batches import EvalBatches
from mnistkit.data import run_test_split
from mnistkit.training.device import resolve_device
from mnistkit.errors import MnistkitError, RunError, UsageError
from mnistkit.usermodels.modelref import build
from mnistkit.usermodels.rebuild import check_identity, from_record
from mnistkit.recipe import Recipe, recorded_recipe
from mnistkit.runs.checkpoint import load_checkpoint, resolve_checkpoint
from mnistkit.runs.metrics import EpochMetrics

EVAL_CHUNK = 256


def _fold_pairs(model: nn.Module) -> list[tuple[str, str, str]]:
    """(Sequential path, conv child, BatchNorm child) for every Conv2d directly followed by a
    BatchNorm2d with running statistics, in a plain ``nn.Sequential``."""
    pairs = []
    for path, seq in model.named_modules():
        if type(seq) is not nn.Sequential:
            continue
        names = list(seq._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = seq._modules[a], seq._modules[b]
            if (type(conv) is nn.Conv2d and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats
                    and bn.running_mean is not None):
                pairs.append((path, a, b))
    return pairs


def channels_last_strides(t: torch.Tensor) -> bool:
    """Whether a 4-d tensor is laid out channels_last and not also in the default layout. A
    conv weight with one input channel or a 1x1 kernel passes ``is_contiguous`` for both
    layouts; its strides still say which one it was made in."""
    if t.dim() != 4:
        return False
    n, c, h, w = t.shape
    last = (h * w * c, 1, w * c, c)
    first = (c * h * w, h * w, w, 1)
    return tuple(t.stride()) == last and last != first


def trained_channels_last(model: nn.Module) -> bool:
    """Whether ``model`` was converted to channels_last: one of its 4-d parameters says so."""
    return any(channels_last_strides(p) for p in model.parameters())


def fold_batchnorm(model: nn.Module, channels_last: bool | None = None) -> nn.Module:
    """An inference copy of ``model`` in which every BatchNorm that directly follows a
    convolution in a plain ``nn.Sequential`` is folded into that convolution's weights and bias,
    with the BatchNorm's running statistics: one pass over the activations instead of two.
    ``model`` itself is not changed; a model without such pairs comes back as it is. A
    BatchNorm that applies its ReLU itself (a backend's fused block: ``includes_relu``) leaves
    its ReLU in its place. The folded convolutions keep the layout the model trained in
    (``channels_last``; by default read from the strides of the model's weights): a conv's output
    layout follows its weight's, and a model trained in the default layout may ``view`` it."""
    import copy

    from torch.nn.utils.fusion import fuse_conv_bn_eval


    pairs = _fold_pairs(model)
    if not pairs:
        return model
    if channels_last is None:
        channels_last = trained_channels_last(model)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    folded = copy.deepcopy(model).eval()
    for path, a, b in pairs:
        seq = folded.get_submodule(path)
        conv, bn = seq._modules[a], seq._modules[b]
        conv = fuse_conv_bn_eval(conv, bn)
        # exactly this layout's strides: a weight with one input channel or a 1x1 kernel is
        # "contiguous" in both, and `.to(memory_format=...)` would keep whichever it has
        conv.weight.data = torch.empty_like(conv.weight, memory_format=fmt).copy_(conv.weight.data)
        seq._modules[a] = conv
        seq._modules[b] = nn.ReLU() if getattr(bn, "includes_relu", False) else nn.Identity()
    return folded


@dataclass(frozen=True)
class SplitResult:
    """Mean loss and accuracy (percent) over ``n`` images."""

    loss: float
    acc: float
    n: int


@torch.inference_mode()
def evaluate(model: nn.Module, batches: EvalBatches, label_smoothing: float = 0.0,
             predictions: list[torch.Tensor] | None = None) -> SplitResult:
    """Mean loss and accuracy over a split; every prediction is appended to ``predictions``
    when a list is given."""
    # BatchNorm folded into the convolutions: 1.3x (I1) to 2.3x (I3) faster on CPU; the logits
    # move by rounding only (bench/fold_check.py: no test prediction changes on the trained runs)
    net = fold_batchnorm(model, batches.channels_last)
    was_training = net.training
    net.eval()
    loss_sum = torch.zeros((), device=batches.y.device)
    correct = torch.zeros((), device=batches.y.device, dtype=torch.long)
    for xb, yb in batches:
        # chunks of EVAL_CHUNK: on CPU a 1024-image batch falls out of cache and runs 2-4x slower;
        # every figure is per image, so the chunking changes no result
        for x, y in zip(xb.split(EVAL_CHUNK), yb.split(EVAL_CHUNK)):
            out = net(x)
            loss_sum += F.cross_entropy(out, y, reduction="sum", label_smoothing=label_smoothing)
            p = out.argmax(1)
            correct += (p == y).sum()
            if predictions is not None:
                predictions.append(p)
    net.train(was_training)
    n = len(batches.y)
    return SplitResult(float(loss_sum) / n, 100.0 * int(correct) / n, n)


def per_class_report(labels: torch.Tensor, predictions: torch.Tensor, classes: int = 10) -> dict[str, Any]:
    """Confusion matrix (rows: true class, columns: predicted) and per-class figures in percent
    (``None`` where a figure is undefined: a class never present or never predicted)."""
    cm = torch.bincount(labels.long() * classes + predictions.long(), minlength=classes * classes).view(classes, classes)
    tp = cm.diag().double()
    support, predicted = cm.sum(1).double(), cm.sum(0).double()

    def pct(num: float, den: float) -> float | None:
        return 100 * num / den if den > 0 else None

    return {
        "confusion_matrix": cm.tolist(),
        "per_class": [
            {"class": c, "support": int(support[c]), "accuracy": pct(float(tp[c]), float(support[c])),
             "recall": pct(float(tp[c]), float(support[c])), "precision": pct(float(tp[c]), float(predicted[c]))}
            for c in range(classes)
        ],
    }


def checkpoint_recipe(checkpoint: dict[str, Any], where: str = "checkpoint") -> Recipe:
    """The typed recipe stored in a checkpoint (defaults for keys an older one lacks)."""
    recipe = checkpoint.get("recipe") or {}
    if not isinstance(recipe, dict):
        raise RunError(f"{where} holds no readable recipe; it is not a mnistkit checkpoint")
    try:
        return recorded_recipe(recipe, where=f"{where} recipe")
    except UsageError as exc:  # a damaged file, not a bad option: exit code 1
        raise RunError(str(exc)) from None


def load_model(checkpoint: dict[str, Any], recipe: Recipe | None = None, path: str | Path | None = None,
               model_code: str | Path | None = None, model: nn.Module | None = None) -> nn.Module:
    """Rebuild the model of a checkpoint (at ``path``) and load its weights: a registered name
    from the registry, a YAML architecture from the checkpoint, the user's Python file only as
    ``rebuild.from_record`` allows (``model_code``: a file the user names and trusts); or a copy
    of ``model``, a model object the caller made (a class from a notebook cell)."""
    name = checkpoint.get("model")
    recipe = recipe or checkpoint_recipe(checkpoint)
    if model is not None:
        import copy

        model = copy.deepcopy(model)
    else:
        where = str(path.parent if path is not None and (Path(path).parent / "config.yaml").is_file() else path or "the checkpoint")
        source = from_record(checkpoint.get("model_source"), where, checkpoint.get("model_text"), model_code,
                             fallback_name=str(name), run_dir=Path(path).parent if path is not None else None)
        model, _ = build(source, recipe.model_kwargs(), check=False)
        check_identity(source, model, where)
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except (KeyError, RuntimeError, TypeError, AttributeError) as exc:
        reason = str(exc).splitlines()[0][:150] if str(exc) else type(exc).__name__
        raise RunError(f"the checkpoint's weights do not fit model {name} ({reason})") from None
    if recipe.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


@dataclass(frozen=True)
class EvaluationReport:
    checkpoint: str
    model: str
    epoch: int | None
    dataset: str
    samples: int
    test_loss: float
    test_acc: float
    recorded_test_acc: float | None
    confusion_matrix: list[list[int]]
    per_class: list[dict[str, Any]]
    mistakes: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # most confident first
    # uint8 [M, 28, 28] in the order of ``mistakes`` (not in JSON; not in the repr a notebook shows)
    mistake_images: Any = dataclasses.field(default=None, repr=False)
    best_chosen_on: str | None = None  # best.pt: "test" or "validation" chose its epoch; None otherwise

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "mistake_images"}
        return out


def best_chosen_on(checkpoint: dict[str, Any]) -> str | None:
    """For a ``best.pt`` (a run writes it without the state to resume: no ``optimizer``), the
    split that chose its epoch: ``"test"`` (then its test accuracy is optimistic: the figure
    that chose it) or ``"validation"``; ``None`` for ``last.pt`` or a checkpoint without metrics."""
    from mnistkit.runs.metrics import selected_on

    rows = []
    for raw in checkpoint.get("metrics") or []:
        try:
            rows.append(EpochMetrics.from_dict(raw))
        except MnistkitError:
            return None
    if "optimizer" in checkpoint or not rows:
        return None
    return selected_on(rows)


def guarded(checkpoint: dict[str, Any], given: bool = False) -> Any:
    """Where a checkpoint's model runs: an exception of the user's own model (a file's, a
    module's, or a model object the caller gave: ``given``) is one line naming their file and line."""
    import contextlib

    from mnistkit.usermodels.usercode import user_code

    record = checkpoint.get("model_source")
    kind = record.get("kind") if isinstance(record, dict) else None
    if not given and kind not in ("file", "module", "instance"):
        return contextlib.nullcontext()
    return user_code(None, f"running {checkpoint.get('model')}")


def evaluate_checkpoint(target: str | Path, dataset: str | None = None, data_dir: str | None = None,
                        device: str = "auto", batch_size: int | None = None,
                        model_code: str | Path | None = None, model: nn.Module | None = None) -> EvaluationReport:
    """Test loss/accuracy, per-class figures and confusion matrix of a run or checkpoint. The
    data is the run's own (its dataset and data folder) unless ``dataset``/``data_dir`` say
    otherwise. ``model``: a model object of the run's architecture to load its weights into (a
    copy), for a class defined in a notebook or a script."""
    path = resolve_checkpoint(target)
    ckpt = load_checkpoint(path)
    recipe = checkpoint_recipe(ckpt, str(path))
    dev = resolve_device(device)
    given = model is not None   # the user's model raising is one line naming their file: guarded()
    model = load_model(ckpt, recipe, path, model_code, model).to(dev)
    name, test = run_test_split(ckpt.get("data"), dataset, data_dir)
    batches = EvalBatches(test, batch_size or recipe.test_batch_size, dev, recipe.mean, recipe.std,
                          channels_last=recipe.channels_last)
    preds: list[torch.Tensor] = []
    with guarded(ckpt, given):
        result = evaluate(model, batches, recipe.label_smoothing, predictions=preds)  # the loss as the run recorded it
    predicted = torch.cat(preds).cpu()
    report = per_class_report(test.labels, predicted)
    wrong = (predicted != test.labels).nonzero().squeeze(1)
    with torch.inference_mode(), guarded(ckpt, given):
        model.eval()
        probs = torch.softmax(model(batches.x[wrong.to(dev)]).float(), 1).cpu() if len(wrong) else torch.zeros(0, 10)
    confidence = probs.gather(1, predicted[wrong].unsqueeze(1)).squeeze(1) if len(wrong) else torch.zeros(0)
    order = confidence.argsort(descending=True, stable=True)
    mistakes = [{"index": int(wrong[i]), "label": int(test.labels[wrong[i]]), "predicted": int(predicted[wrong[i]]),
                 "probability": float(confidence[i])} for i in order]
    recorded = None
    for raw in ckpt.get("metrics") or []:
        try:
            row = EpochMetrics.from_dict(raw)
        except MnistkitError:
            continue
        if row.epoch == ckpt.get("epoch"):
            recorded = row.test_acc
    return EvaluationReport(str(path), str(ckpt.get("model")), ckpt.get("epoch"), name, result.n,
                            result.loss, result.acc, recorded, report["confusion_matrix"], report["per_class"],
                            mistakes, test.images[wrong[order]] if len(wrong) else test.images[:0],
                            best_chosen_on(ckpt))
