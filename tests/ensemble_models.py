"""Importable models for the ensemble tests (checkpoints record them by import path)."""

from __future__ import annotations

from torch import nn


class EnsMLP(nn.Module):
    """MLP d_in-hidden-hidden-d_out; with ``batchnorm`` the first layer has no bias (a bias
    right before BatchNorm has a gradient of pure rounding noise)."""

    def __init__(
        self, d_in: int = 20, hidden: int = 64, d_out: int = 3, dropout: float = 0.0, batchnorm: bool = False
    ):
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(d_in, hidden, bias=not batchnorm)]
        if batchnorm:
            layers.append(nn.BatchNorm1d(hidden))
        layers += [nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(hidden, d_out))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)
