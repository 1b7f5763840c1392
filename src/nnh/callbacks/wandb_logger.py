"""WandbLogger: the run's config, epoch values and checkpoint paths to a Weights & Biases run
(optional dependency: ``pip install nnh[wandb]``)."""

from __future__ import annotations

import importlib
import os
from typing import Any

from nnh.callbacks.base import Callback
from nnh.callbacks.tracking import (
    checkpoint_path,
    finite,
    numeric_logs,
    require,
    restore_run_state,
    run_config,
)

__all__ = ["WandbLogger"]

_MODES = (None, "online", "offline", "disabled")


class WandbLogger(Callback):
    """Log a training run to Weights & Biases: the configuration as the run's config, every
    numeric epoch value (``loss``, ``val_loss``, metrics, ``lr``, keys added by callbacks
    registered before this one) with the epoch as the step, and each auto-saved checkpoint's
    path (``checkpoint_path`` in the run summary, a ``checkpoint_epoch`` value in the history).

    The config holds the model class and keyword arguments (``model.*``), the optimizer and
    its first parameter group's hyperparameters (``optimizer.*``), the loss function,
    scheduler, seed, world size and ``train()``'s options (``train.*``).

    ``wandb.init`` runs when training begins (its id is then in :attr:`run_id`) and the run
    finishes when training ends; a later ``train()`` call, or a run resumed from a checkpoint
    (the id is saved with the callback's state), passes the same id with ``resume="allow"``,
    so W&B continues that run (offline runs get a new folder with the same id, which
    ``wandb sync`` merges). W&B drops history rows whose step is not above the run's last
    one, so epochs replayed after resuming from an older checkpoint are not logged twice.

    Rank 0 only (``all_ranks = False``): other ranks never import ``wandb``.

    Args:
        project: the W&B project (``None``: W&B's default, ``WANDB_PROJECT``).
        mode: ``"online"``, ``"offline"`` or ``"disabled"`` (``None``: W&B's default,
            ``WANDB_MODE``).
        dir: the folder for W&B's local files (``None``: W&B's default, ``WANDB_DIR``).
        **init_kwargs: further ``wandb.init`` arguments (``entity``, ``name``, ``tags``,
            ``group``...); not saved in checkpoints.

    Raises:
        ImportError: when ``wandb`` is not installed (install ``nnh[wandb]``).

    Example:
        >>> logger = WandbLogger(project="digits", mode="offline", dir="/tmp/wb", name="cnn")
        >>> logger.project, logger.mode, logger.run_id
        ('digits', 'offline', None)
        >>> # handler.add_callback(logger); handler.train(10)
    """

    all_ranks = False

    def __init__(
        self,
        project: str | None = None,
        mode: str | None = None,
        dir: str | os.PathLike[str] | None = None,
        **init_kwargs: Any,
    ):
        super().__init__()
        require("wandb", "wandb", "WandbLogger")
        if mode not in _MODES:
            raise ValueError(f"WandbLogger mode must be one of {_MODES}, got {mode!r}")
        if project is not None and not isinstance(project, str):
            raise TypeError(f"WandbLogger project must be a string or None, got {project!r}")
        for reserved in ("id", "resume", "config", "project", "mode", "dir"):
            if reserved in init_kwargs:
                raise ValueError(
                    f"WandbLogger sets wandb.init's {reserved!r} itself; got it in init_kwargs "
                    "(pass project/mode/dir as WandbLogger arguments)"
                )
        self.project = project
        self.mode = mode
        self.dir = None if dir is None else os.fspath(dir)
        self.init_kwargs = dict(init_kwargs)
        #: The W&B run id (``None`` until training first begins on rank 0).
        self.run_id: str | None = None
        self._run: Any = None
        self._checkpoint: str | None = None
        self._restored = False

    def _open_run(self, config: dict[str, Any]) -> None:
        wandb = importlib.import_module("wandb")
        if self.dir is not None:
            os.makedirs(self.dir, exist_ok=True)
        self._run = wandb.init(
            project=self.project,
            mode=self.mode,
            dir=self.dir,
            id=self.run_id,
            resume="allow" if self.run_id is not None else None,
            **self.init_kwargs,
        )
        self._run.config.update(config, allow_val_change=True)
        self.run_id = self._run.id

    def _log_checkpoint(self, epoch: int | None) -> None:
        path = checkpoint_path(self.handler)
        if path is None or path == self._checkpoint or self._run is None:
            return
        self._checkpoint = path
        self._run.summary["checkpoint_path"] = path
        if epoch is not None:
            self._run.log({"checkpoint_epoch": epoch}, step=epoch)

    # ------------------------------------------------------------------ hooks
    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        if self._restored:  # resuming from a checkpoint the run logged when it was written
            self._checkpoint = checkpoint_path(self.handler) or self._checkpoint
            self._restored = False
        self._open_run(run_config(self.handler, logs))

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._log_checkpoint(epoch - 1)  # the save after the previous epoch's logs

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if self._run is None:
            self._open_run(run_config(self.handler))
        self._run.log(finite(numeric_logs(logs)), step=epoch)

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        if self._run is None:
            return
        self._log_checkpoint(None)
        self._run.finish()
        self._run = None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """``{"run_id": ..., "checkpoint": ...}``: a resumed run continues the same W&B run.

        Example:
            >>> WandbLogger(mode="disabled").state_dict()
            {'run_id': None, 'checkpoint': None}
        """
        return {"run_id": self.run_id, "checkpoint": self._checkpoint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the run id (checked: letters, digits, ``-`` and ``_``, as W&B ids are).

        Example:
            >>> w = WandbLogger(mode="disabled"); w.load_state_dict({"run_id": "1x2y3z"}); w.run_id
            '1x2y3z'
        """
        restore_run_state(self, state, "a W&B", 128)
