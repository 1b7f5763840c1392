"""The demo's classification task: a three-arm spiral and a small MLP.

Kept in its own module so checkpoints record ``spiral_task.SpiralNet`` and
``spiral_task.accuracy`` by an import path that resolves from any script that can import it.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.data import TensorDataset


class SpiralNet(nn.Module):
    """A small MLP classifier for the three-arm spiral."""

    def __init__(self, hidden: int = 64, n_classes: int = 3):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(2, hidden), nn.BatchNorm1d(hidden), nn.SiLU(), nn.Dropout(0.05),
            nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, n_classes),
        )

    def forward(self, x):
        return self.net(x)


def spirals(n: int, seed: int, noise: float = 0.45) -> TensorDataset:
    """Three interleaved spiral arms, one class each."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=g)
    r = torch.rand(n, generator=g) * 0.9 + 0.1
    theta = labels * (2 * math.pi / 3) + r * 2.6 + noise * torch.randn(n, generator=g)
    x = torch.stack([r * torch.cos(theta), r * torch.sin(theta)], dim=1) * 2
    return TensorDataset(x, labels)


def accuracy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Fraction of correct predictions in the batch."""
    return (output.argmax(dim=1) == target).float().mean()
