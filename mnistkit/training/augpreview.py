"""What the augmentation does to the digits a run trains on: the first batch of the first epoch,
drawn by the trainer's own ``batches.TrainBatches`` for the recipe and seed (the same split, the
same generator seeded the same way, the same ``augment`` code), so the picture shows what trains.
The digits before augmentation are the same batch drawn with augmentation off: the permutation
is the generator's first draw, so the same seed picks the same digits in the same order.
``mnistkit augment`` draws it (``render.augment_png``); ``--json`` gives the drawn parameters."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from mnistkit.errors import UsageError
from mnistkit.recipe import DataOptions, Recipe

__all__ = ["AugmentPreview", "augment_preview", "trainer_batches", "MAX_COUNT"]

MAX_COUNT = 256   # digits in one picture (and at most one batch: the first batch is what is shown)


@dataclass(frozen=True)
class AugmentPreview:
    model: str                 # the iteration (or model reference) whose recipe this is
    recipe: Recipe
    data: DataOptions
    device: str
    train_samples: int
    images: Any                # torch [n, 1, 28, 28]: the first batch's first n images, normalised, as trained
    originals: Any             # torch [n, 1, 28, 28] in [0, 1]: the same digits before augmentation
    labels: tuple[int, ...]
    params: tuple[dict[str, float], ...]   # per image: angle, translate_x, translate_y, scale, shear

    @property
    def settings(self) -> str:
        """The augmentation as the recipe sets it, in one line."""
        a = self.recipe.augment
        if not a.enabled:
            return "augmentation off (augment.enabled: false)"
        return (f"degrees ±{a.degrees:g}, translate ±{a.translate:g} (±{a.translate * 28:.1f} px, rounded), "
                f"scale {a.scale_min:g}-{a.scale_max:g}, shear none, {a.interpolation}")

    @property
    def provenance(self) -> str:
        what = f"{self.data.dataset} training set ({self.train_samples:,} images)"
        return (f"epoch 1, batch 1 of seed {self.recipe.seed} on the {what}, device {self.device}: "
                f"the first {len(self.labels)} of its {self.recipe.batch_size} digits")

    def to_dict(self) -> dict[str, Any]:
        a = self.recipe.augment
        return {"model": self.model, "seed": self.recipe.seed, "batch_size": self.recipe.batch_size,
                "epoch": 1, "batch": 1, "device": self.device, "dataset": self.data.dataset,
                "train_samples": self.train_samples,
                "augment": {"degrees": a.degrees, "translate": a.translate, "scale_min": a.scale_min,
                            "scale_max": a.scale_max, "shear": 0.0, "interpolation": a.interpolation,
                            "enabled": a.enabled},
                "images": [{"position": i, "label": label, **params}
                           for i, (label, params) in enumerate(zip(self.labels, self.params))]}


def trainer_batches(recipe: Recipe, split: Any, device: Any) -> Any:
    """``TrainBatches`` as ``session.Session.build`` makes them for ``recipe``: over the training
    split (``data.load_splits``: validation held out, limit applied), with a generator on
    ``device`` seeded with the recipe's seed."""
    import torch

    from mnistkit.data.batches import TrainBatches

    generator = torch.Generator(device=device).manual_seed(recipe.seed)
    return TrainBatches(split, recipe.batch_size, device, recipe.augment, generator, recipe.mean, recipe.std)


def augment_preview(model: str = "", recipe: Recipe | None = None, data: DataOptions | None = None,
                    device: str = "cpu", count: int = 32) -> AugmentPreview:
    """The first ``count`` digits of the first training batch ``recipe`` draws on ``data``
    (``recipe``: e.g. ``experiments.resolve_recipe("I3")``; ``model`` only names it)."""
    import torch

    from mnistkit.data.augment import recording
    from mnistkit.data import load_splits
    from mnistkit.training.device import resolve_device

    recipe, data = recipe or Recipe(), data or DataOptions()
    if not 1 <= count <= MAX_COUNT:
        raise UsageError(f"count must be 1 to {MAX_COUNT}, not {count}", key="count")
    dev = resolve_device(device)
    split = load_splits(data)[0]
    with recording() as drawn:
        x, y = next(iter(trainer_batches(recipe, split, dev)))
    n = min(count, len(y))
    plain = trainer_batches(recipe.replace(augment=replace(recipe.augment, enabled=False)), split, dev)
    x0, y0 = next(iter(plain))
    if not torch.equal(y0, y):   # the permutation is the generator's first draw: the same digits
        raise RuntimeError("the batch without augmentation holds other digits: batches.py changed its draws")
    params = drawn[0].per_image()[:n] if drawn else [
        {"angle": 0.0, "translate_x": 0, "translate_y": 0, "scale": 1.0, "shear": 0.0}] * n
    originals = (x0[:n] * recipe.std + recipe.mean).clamp_(0, 1)
    return AugmentPreview(model or "the default recipe", recipe, data, str(dev), len(split), x[:n].cpu(),
                          originals.cpu(), tuple(int(v) for v in y[:n].tolist()), tuple(params))
