"""Shared pieces of the evidence scripts: small CNNs, a training loop, JSON/PNG output."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

OUT = Path(__file__).resolve().parent / "results"


def norm_layer(kind: str, c: int) -> nn.Module:
    if kind == "gn":
        return nn.GroupNorm(min(8, c), c)
    return nn.BatchNorm2d(c)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = norm_layer(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = norm_layer(norm, cout)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm_layer(norm, cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.short is None else self.short(x)))


class SmallResNet(nn.Module):
    """A CIFAR-style ResNet (3 stages of 2 blocks: 16, 32, 64 channels) for 32x32 inputs."""

    def __init__(self, num_classes: int = 10, norm: str = "bn", width: int = 16) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, 1, 1, bias=False), norm_layer(norm, w), nn.ReLU())
        self.layers = nn.Sequential(BasicBlock(w, w, 1, norm), BasicBlock(w, w, 1, norm),
                                    BasicBlock(w, 2 * w, 2, norm), BasicBlock(2 * w, 2 * w, 1, norm),
                                    BasicBlock(2 * w, 4 * w, 2, norm), BasicBlock(4 * w, 4 * w, 1, norm))
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x):
        return self.fc(self.layers(self.stem(x)).mean((2, 3)))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int = 4) -> None:
        super().__init__()
        h = cin * expand
        self.body = nn.Sequential(
            nn.Conv2d(cin, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU6(),
            nn.Conv2d(h, h, 3, stride, 1, groups=h, bias=False), nn.BatchNorm2d(h), nn.ReLU6(),
            nn.Conv2d(h, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.res = stride == 1 and cin == cout

    def forward(self, x):
        y = self.body(x)
        return x + y if self.res else y


class SmallMobileNet(nn.Module):
    """A MobileNetV2-style net (inverted residuals, depthwise convs) for 32x32 inputs."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.blocks = nn.Sequential(InvertedResidual(16, 16, 1), InvertedResidual(16, 24, 2),
                                    InvertedResidual(24, 24, 1), InvertedResidual(24, 40, 2),
                                    InvertedResidual(40, 40, 1))
        self.head = nn.Sequential(nn.Conv2d(40, 128, 1, bias=False), nn.BatchNorm2d(128), nn.ReLU6())
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x):
        return self.fc(self.head(self.blocks(self.stem(x))).mean((2, 3)))


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> tuple[float, float]:
    model.eval()
    correct, loss = 0, 0.0
    with torch.no_grad():
        for i in range(0, len(y), batch):
            out = model(x[i:i + batch])
            loss += float(F.cross_entropy(out, y[i:i + batch], reduction="sum"))
            correct += int((out.argmax(1) == y[i:i + batch]).sum())
    return correct / len(y), loss / len(y)


def train(model: nn.Module, data, *, epochs: int, batch: int, lr: float, seed: int, augment: bool = True,
          log_every: int = 0):
    """SGD with momentum and a cosine schedule; returns (test acc, test loss, train-loss curve per epoch)."""
    xtr, ytr, xte, yte = data
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = epochs * (len(ytr) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    curve = []
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(ytr), generator=g)
        tot, n = 0.0, 0
        for i in range(0, len(perm) - batch + 1, batch):
            idx = perm[i:i + batch]
            xb = xtr[idx]
            if augment:  # random shifts by up to 2 pixels
                dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=g))
                xb = torch.roll(xb, shifts=(dx, dy), dims=(2, 3))
            loss = F.cross_entropy(model(xb), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot += float(loss.detach()) * len(idx)
            n += len(idx)
        curve.append(tot / n)
    acc, tloss = evaluate(model, xte, yte)
    return acc, tloss, curve


def save_record(name: str, record: dict) -> Path:
    OUT.mkdir(exist_ok=True)
    record = {**record, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__,
              "python": platform.python_version(), "cores": os.cpu_count()}
    path = OUT / f"{name}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path
