"""A student-style model as course notebooks write it: ReLU before BatchNorm, ``F.relu`` in
``forward``, Dropout after every layer, two max-pools, a 1x1 head and log_softmax. One of the two
shapes ``throughput.py`` measures."""
import torch.nn as nn
import torch.nn.functional as F


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)      # 28
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 10, 3, padding=1)     # 28
        self.bn2 = nn.BatchNorm2d(10)
        self.pool = nn.MaxPool2d(2, 2)                  # 14
        self.conv3 = nn.Conv2d(10, 16, 3, padding=1)    # 14
        self.bn3 = nn.BatchNorm2d(16)
        self.conv4 = nn.Conv2d(16, 16, 3)               # 12, pooled to 6
        self.bn4 = nn.BatchNorm2d(16)
        self.conv5 = nn.Conv2d(16, 10, 3)               # 4
        self.bn5 = nn.BatchNorm2d(10)
        self.conv6 = nn.Conv2d(10, 10, 4)               # 1
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        x = self.drop(self.bn1(F.relu(self.conv1(x))))
        x = self.drop(self.bn2(F.relu(self.conv2(x))))
        x = self.pool(x)
        x = self.drop(self.bn3(F.relu(self.conv3(x))))
        x = self.drop(self.bn4(F.relu(self.conv4(x))))
        x = self.pool(x)
        x = self.drop(self.bn5(F.relu(self.conv5(x))))
        x = self.conv6(x)
        x = x.view(-1, 10)
        return F.log_softmax(x, dim=1)
