"""EarlyStopping: stop training when a monitored value stops improving."""

from __future__ import annotations

import math
from typing import Any

import torch

from nnh.callbacks.base import Callback
from nnh.warn import warn as nnh_warn

__all__ = ["EarlyStopping"]


class EarlyStopping(Callback):
    """Stop training after ``patience`` epochs without improvement of ``monitor``.

    An epoch improves when the monitored value beats the best so far by more than
    ``min_delta`` (``value < best - min_delta`` in ``"min"`` mode, ``value > best + min_delta``
    in ``"max"`` mode). Every other epoch (a NaN or infinite value included) adds one to
    :attr:`wait`; when ``wait`` reaches ``patience`` the callback sets
    ``handler.stop_training = True`` and the loop ends after that epoch. With
    ``patience=3`` and no improvement after epoch 1, training stops after epoch 4.

    Epochs whose logs lack ``monitor`` (``val_loss`` on an epoch without validation, with
    ``validate_every > 1``) are skipped: they neither improve nor count as waiting. If the
    key is missing on an epoch where it should have been there (a validation ran, or the key
    is not a ``val_`` key), or it never appeared during a ``train()`` call, one warning names
    the key and the keys that are logged.

    ``restore_best_weights=True`` keeps a CPU copy of ``handler.module.state_dict()``
    (parameters and buffers) from the best epoch, so a GPU model costs no GPU memory for it.
    **The weights are restored in** ``on_train_end`` **only when this callback stopped the
    run** (as in Keras); a run that ends because its epochs are done keeps its last weights
    (call :meth:`restore_best` yourself to load the best ones then). Only the module is
    restored: optimizer state and EMA weights stay as they were after the last epoch, and an
    AutoSaver checkpoint written after the last epoch holds the last weights — call
    ``handler.save(...)`` after ``train()`` to keep the restored ones.

    The callback runs on every DDP rank (``all_ranks = True``): the logged values are
    already reduced across ranks, so every rank takes the same decision and restores the
    same weights.

    State (``state_dict``): best value, best epoch, wait counter, stopped epoch and the best
    weights (CPU tensors), so a run resumed from a checkpoint keeps counting. Calling
    ``train()`` again continues too: a run that was stopped stops again after its next
    epoch unless the value improves; call :meth:`reset` to start over.

    Args:
        monitor: logged key to watch (``"val_loss"``, ``"loss"``, ``"val_<metric>"``...).
        mode: ``"min"`` (lower is better) or ``"max"``.
        patience: epochs without improvement before stopping (``>= 0``).
        min_delta: smallest change that counts as an improvement (``>= 0``).
        restore_best_weights: load the best epoch's weights back when stopping.
        verbose: log (or print, without a logger) when stopping and restoring (rank 0).

    Example:
        >>> es = EarlyStopping(monitor="val_accuracy", mode="max", patience=3, min_delta=1e-3)
        >>> es.best, es.wait
        (-inf, 0)
        >>> # handler.add_callback(es); handler.train(epochs=100)
    """

    all_ranks = True

    def __init__(
        self,
        monitor: str = "val_loss",
        mode: str = "min",
        patience: int = 5,
        min_delta: float = 0.0,
        restore_best_weights: bool = False,
        verbose: bool = False,
    ):
        super().__init__()
        if mode not in ("min", "max"):
            raise ValueError(f"EarlyStopping mode must be 'min' or 'max', got {mode!r}")
        if not isinstance(patience, int) or isinstance(patience, bool) or patience < 0:
            raise ValueError(f"EarlyStopping patience must be an int >= 0, got {patience!r}")
        if (
            not isinstance(min_delta, (int, float))
            or isinstance(min_delta, bool)
            or min_delta < 0
            or math.isnan(min_delta)
        ):
            raise ValueError(f"EarlyStopping min_delta must be a number >= 0, got {min_delta!r}")
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(
                f"EarlyStopping monitor must be a non-empty logged key, got {monitor!r}"
            )
        self.monitor = monitor
        self.mode = mode
        self.patience = patience
        self.min_delta = float(min_delta)
        self.restore_best_weights = bool(restore_best_weights)
        self.verbose = bool(verbose)
        self.reset()
        self._warned = False
        self._seen_this_run = False
        self._last_logs: dict[str, Any] = {}

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget the best value, the wait counter and the stored weights (a fresh start).

        Example:
            >>> es = EarlyStopping(); es.wait = 3; es.reset(); es.wait
            0
        """
        self.best: float = math.inf if self.mode == "min" else -math.inf
        self.best_epoch: int = 0
        self.wait: int = 0
        self.stopped_epoch: int = 0
        self.best_weights: dict[str, torch.Tensor] | None = None

    def state_dict(self) -> dict[str, Any]:
        """Best value/epoch, wait counter, stopped epoch and best weights (CPU tensors).

        Example:
            >>> sorted(EarlyStopping().state_dict())
            ['best', 'best_epoch', 'best_weights', 'stopped_epoch', 'wait']
        """
        return {
            "best": self.best,
            "best_epoch": self.best_epoch,
            "wait": self.wait,
            "stopped_epoch": self.stopped_epoch,
            "best_weights": None if self.best_weights is None else dict(self.best_weights),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` (the weights are moved to the CPU).

        Example:
            >>> es = EarlyStopping(); es.load_state_dict({"best": 0.5, "wait": 2}); es.wait
            2
        """
        self.best = float(state.get("best", self.best))
        self.best_epoch = int(state.get("best_epoch", 0))
        self.wait = int(state.get("wait", 0))
        self.stopped_epoch = int(state.get("stopped_epoch", 0))
        weights = state.get("best_weights")
        self.best_weights = (
            None
            if weights is None
            else {k: v.detach().to("cpu", copy=True) for k, v in weights.items()}
        )

    # ------------------------------------------------------------------ hooks
    def _improved(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def _say(self, message: str) -> None:
        handler = self.handler
        if not self.verbose or handler is None or handler.rank != 0:
            return
        if handler.logger is not None:
            handler.logger.info(message)
        else:
            print(message)

    def _warn_missing(self, logs: dict[str, Any], when: str) -> None:
        if self._warned:
            return
        self._warned = True
        nnh_warn(
            f"EarlyStopping: monitored key {self.monitor!r} {when} (logged keys: {sorted(logs)}); "
            "those epochs are skipped. Pass monitor= one of the logged keys, or set a validation "
            "loader for a 'val_' key.",
        )

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self.stopped_epoch = 0
        self._seen_this_run = False
        self._last_logs = {}

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        logs = logs if logs is not None else {}
        self._last_logs = logs
        if self.monitor not in logs or logs[self.monitor] is None:
            validated = any(k.startswith("val_") for k in logs)
            if validated or not self.monitor.startswith("val_"):
                self._warn_missing(logs, f"is not logged at epoch {epoch}")
            return
        self._seen_this_run = True
        value = float(logs[self.monitor])
        if self._improved(value):
            self.best, self.best_epoch, self.wait = value, epoch, 0
            if self.restore_best_weights:
                assert self.handler is not None, (
                    "EarlyStopping must be added with handler.add_callback"
                )
                self.best_weights = {
                    k: v.detach().to("cpu", copy=True)
                    for k, v in self.handler.module.state_dict().items()
                }
            return
        self.wait += 1
        if self.wait >= self.patience:
            assert self.handler is not None, "EarlyStopping must be added with handler.add_callback"
            self.stopped_epoch = epoch
            self.handler.stop_training = True
            self._say(
                f"EarlyStopping: no improvement of {self.monitor} for {self.wait} epoch(s); "
                f"stopping after epoch {epoch} (best {self.best:.6g} at epoch {self.best_epoch})"
            )

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        if not self._seen_this_run and "epoch" in self._last_logs:
            self._warn_missing(self._last_logs, "never appeared in this train() call")
        if self.stopped_epoch and self.restore_best_weights and self.best_weights is not None:
            self.restore_best()

    def restore_best(self) -> None:
        """Load the stored best weights into ``handler.module`` (in place).

        Raises:
            RuntimeError: when no best weights are stored (``restore_best_weights=False`` or
                no epoch improved yet).

        Example:
            >>> # es = EarlyStopping(restore_best_weights=True); ...; handler.train(10)
            >>> # es.restore_best()   # also when training ended without stopping
        """
        if self.best_weights is None:
            raise RuntimeError(
                "EarlyStopping has no best weights: construct it with "
                "restore_best_weights=True and train at least one epoch that logs "
                f"{self.monitor!r}"
            )
        assert self.handler is not None, "EarlyStopping must be added with handler.add_callback"
        self.handler.module.load_state_dict(self.best_weights)
        self._say(
            f"EarlyStopping: restored the weights of epoch {self.best_epoch} "
            f"({self.monitor}={self.best:.6g})"
        )
