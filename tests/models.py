"""Small importable models and data for the tests (importable: checkpoints record them)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset


class MLP(nn.Module):
    def __init__(self, d_in: int = 8, hidden: int = 16, n_classes: int = 3, dropout: float = 0.1):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d_in, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, n_classes)
        )

    def forward(self, x):
        return self.net(x)


class Regressor(nn.Module):
    def __init__(self, d_in: int = 4):
        super().__init__()
        self.lin = nn.Linear(d_in, 1)

    def forward(self, x, scale=None):
        out = self.lin(x)
        return out if scale is None else out * scale


class AutoEncoder(nn.Module):
    def __init__(self, d: int = 6, code: int = 3):
        super().__init__()
        self.enc, self.dec = nn.Linear(d, code), nn.Linear(code, d)

    def forward(self, x):
        return self.dec(torch.tanh(self.enc(x)))


class DDPNet(nn.Module):
    """No BatchNorm or dropout: two DDP ranks of batch b equal one process of batch 2b."""

    def __init__(self, d: int = 5):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d, 16), nn.Tanh(), nn.Linear(16, 3))

    def forward(self, x):
        return self.body(x)


def classification_data(n: int = 120, d: int = 8, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return TensorDataset(x, y)


def regression_data(n: int = 50, d: int = 4, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return TensorDataset(x, x.sum(1, keepdim=True) + 0.1 * torch.randn(n, 1, generator=g))


def accuracy(output, target):
    return (output.argmax(1) == target).float().mean()


# -- callbacks used by the resume tests (importable, so checkpoints can rebuild them) ------
from nnh import Callback  # noqa: E402


class BatchLog(Callback):
    """Records a checksum of every training batch: the shuffling order, in the checkpoint."""

    def __init__(self):
        super().__init__()
        self.sums: list[float] = []

    def on_train_batch_begin(self, batch, logs=None):
        self.sums.append(float(logs["batch"][0].double().sum()))

    def state_dict(self):
        return {"sums": list(self.sums)}

    def load_state_dict(self, state):
        self.sums = list(state["sums"])


class SlowFrom(Callback):
    """Sleeps after every batch from epoch ``epoch`` on, so a test can kill the run there."""

    def __init__(self, epoch: int = 3, seconds: float = 0.0, marker: str = ""):
        super().__init__()
        self.epoch, self.seconds, self.marker = epoch, seconds, marker
        self._current = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._current = epoch

    def on_train_batch_end(self, batch, logs=None):
        import pathlib
        import time

        if self._current >= self.epoch and self.seconds:
            if self.marker:
                pathlib.Path(self.marker).write_text(f"{self._current} {batch}")
            time.sleep(self.seconds)


class ScaledCrossEntropy(nn.Module):
    """A user's own loss module: an option, a buffer, a setting not in the constructor."""

    def __init__(self, scale: float = 1.0, n_classes: int = 3):
        super().__init__()
        self.scale = scale
        self.register_buffer("class_weight", torch.ones(n_classes))
        self.note = "default"

    def forward(self, output, target):
        return self.scale * nn.functional.cross_entropy(output, target, weight=self.class_weight)


def smoothed_cross_entropy(output, target, smoothing: float = 0.0):
    return nn.functional.cross_entropy(output, target, label_smoothing=smoothing)
