"""A student-style model as course notebooks write it: Conv-BatchNorm-ReLU-Dropout blocks of
10-20 channels at 28x28 with padding, a 1x1 transition with a BatchNorm not followed by a ReLU,
global average pooling and log_softmax. One of the two shapes ``throughput.py`` measures."""
import torch.nn as nn
import torch.nn.functional as F

dropout_value = 0.1


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        # input block: 28x28
        self.convblock1 = nn.Sequential(
            nn.Conv2d(1, 10, 3, padding=1, bias=False), nn.BatchNorm2d(10), nn.ReLU(), nn.Dropout(dropout_value))
        self.convblock2 = nn.Sequential(
            nn.Conv2d(10, 14, 3, padding=1, bias=False), nn.BatchNorm2d(14), nn.ReLU(), nn.Dropout(dropout_value))
        # transition block: 1x1, then max-pool to 14x14
        self.convblock3 = nn.Sequential(nn.Conv2d(14, 10, 1, bias=False), nn.BatchNorm2d(10))
        self.pool1 = nn.MaxPool2d(2, 2)
        self.convblock4 = nn.Sequential(
            nn.Conv2d(10, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.Dropout(dropout_value))
        self.convblock5 = nn.Sequential(
            nn.Conv2d(16, 20, 3, bias=False), nn.BatchNorm2d(20), nn.ReLU(), nn.Dropout(dropout_value))
        self.convblock6 = nn.Sequential(
            nn.Conv2d(20, 10, 3, bias=False), nn.BatchNorm2d(10), nn.ReLU(), nn.Dropout(dropout_value))
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.convblock7 = nn.Sequential(nn.Conv2d(10, 10, 1, bias=False))

    def forward(self, x):
        x = self.convblock2(self.convblock1(x))
        x = self.pool1(self.convblock3(x))
        x = self.convblock6(self.convblock5(self.convblock4(x)))
        x = self.convblock7(self.gap(x))
        x = x.view(-1, 10)
        return F.log_softmax(x, dim=-1)
