"""The on-device batch pipeline: the dataset held as one tensor, augmentation done for a whole
batch at once (one affine grid per batch), training and evaluation batches without a DataLoader."""

from __future__ import annotations

import math
from typing import Iterator

import torch

from mnistkit.data.augment import augment_batch, sample_affine
from mnistkit.data import Split
from mnistkit.recipe import MEAN, STD, Augment


class TrainBatches:
    """Shuffled, augmented, normalised training batches from a dataset held on ``device``.

    One permutation per epoch and one warp per batch, both drawn from ``generator``, so a
    seed fixes every batch; its state is part of a resumable checkpoint.
    """

    def __init__(self, split: Split, batch_size: int, device: torch.device, augment: Augment,
                 generator: torch.Generator, mean: float = MEAN, std: float = STD) -> None:
        self.x = split.images.to(device).unsqueeze(1).float().div_(255)
        self.y = split.labels.to(device)
        self.batch_size, self.augment, self.generator = batch_size, augment, generator
        self.mean, self.std = mean, std

    def __len__(self) -> int:
        return math.ceil(len(self.y) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n, device = len(self.y), self.y.device
        perm = torch.randperm(n, generator=self.generator, device=device)
        for start in range(0, n, self.batch_size):
            idx = perm[start:start + self.batch_size]
            xb = self.x[idx]
            if self.augment.enabled:
                theta = sample_affine(len(idx), self.augment, xb.shape[-1], self.generator, device)
                xb = augment_batch(xb, theta, self.augment.interpolation)
            yield xb.sub_(self.mean).div_(self.std), self.y[idx]


class EvalBatches:
    """Normalised, unshuffled batches for evaluation; normalised once, up front."""

    def __init__(self, split: Split, batch_size: int, device: torch.device,
                 mean: float = MEAN, std: float = STD, channels_last: bool = False) -> None:
        self.x = split.images.to(device).unsqueeze(1).float().div_(255).sub_(mean).div_(std)
        self.channels_last = channels_last   # the layout the model trained in: evaluation keeps it
        if channels_last:
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.y = split.labels.to(device)
        self.batch_size = batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.y) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self.y), self.batch_size):
            yield self.x[start:start + self.batch_size], self.y[start:start + self.batch_size]
