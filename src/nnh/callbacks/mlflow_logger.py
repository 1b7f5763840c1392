"""MLflowLogger: the run's config, epoch values and checkpoint paths to an MLflow run
(optional dependency: ``pip install nnh[mlflow]``)."""

from __future__ import annotations

import importlib
import os
import time
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
from nnh.warn import warn as nnh_warn

__all__ = ["MLflowLogger"]

_MAX_PARAM = 6000  # MLflow's limit on a parameter value's length


class MLflowLogger(Callback):
    """Log a training run to MLflow: the configuration as parameters, every numeric epoch
    value (``loss``, ``val_loss``, metrics, ``lr``, keys added by callbacks registered before
    this one) as a metric with the epoch as its step, and each auto-saved checkpoint's path
    (the ``checkpoint_path`` tag, and a ``checkpoint_epoch`` metric).

    The parameters are the model class and keyword arguments (``model.*``), the optimizer and
    its first parameter group's hyperparameters (``optimizer.*``), the loss function,
    scheduler, seed, world size, and ``train()``'s options (``train.*``). MLflow parameters
    cannot change, so a later ``train()`` call adds only parameters the run does not hold yet.

    The run is created when training first begins (its id is then in :attr:`run_id`) and
    marked finished when training ends; a later ``train()`` call, or a run resumed from a
    checkpoint (the id is saved with the callback's state), continues the same MLflow run
    when the tracking store still has it, and starts a new one (with a warning) otherwise.
    The client talks to ``tracking_uri`` (``None``: MLflow's default, ``MLFLOW_TRACKING_URI``);
    a local ``file:`` store needs ``MLFLOW_ALLOW_FILE_STORE=true`` with MLflow 3.

    Rank 0 only (``all_ranks = False``): other ranks never import ``mlflow``.

    Args:
        tracking_uri: the MLflow tracking URI (``"file:/path/mlruns"``, ``"http://host:5000"``).
        experiment_name: the experiment the run goes to (created when missing).
        run_name: the run's display name (``None``: MLflow picks one).

    Raises:
        ImportError: when ``mlflow`` is not installed (install ``nnh[mlflow]``).

    Example:
        >>> logger = MLflowLogger(tracking_uri="file:/tmp/mlruns", run_name="baseline")
        >>> logger.experiment_name, logger.run_id
        ('nnh', None)
        >>> # handler.add_callback(logger); handler.train(10); logger.run_id -> '3f2a...'
    """

    all_ranks = False

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment_name: str = "nnh",
        run_name: str | None = None,
    ):
        super().__init__()
        require("mlflow", "mlflow", "MLflowLogger")
        for name, value in (("tracking_uri", tracking_uri), ("run_name", run_name)):
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise TypeError(
                    f"MLflowLogger {name} must be a string or None, got {type(value).__name__}"
                )
        if not isinstance(experiment_name, str) or not experiment_name:
            raise ValueError(
                f"MLflowLogger experiment_name must be a non-empty string, got {experiment_name!r}"
            )
        self.tracking_uri = None if tracking_uri is None else os.fspath(tracking_uri)
        self.experiment_name = experiment_name
        self.run_name = run_name
        #: The MLflow run id (``None`` until training first begins on rank 0).
        self.run_id: str | None = None
        self._client: Any = None
        self._checkpoint: str | None = None
        self._restored = False

    # ------------------------------------------------------------------ MLflow plumbing
    def _mlflow(self) -> Any:
        return importlib.import_module("mlflow.entities")

    def _open_run(self) -> None:
        tracking = importlib.import_module("mlflow.tracking")
        self._client = tracking.MlflowClient(tracking_uri=self.tracking_uri)
        if self.run_id is not None:
            try:
                self._client.update_run(self.run_id, status="RUNNING")
                return
            except Exception as err:  # the store does not know the run (moved, deleted)
                nnh_warn(
                    f"MLflowLogger: run {self.run_id} cannot be continued in "
                    f"{self._client.tracking_uri!r} ({type(err).__name__}); starting a new run",
                )
        experiment = self._client.get_experiment_by_name(self.experiment_name)
        experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else self._client.create_experiment(self.experiment_name)
        )
        run = self._client.create_run(experiment_id, run_name=self.run_name)
        self.run_id = run.info.run_id

    def _log_params(self, config: dict[str, Any]) -> None:
        held = self._client.get_run(self.run_id).data.params
        entities = self._mlflow()
        params = [
            entities.Param(key, str(value)[:_MAX_PARAM])
            for key, value in config.items()
            if key not in held
        ]
        for start in range(0, len(params), 100):  # MLflow takes 100 params per batch
            self._client.log_batch(self.run_id, params=params[start : start + 100])

    def _log_checkpoint(self, epoch: int | None) -> None:
        path = checkpoint_path(self.handler)
        if path is None or path == self._checkpoint:
            return
        self._checkpoint = path
        self._client.set_tag(self.run_id, "checkpoint_path", path)
        if epoch is not None:
            self._client.log_metric(self.run_id, "checkpoint_epoch", float(epoch), step=epoch)

    # ------------------------------------------------------------------ hooks
    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        if self._restored:  # resuming from a checkpoint the run logged when it was written
            self._checkpoint = checkpoint_path(self.handler) or self._checkpoint
            self._restored = False
        self._open_run()
        self._log_params(run_config(self.handler, logs))

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._log_checkpoint(epoch - 1)  # the save after the previous epoch's logs

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if self._client is None:
            self._open_run()
        entities = self._mlflow()
        now = int(time.time() * 1000)
        metrics = [
            entities.Metric(key, value, now, epoch)
            for key, value in finite(numeric_logs(logs)).items()
        ]
        self._client.log_batch(self.run_id, metrics=metrics)

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        if self._client is None:
            return
        self._log_checkpoint((logs or {}).get("epoch"))
        self._client.set_terminated(self.run_id, "FINISHED")
        self._client = None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """``{"run_id": ..., "checkpoint": ...}``: a resumed run continues the same MLflow run.

        Example:
            >>> MLflowLogger().state_dict()
            {'run_id': None, 'checkpoint': None}
        """
        return {"run_id": self.run_id, "checkpoint": self._checkpoint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the run id (checked: a string of letters, digits, ``-`` and ``_``).

        Example:
            >>> m = MLflowLogger(); m.load_state_dict({"run_id": "abc123"}); m.run_id
            'abc123'
        """
        restore_run_state(self, state, "an MLflow", 64)
