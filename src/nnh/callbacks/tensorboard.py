"""TensorBoardLogger: epoch scalars to TensorBoard event files (optional dependency)."""

from __future__ import annotations

import importlib
import os
from numbers import Real
from typing import Any

import torch

from nnh.callbacks.base import Callback

__all__ = ["TensorBoardLogger"]

_MISSING = (
    "TensorBoardLogger needs the 'tensorboard' package, which is not installed: "
    "pip install nnh[tensorboard]  (or: pip install tensorboard)"
)


def _summary_writer_class() -> type:
    """``torch.utils.tensorboard.SummaryWriter``, or an ImportError saying what to install."""
    try:
        module = importlib.import_module("torch.utils.tensorboard")
    except ImportError as err:
        raise ImportError(_MISSING) from err
    return module.SummaryWriter


class TensorBoardLogger(Callback):
    """Write every numeric value of the epoch ``logs`` as a TensorBoard scalar.

    Each key (``loss``, ``val_loss``, metrics, ``lr``, and keys added by callbacks
    registered before this one) becomes a scalar tag with the epoch as its step. Events go
    to ``log_dir + comment`` (``log_dir="runs/exp", comment="_lr0.1"`` writes to
    ``runs/exp_lr0.1``) and are flushed after every epoch; the writer is created when
    training begins and closed when it ends (a later ``train()`` call, or a resumed run,
    adds a new event file to the same folder, which TensorBoard shows as one run).

    Rank 0 only (``all_ranks = False``); the writer is never created on other ranks.

    Args:
        log_dir: the folder for the event files.
        comment: suffix appended to ``log_dir``.

    Raises:
        ImportError: when ``tensorboard`` is not installed (install ``nnh[tensorboard]``).

    Example:
        >>> tb = TensorBoardLogger(log_dir="runs/exp1")  # doctest: +SKIP
        >>> # handler.add_callback(tb); handler.train(10)
        >>> # then: tensorboard --logdir runs
    """

    all_ranks = False

    def __init__(self, log_dir: str | os.PathLike[str] = "runs", comment: str = ""):
        super().__init__()
        self._writer_class = _summary_writer_class()
        self.log_dir = os.fspath(log_dir)
        self.comment = str(comment)
        self._writer: Any = None

    @property
    def run_dir(self) -> str:
        """The folder the events are written to: ``log_dir + comment``.

        Example:
            >>> # TensorBoardLogger("runs/a", comment="_x").run_dir  ->  'runs/a_x'
        """
        return self.log_dir.rstrip("/\\") + self.comment if self.comment else self.log_dir

    @property
    def writer(self) -> Any:
        """The ``SummaryWriter`` while training runs on rank 0 (``None`` otherwise)."""
        return self._writer

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        if self._writer is None:
            self._writer = self._writer_class(log_dir=self.run_dir)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if self._writer is None:
            self.on_train_begin()
        for key, value in (logs or {}).items():
            if key == "epoch":
                continue
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()
            if isinstance(value, bool) or not isinstance(value, Real):
                continue
            self._writer.add_scalar(key, float(value), global_step=epoch)
        self._writer.flush()

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        self.close()

    def close(self) -> None:
        """Flush and close the writer (a later ``train()`` opens a new one).

        Example:
            >>> # tb.close()
        """
        if self._writer is not None:
            self._writer.close()
            self._writer = None
