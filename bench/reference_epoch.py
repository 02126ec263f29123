"""The reference pipeline as a whole process: what a notebook-style script does for one epoch.

    python bench/reference_epoch.py ROOT MODEL [--workers 2] [--epochs 1]

ROOT holds torchvision's ``MNIST/raw`` layout (``bench/throughput.py`` makes it). Imports
torch and torchvision, builds ``datasets.MNIST`` + ``DataLoader(batch_size=256, shuffle=True,
num_workers=2)`` with ``RandomAffine(10, translate=(0.05, 0.05), scale=(0.98, 1.02))``, trains
with SGD (momentum 0.9) + OneCycleLR (max 0.2) reading ``loss.item()`` every step, then
evaluates the test set (batch 1024) and prints its accuracy. Only the model comes from
mnistkit's registry (``mnistkit.models`` imports torch alone), or, for ``FILE.py:Name``, from the
file as a notebook's own cell would define it, so the two pipelines train the same network. ``bench/throughput.py --whole-process`` times this script against
``mnistkit train MODEL --epochs 1`` from process start to exit.
"""

import argparse
import importlib.util

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from mnistkit.models import get_model

ap = argparse.ArgumentParser()
ap.add_argument("root")
ap.add_argument("model")
ap.add_argument("--workers", type=int, default=2)
ap.add_argument("--epochs", type=int, default=1)
ap.add_argument("--limit", type=int, default=None)
args = ap.parse_args()

torch.manual_seed(42)
norm = transforms.Normalize((0.1307,), (0.3081,))
train_tf = transforms.Compose([transforms.RandomAffine(10, translate=(0.05, 0.05), scale=(0.98, 1.02)),
                               transforms.ToTensor(), norm])
train_set = datasets.MNIST(args.root, train=True, download=False, transform=train_tf)
test_set = datasets.MNIST(args.root, train=False, download=False, transform=transforms.Compose([transforms.ToTensor(), norm]))
if args.limit:
    train_set = torch.utils.data.Subset(train_set, range(min(args.limit, len(train_set))))
train_loader = DataLoader(train_set, batch_size=256, shuffle=True, num_workers=args.workers)
test_loader = DataLoader(test_set, batch_size=1024, num_workers=args.workers)
if ".py:" in args.model:   # a model of the user's own: the class from its file
    path, name = args.model.rsplit(":", 1)
    spec = importlib.util.spec_from_file_location("user_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = getattr(module, name)()
else:
    model = get_model(args.model)
opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.2, epochs=args.epochs, steps_per_epoch=len(train_loader),
                                            pct_start=0.2, div_factor=10, final_div_factor=100)
for epoch in range(args.epochs):
    model.train()
    running = 0.0
    for x, y in train_loader:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        running += loss.item()
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in test_loader:
            correct += (model(x).argmax(1) == y).sum().item()
    print(f"epoch {epoch + 1}: train loss {running / len(train_loader):.4f}, "
          f"test acc {100 * correct / len(test_set):.2f}%")
