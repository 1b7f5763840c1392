"""LearningRateMonitor: record the optimizer's learning rates per epoch or per update."""

from __future__ import annotations

from typing import Any

from nnh.callbacks.base import Callback

__all__ = ["LearningRateMonitor"]


class LearningRateMonitor(Callback):
    """Record the learning rate of every param group of ``handler.optimizer``.

    Keys: ``"lr"`` when the optimizer has one param group, ``"lr/group0"``,
    ``"lr/group1"``, ... when it has several. :attr:`history` maps each key to its list of
    values.

    * ``logging_interval="epoch"``: one value per epoch — **the learning rate the epoch
      trained with**, read when the epoch begins (before the handler steps the scheduler at
      the epoch's end). With ``StepLR(step_size=2, gamma=0.1)`` and ``lr=1`` the history is
      ``[1, 1, 0.1, 0.1, ...]``.
    * ``logging_interval="step"``: one value per optimizer update (the batches where
      ``logs["updated"]`` is true, so gradient accumulation windows count once), read
      after the update.

    In both modes ``on_epoch_end`` also writes the epoch's last learning rate(s) into the
    epoch ``logs`` under the same keys, so loggers registered *after* this callback
    (:class:`~nnh.callbacks.CSVLogger`, :class:`~nnh.callbacks.TensorBoardLogger`) record
    them. With a single group this is the same value as the handler's own ``logs["lr"]``
    (the rate the epoch trained with). Runs on every
    rank (``all_ranks = True``) so every rank's logs hold the same keys.

    Args:
        logging_interval: ``"epoch"`` or ``"step"``.

    Example:
        >>> mon = LearningRateMonitor(logging_interval="epoch")
        >>> # handler.add_callback(mon); handler.train(4)
        >>> mon.history
        {}
    """

    all_ranks = True

    def __init__(self, logging_interval: str = "epoch"):
        super().__init__()
        if logging_interval not in ("epoch", "step"):
            raise ValueError(
                f"LearningRateMonitor logging_interval must be 'epoch' or 'step', got {logging_interval!r}"
            )
        self.logging_interval = logging_interval
        self.history: dict[str, list[float]] = {}
        self._epoch_lrs: dict[str, float] | None = None
        self._last_lrs: dict[str, float] | None = None

    def current_lrs(self) -> dict[str, float]:
        """The learning rates of ``handler.optimizer`` now, by key (empty without optimizer).

        Example:
            >>> # LearningRateMonitor().current_lrs()  ->  {'lr': 0.01}
        """
        optimizer = None if self.handler is None else self.handler.optimizer
        if optimizer is None:
            return {}
        groups = optimizer.param_groups
        if len(groups) == 1:
            return {"lr": float(groups[0]["lr"])}
        return {f"lr/group{i}": float(g["lr"]) for i, g in enumerate(groups)}

    def _record(self, lrs: dict[str, float]) -> None:
        for key, value in lrs.items():
            self.history.setdefault(key, []).append(value)

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        # A mid-epoch resume skips on_epoch_begin: the rate in effect now is that epoch's.
        self._epoch_lrs = self.current_lrs()
        self._last_lrs = None

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._epoch_lrs = self.current_lrs()
        self._last_lrs = None

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        if self.logging_interval != "step" or not (logs or {}).get("updated", True):
            return
        self._last_lrs = self.current_lrs()
        self._record(self._last_lrs)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        lrs = self._epoch_lrs if self._epoch_lrs is not None else self.current_lrs()
        if self.logging_interval == "epoch":
            self._record(lrs)
        elif self._last_lrs is not None:
            lrs = self._last_lrs
        if logs is not None:
            logs.update(lrs)

    def state_dict(self) -> dict[str, Any]:
        """``{"history": {key: [values]}}``.

        Example:
            >>> LearningRateMonitor().state_dict()
            {'history': {}}
        """
        return {"history": {k: list(v) for k, v in self.history.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the recorded history (a resumed run appends to it).

        Example:
            >>> m = LearningRateMonitor(); m.load_state_dict({"history": {"lr": [0.1]}}); m.history
            {'lr': [0.1]}
        """
        self.history = {k: [float(x) for x in v] for k, v in (state.get("history") or {}).items()}
