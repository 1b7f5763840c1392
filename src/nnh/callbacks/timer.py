"""EpochTimer: wall-clock time of every epoch."""

from __future__ import annotations

import time
from typing import Any

from nnh.callbacks.base import Callback

__all__ = ["EpochTimer"]


class EpochTimer(Callback):
    """Measure each epoch's wall time (``time.perf_counter``), validation included.

    Appends the seconds to :attr:`times` and adds ``logs["epoch_time"]`` at epoch end, so
    loggers registered after it record the time. The clock starts at ``on_epoch_begin``
    (or at ``on_train_begin`` for an epoch resumed mid-way, whose ``on_epoch_begin`` does
    not run) and stops when this callback's ``on_epoch_end`` runs: register it first to
    leave out the other callbacks' epoch-end work, last to include it. Runs on every rank.

    Example:
        >>> timer = EpochTimer()
        >>> # handler.add_callback(timer); handler.train(3)
        >>> timer.times, timer.total_time
        ([], 0.0)
    """

    all_ranks = True

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []
        self._start: float | None = None

    @property
    def total_time(self) -> float:
        """Sum of the recorded epoch times, in seconds.

        Example:
            >>> t = EpochTimer(); t.times = [1.0, 2.5]; t.total_time
            3.5
        """
        return float(sum(self.times))

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._start = time.perf_counter()

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        now = time.perf_counter()
        elapsed = now - (self._start if self._start is not None else now)
        self.times.append(elapsed)
        if logs is not None:
            logs["epoch_time"] = elapsed
        self._start = None

    def state_dict(self) -> dict[str, Any]:
        """``{"times": [seconds, ...]}`` (a resumed run appends to it).

        Example:
            >>> EpochTimer().state_dict()
            {'times': []}
        """
        return {"times": list(self.times)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the recorded times.

        Example:
            >>> t = EpochTimer(); t.load_state_dict({"times": [0.5]}); t.total_time
            0.5
        """
        self.times = [float(x) for x in state.get("times", [])]
