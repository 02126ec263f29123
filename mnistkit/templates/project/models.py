"""Your own models: each is an nn.Module class (or a function that returns one) that maps a batch
of [B, 1, 28, 28] MNIST digits to [B, 10] class scores. Name one wherever mnistkit takes a model:

    mnistkit summary models.py:S1      (or S1: the change-log's iteration of that id)
    mnistkit train S1

A run records what S1 computes (its layers, their settings and shapes) and keeps a copy of this
file: a docstring, a comment or a new class here keeps S1's runs counting in `mnistkit compare`;
a changed layer does not (compare names it). Start S2, S3 ... as new classes (or as YAML, like s2.yaml).
"""

from torch import nn


def block(cin: int, cout: int, padding: int = 0) -> nn.Sequential:
    """3x3 convolution, BatchNorm, ReLU: the unit the iterations are built of (no conv bias:
    BatchNorm's shift does its job)."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=padding, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class S1(nn.Module):
    """Two 3x3 blocks, a 1x1 transition and max-pooling, three more blocks, a GAP head."""

    def __init__(self, width: int = 10, dropout: float = 0.05) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            block(1, w),                          # 26x26, receptive field 3
            block(w, 2 * w),                      # 24x24, 5
            nn.Conv2d(2 * w, w, 1, bias=False),   # transition: mix and narrow before pooling
            nn.MaxPool2d(2),                      # 12x12, 6
            nn.Dropout(dropout),
            block(w, 2 * w),                      # 10x10, 10
            block(2 * w, 2 * w),                  # 8x8, 14
            nn.Dropout(dropout),
            block(2 * w, 2 * w),                  # 6x6, 18
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(2 * w, 10, 1), nn.Flatten())

    def forward(self, x):
        return self.head(self.features(x))
