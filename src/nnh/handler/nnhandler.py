"""``NNHandler``: the stateful shell around the pure core.

The handler owns the outside world — the model object and its device, DDP, data loaders,
the optimizer and scheduler objects, callbacks, logging, progress bars and files — and
threads a :class:`nnh.core.TrainState` through the core's step functions. It holds no
training arithmetic of its own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from nnh.callbacks.base import Callback
from nnh.checkpoint.background import BackgroundWriter, SaveHandle
from nnh.checkpoint.pacing import pacing_from_env
from nnh.core import (
    OptimizerAdapter,
    TrainState,
)
from nnh.core.ensemble import check_vectorisable
from nnh.distributed import DEFAULT_DIST_TIMEOUT_S, setup_distributed
from nnh.distributed.fsdp import FSDPOptions, check_strategy
from nnh.handler import inference
from nnh.handler import validation as check
from nnh.handler.autosaver import AutoSaver
from nnh.handler.building import build_module, check_model_kwargs, wrap_module
from nnh.handler.data import make_loader
from nnh.handler.devices import check_device
from nnh.handler.ensemble import Ensemble, check_ensemble_size
from nnh.handler.enums import LoggingMode, ModelType
from nnh.handler.fields import init_fields
from nnh.handler.foreign_data import guard_restored_data
from nnh.handler.history import History
from nnh.handler.logs import make_logger
from nnh.handler.loop import train as run_training
from nnh.handler.metric_objects import as_handler_metric
from nnh.handler.saving import (
    raise_save_failures,
    submit_checkpoint,
    wait_for_saves,
    write_checkpoint,
)
from nnh.handler.seeding import check_seed, model_kwargs_with_seed, seed_everything
from nnh.handler.train_options import remembers_train_options
from nnh.handler.train_setup import train_mode
from nnh.warn import warn as nnh_warn

__all__ = ["NNHandler"]


class NNHandler:
    """A model's whole life: build, train, evaluate, predict, save, load, sample.

    ``dist_timeout``: seconds a DDP collective waits for the other ranks (default 1800).
    ``strategy``: ``"ddp"`` (default) or ``"fsdp"`` (FSDP2 sharding when distributed, options
    in ``fsdp=dict(...)``: :class:`nnh.distributed.fsdp.FSDPOptions`, docs/distributed.md).

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> h = NNHandler(torch.nn.Linear, in_features=2, out_features=1, model_type="regression")
        >>> h.set_optimizer(torch.optim.SGD, lr=0.1)
        >>> h.set_loss_fn(torch.nn.functional.mse_loss)
        >>> h.set_train_loader(TensorDataset(torch.randn(16, 2), torch.randn(16, 1)), batch_size=8)
        >>> h.train(epochs=2, progress_bar=False)
        >>> len(h.train_losses)
        2
    """

    ModelType = ModelType
    LoggingMode = LoggingMode

    def __init__(
        self,
        model_class: type[nn.Module],
        device: torch.device | str = "cpu",
        logger_mode: LoggingMode | None = None,
        logger_filename: str = "NNHandler.log",
        logger_level: int = logging.INFO,
        save_model_code: bool = False,
        model_type: ModelType | str = ModelType.CLASSIFICATION,
        use_distributed: bool | None = None,
        dist_timeout: float = DEFAULT_DIST_TIMEOUT_S,
        ensemble_size: int | None = None,
        seed: int | None = None,
        strategy: str = "ddp",
        fsdp: dict[str, Any] | None = None,
        **model_kwargs: Any,
    ):
        check_model_kwargs(model_class, model_kwargs)
        self._strategy = check_strategy(strategy, fsdp, ensemble_size)
        self._fsdp = FSDPOptions.from_dict(fsdp) if strategy == "fsdp" else None
        size = check_ensemble_size(ensemble_size)
        self._ensemble = None if size is None else Ensemble(size)
        self._dist, self._device = setup_distributed(
            use_distributed, check_device(device), dist_timeout
        )
        self._logger = make_logger(
            logger_mode, logger_filename, logger_level, is_main=self._dist.is_main
        )
        self._logger_config = {
            "mode": None
            if logger_mode is None
            else LoggingMode(getattr(logger_mode, "value", logger_mode)).value,
            "filename": logger_filename,
            "level": logger_level,
        }
        self._seed: int | None = None
        if check_seed(seed) is not None:
            self.seed = seed  # before the model is built: seeds its initial weights
        self._model_type = ModelType.from_string(model_type)
        init_fields(self, save_model_code)
        self.set_model(
            model_class,
            save_model_code=save_model_code,
            model_type=None,
            **model_kwargs_with_seed(model_class, seed, model_kwargs),
        )
        self._log(
            f"NNHandler ready: {model_class.__name__} on {self._device} "
            f"({'DDP world of ' + str(self._dist.world_size) if self._dist.enabled else 'single process'})"
        )

    # ------------------------------------------------------------------ logging helpers
    def _log(self, message: str, level: int = logging.INFO) -> None:
        if self._logger is not None:
            self._logger.log(level, message)

    def _warn(self, message: str) -> None:
        if self._dist.is_main:
            nnh_warn(message)
        self._log(message, logging.WARNING)

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        """The device of this process/rank (read-only)."""
        return self._device

    @property
    def seed(self) -> int | None:
        """The random seed applied to PyTorch (CPU and CUDA) on every rank."""
        return self._seed

    @seed.setter
    def seed(self, value: int | None) -> None:
        self._seed = check_seed(value)
        if value is not None:
            seed_everything(value)

    @property
    def logger(self) -> logging.Logger | None:
        """The logger (``None`` when logging is off or on non-zero ranks); settable to any
        ``logging.Logger`` or ``None`` (a logger set so is not recorded in checkpoints)."""
        return self._logger

    @logger.setter
    def logger(self, value: logging.Logger | None) -> None:
        if value is not None and not isinstance(value, logging.Logger):
            raise TypeError(f"logger must be a logging.Logger or None, got {type(value).__name__}")
        self._logger = value
        self._logger_config = {"mode": None, "filename": None, "level": logging.INFO}

    @property
    def model(self) -> nn.Module | None:
        """The model as called: possibly a DDP or ``torch.compile`` wrapper."""
        return self._model

    @property
    def module(self) -> nn.Module:
        """The plain ``nn.Module`` (DDP / DataParallel / compile unwrapped)."""
        if self._module is None:
            raise RuntimeError("no model is set; call set_model first")
        return self._module

    @property
    def model_type(self) -> ModelType:
        return self._model_type

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The real torch optimizer (schedulers and user code may use it)."""
        return None if self._adapter is None else self._adapter.optimizer

    @property
    def scheduler(self) -> Any:
        return self._scheduler

    @property
    def loss_fn(self) -> Callable[..., torch.Tensor] | None:
        return self._loss_fn

    @property
    def pass_epoch_to_loss(self) -> bool:
        return self._pass_epoch_to_loss

    @pass_epoch_to_loss.setter
    def pass_epoch_to_loss(self, value: bool) -> None:
        self._pass_epoch_to_loss = bool(value)

    @property
    def loss_fn_kwargs(self) -> dict[str, Any]:
        return self._loss_fn_kwargs

    @loss_fn_kwargs.setter
    def loss_fn_kwargs(self, value: dict[str, Any]) -> None:
        if not isinstance(value, dict):
            raise TypeError(f"loss_fn_kwargs must be a dict, got {type(value).__name__}")
        self._loss_fn_kwargs = dict(value)

    @property
    def train_loader(self) -> DataLoader | None:
        return self._train_loader

    @property
    def val_loader(self) -> DataLoader | None:
        return self._val_loader

    @property
    def metrics(self) -> dict[str, Callable[[Any, Any], Any]]:
        return dict(self._metrics)

    @property
    def callbacks(self) -> list[Callback]:
        return list(self._callbacks)

    @property
    def history(self) -> History | None:
        """Epoch history (rank 0; ``None`` on other ranks)."""
        return self._history if self._dist.is_main else None

    @property
    def train_losses(self) -> list[float]:
        return self._history.train_losses

    @property
    def val_losses(self) -> list[float]:
        return self._history.val_losses

    @property
    def train_metrics_history(self) -> dict[str, list[float]]:
        return self._history.train_metrics

    @property
    def val_metrics_history(self) -> dict[str, list[float]]:
        return self._history.val_metrics

    @property
    def ensemble_size(self) -> int | None:
        """Members of a vectorised ensemble (``NNHandler(..., ensemble_size=E)``), else ``None``."""
        return None if self._ensemble is None else self._ensemble.size

    @property
    def member_history(self) -> Any:
        """Per-member epoch means of an ensemble (:class:`nnh.handler.ensemble.MemberHistory`), else None."""
        return None if self._ensemble is None else self._ensemble.history

    def member(self, index: int) -> nn.Module:
        """A plain ``model_class`` module holding ensemble member ``index``'s weights (a copy).

        Example:
            >>> h = NNHandler(nn.Linear, in_features=2, out_features=1, ensemble_size=3)
            >>> h.ensemble_size, h(torch.zeros(5, 2)).shape, h.member(2).weight.shape
            (3, torch.Size([3, 5, 1]), torch.Size([1, 2]))
        """
        if self._ensemble is None:
            raise RuntimeError("member() needs an ensemble: NNHandler(..., ensemble_size=E)")
        return self.module.member(index)

    @property
    def state(self) -> TrainState | None:
        """The functional core's record (parameters, optimizer state, EMA, counters)."""
        return self._state

    @property
    def auto_saver(self) -> AutoSaver:
        return self._auto_saver

    @property
    def save_interval(self) -> int | None:
        return self._auto_saver.interval

    @save_interval.setter
    def save_interval(self, value: int | None) -> None:
        self._auto_saver = attrs.evolve(self._auto_saver, interval=value)

    @property
    def save_path(self) -> str:
        return self._auto_saver.save_path

    @save_path.setter
    def save_path(self, value: str) -> None:
        self._auto_saver = attrs.evolve(
            self._auto_saver, save_path=check.check_save_path(value), from_checkpoint=False
        )

    @property
    def save_model_name(self) -> str:
        return self._auto_saver.name

    @save_model_name.setter
    def save_model_name(self, value: str) -> None:
        self._auto_saver = attrs.evolve(self._auto_saver, name=value, from_checkpoint=False)
        self._auto_saver.check_name(self._log_keys())

    @property
    def overwrite_last_saved(self) -> bool:
        return self._auto_saver.overwrite

    @overwrite_last_saved.setter
    def overwrite_last_saved(self, value: bool) -> None:
        self._auto_saver = attrs.evolve(self._auto_saver, overwrite=bool(value))

    @property
    def sde(self) -> Any:
        return self._sde

    @sde.setter
    def sde(self, value: Any) -> None:
        check.check_sde(value)
        self._sde = value

    @property
    def sampler(self) -> Any:
        return self._sampler

    @sampler.setter
    def sampler(self, value: Any) -> None:
        if value is not None:
            if not callable(getattr(value, "sample", None)):
                raise TypeError(
                    f"{type(value).__name__} is not a sampler: it has no sample(N, device) method"
                )
            if hasattr(value, "set_handler"):
                value.set_handler(self)
        self._sampler = value

    @property
    def is_distributed(self) -> bool:
        return self._dist.enabled

    @property
    def rank(self) -> int:
        return self._dist.rank

    @property
    def world_size(self) -> int:
        return self._dist.world_size

    def _inference_model(self) -> nn.Module:
        """The model for forward passes without gradient sync (evaluation, prediction,
        sampling): under DDP the plain module, so ranks may run different numbers of them."""
        if self._dist.enabled or isinstance(self._model, nn.parallel.DistributedDataParallel):
            return self.module
        return self._model

    # ------------------------------------------------------------------ configuration
    def set_model(
        self,
        model_class: type[nn.Module],
        save_model_code: bool = False,
        model_type: ModelType | str | None = None,
        **model_kwargs: Any,
    ) -> None:
        """Build ``model_class(**model_kwargs)`` on the device (DDP-wrapped in DDP mode).

        An optimizer or scheduler already set is rebuilt, with the same options, for the new
        model; its state and the training record start afresh.

        Example:
            >>> h = NNHandler(nn.Linear, in_features=2, out_features=1, model_type="regression")
            >>> h.set_model(nn.Linear, in_features=2, out_features=3)
            >>> h.module.out_features
            3
        """
        check_model_kwargs(model_class, model_kwargs)
        if model_type is not None:
            self._model_type = ModelType.from_string(model_type)
        module = build_module(self, model_class, model_kwargs)
        self._model_class, self._model_kwargs = model_class, dict(model_kwargs)
        self._save_model_code = bool(save_model_code)
        self._install_module(module)

    def _install_module(self, module: nn.Module) -> None:
        self._module = module
        # a meta-built module is wrapped once NNHandler.load has assigned its weights
        self._model = (
            module if getattr(module, "_nnh_meta_init", False) else wrap_module(self, module)
        )
        self._compile_kwargs = None
        self._state = None
        self._keep_eval = []
        if self._optimizer_spec is not None:
            cls, kwargs = self._optimizer_spec
            self.set_optimizer(cls, **kwargs)
        if self._scheduler_spec is not None:
            cls, kwargs = self._scheduler_spec
            self.set_scheduler(cls, **kwargs)

    def set_optimizer(
        self, optimizer_class: type[torch.optim.Optimizer], **optimizer_kwargs: Any
    ) -> None:
        """Use ``optimizer_class(model.parameters(), **optimizer_kwargs)``.

        Any ``torch.optim.Optimizer`` subclass works (not LBFGS, which needs a closure);
        pass ``params=[{"params": [names or parameters], ...}, ...]`` for param groups.

        Example:
            >>> h = NNHandler(nn.Linear, in_features=2, out_features=1, model_type="regression")
            >>> h.set_optimizer(torch.optim.SGD, lr=0.1, momentum=0.9)
            >>> type(h.optimizer).__name__, h.optimizer.param_groups[0]["momentum"]
            ('SGD', 0.9)
        """
        adapter = OptimizerAdapter.create(optimizer_class, self.module, **optimizer_kwargs)
        if self._ensemble is not None:
            check_vectorisable(optimizer_class)
        self._optimizer_spec = (optimizer_class, dict(optimizer_kwargs))
        self._adapter = adapter
        self._state = None
        if self._scheduler is not None and self._scheduler_spec is not None:
            cls, kwargs = self._scheduler_spec
            self.set_scheduler(cls, **kwargs)

    def set_scheduler(self, scheduler_class: type | None, **scheduler_kwargs: Any) -> None:
        """Attach ``scheduler_class(optimizer, **scheduler_kwargs)``; ``None`` removes it.

        It steps once per epoch after validation; ``ReduceLROnPlateau`` gets the validation
        loss (the training loss when there is no validation loader).

        Example:
            >>> h = NNHandler(nn.Linear, in_features=2, out_features=1, model_type="regression")
            >>> h.set_optimizer(torch.optim.SGD, lr=0.1)
            >>> h.set_scheduler(torch.optim.lr_scheduler.StepLR, step_size=2)
            >>> type(h.scheduler).__name__
            'StepLR'
        """
        if scheduler_class is None:
            self._scheduler, self._scheduler_spec = None, None
            return
        if self._adapter is None:
            raise RuntimeError("set the optimizer (set_optimizer) before the scheduler")
        try:
            self._scheduler = scheduler_class(self._adapter.optimizer, **scheduler_kwargs)
        except TypeError as err:
            raise TypeError(
                f"{getattr(scheduler_class, '__name__', scheduler_class)} cannot be built with "
                f"{sorted(scheduler_kwargs)}: {err}"
            ) from err
        self._scheduler_spec = (scheduler_class, dict(scheduler_kwargs))

    def set_loss_fn(
        self, loss_fn: Callable[..., torch.Tensor], pass_epoch_to_loss: bool = False, **kwargs: Any
    ) -> None:
        """``loss_fn(output, target, **kwargs)`` (and ``epoch=`` when asked and accepted).

        Example:
            >>> h = NNHandler(nn.Linear, in_features=2, out_features=1, model_type="regression")
            >>> h.set_loss_fn(nn.functional.huber_loss, delta=0.5)
            >>> h.loss_fn_kwargs
            {'delta': 0.5}
        """
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        self._loss_fn = loss_fn
        self._pass_epoch_to_loss = bool(pass_epoch_to_loss)
        self._loss_fn_kwargs = dict(kwargs)

    def set_train_loader(self, dataset: Dataset | DataLoader, **loader_kwargs: Any) -> None:
        """Training data: a Dataset plus DataLoader options, or a ready DataLoader.

        In DDP mode a Dataset is sharded with a DistributedSampler (``shuffle`` honoured).

        Example:
            >>> h = NNHandler(nn.Linear, in_features=2, out_features=1, model_type="regression")
            >>> from torch.utils.data import TensorDataset
            >>> h.set_train_loader(TensorDataset(torch.zeros(10, 2), torch.zeros(10, 1)), batch_size=4)
            >>> len(h.train_loader)
            3
        """
        loader = make_loader(self, "train", check.check_dataset("dataset", dataset), loader_kwargs)
        self._train_loader = check.check_has_batches("training", loader)

    def set_val_loader(self, dataset: Dataset | DataLoader, **loader_kwargs: Any) -> None:
        """Validation data: a Dataset plus DataLoader options, or a ready DataLoader.

        Example:
            >>> h = NNHandler(nn.Linear, in_features=2, out_features=1, model_type="regression")
            >>> from torch.utils.data import TensorDataset
            >>> h.set_val_loader(TensorDataset(torch.zeros(6, 2), torch.zeros(6, 1)), batch_size=6)
            >>> len(h.val_loader)
            1
        """
        loader = make_loader(self, "val", check.check_dataset("dataset", dataset), loader_kwargs)
        self._val_loader = check.check_has_batches("validation", loader)

    def add_metric(self, name: str, metric_fn: Callable[[Any, Any], Any]) -> None:
        """Register ``metric_fn(output, target)`` (a batch mean) or a ``torchmetrics.Metric``.

        Example:
            >>> h = NNHandler(nn.Linear, in_features=2, out_features=1, model_type="regression")
            >>> h.add_metric("mae", lambda out, y: (out - y).abs().mean())
            >>> list(h.metrics)
            ['mae']
        """
        if not isinstance(name, str) or not name:
            raise ValueError("a metric needs a non-empty string name")
        if name in ("loss", "epoch", "lr") or name.startswith("val_"):
            raise ValueError(f"metric name {name!r} is reserved; choose another")
        if not callable(metric_fn):
            raise TypeError(f"metric {name!r} must be callable, got {type(metric_fn).__name__}")
        self._metrics[name] = as_handler_metric(metric_fn)

    def clear_metrics(self) -> None:
        """Remove every registered metric (their history stays).

        Example:
            >>> h = NNHandler(nn.Linear, in_features=2, out_features=1, model_type="regression")
            >>> h.add_metric("mae", lambda out, y: (out - y).abs().mean())
            >>> h.clear_metrics(); h.metrics
            {}
        """
        self._metrics.clear()

    def add_callback(self, callback: Callback) -> None:
        """Register a :class:`~nnh.Callback` instance.

        Example:
            >>> h = NNHandler(nn.Linear, in_features=2, out_features=1, model_type="regression")
            >>> from nnh.callbacks import EpochTimer
            >>> h.add_callback(EpochTimer())
            >>> [type(c).__name__ for c in h.callbacks]
            ['EpochTimer']
        """
        if not isinstance(callback, Callback):
            raise TypeError(f"callbacks must subclass nnh.Callback, got {type(callback).__name__}")
        callback.set_handler(self)
        self._callbacks.append(callback)

    def auto_save(
        self,
        interval: int | None,
        save_path: str = ".",
        name: str = "model_epoch{epoch:02d}",
        overwrite: bool = False,
        every_n_steps: int | None = None,
        async_save: bool = False,
    ) -> None:
        """Save every ``interval`` epochs (``-1``: after the last epoch only; ``0``/``None``:
        never) to ``save_path/name.pth``. ``name`` is a format string over ``epoch`` and the
        epoch's logged values. ``overwrite`` deletes the previous file once the new one is
        safely written. ``every_n_steps`` also writes a mid-epoch resume checkpoint.
        ``async_save`` writes every automatic save in the background (snapshot at the save
        point; training goes on; all writes finish before ``train()`` returns).

        Example:
            >>> h = NNHandler(nn.Linear, in_features=2, out_features=1, model_type="regression")
            >>> h.auto_save(5, save_path="ckpt", name="run_{epoch:03d}", overwrite=True)
            >>> h.save_interval, h.save_path, h.overwrite_last_saved
            (5, 'ckpt', True)
        """
        saver = AutoSaver(
            interval=interval,
            save_path=check.check_save_path(save_path),
            name=name,
            overwrite=overwrite,
            every_n_steps=every_n_steps,
            async_save=bool(async_save),
        )
        saver.check_name(self._log_keys())
        self._auto_saver = saver

    def _log_keys(self) -> set[str]:
        """The fields an epoch's logs will hold (validation ones only with a val loader)."""
        keys = {"epoch", "loss", "lr", *self._metrics}
        if self._val_loader is not None:
            keys |= {"val_loss", *(f"val_{name}" for name in self._metrics)}
        return keys

    @guard_restored_data
    @remembers_train_options
    def train(
        self,
        epochs: int,
        validate_every: int = 1,
        gradient_accumulation_steps: int = 1,
        use_amp: bool | str | torch.dtype = False,
        gradient_clipping_norm: float | None = None,
        ema_decay: float = 0.0,
        seed: int | None = None,
        progress_bar: bool = True,
        debug_print_interval: int | None = None,
        save_on_last_epoch: bool = True,
        epoch_train_and_val_pbar: bool = False,
    ) -> None:
        """Train for ``epochs`` more epochs (calling again continues: epochs and history add up).

        Options not passed continue as in the last ``train()`` call, also on a handler loaded
        from a checkpoint (:mod:`nnh.handler.train_options`); the defaults below apply to the first.

        Args:
            epochs: epochs to run in this call.
            validate_every: validate every N epochs (when a validation loader is set).
            gradient_accumulation_steps: micro-batches per optimizer update; a partial
                window at the end of an epoch is applied with its own samples.
            use_amp: autocast: ``True`` picks fp16 + dynamic loss scaling on CUDA and
                bf16 on CPU; ``'bf16'``/``'fp16'`` choose explicitly.
            gradient_clipping_norm: clip the global gradient norm.
            ema_decay: > 0 keeps an EMA of the weights (used by ``predict``/``sample``).
            seed: seed PyTorch before training.
            progress_bar: an epoch progress bar with the running loss (rank 0).
            debug_print_interval: log the batch loss every N batches (forces a sync then).
            save_on_last_epoch: save through the AutoSaver after the last epoch.
            epoch_train_and_val_pbar: also show per-epoch batch bars for train and val.

        Example:
            >>> from torch.utils.data import TensorDataset
            >>> h = NNHandler(nn.Linear, in_features=2, out_features=1, model_type="regression")
            >>> h.set_optimizer(torch.optim.SGD, lr=0.1); h.set_loss_fn(nn.functional.mse_loss)
            >>> h.set_train_loader(TensorDataset(torch.randn(8, 2), torch.randn(8, 1)), batch_size=4)
            >>> h.train(epochs=2, progress_bar=False); len(h.train_losses)
            2
        """
        run_training(self, **{k: v for k, v in locals().items() if k != "self"})

    # ------------------------------------------------------------------ checkpoints
    def save(
        self, path: str, include_datasets: bool = True, blocking: bool = True, full: bool = False
    ) -> SaveHandle | None:
        """Save the complete handler state to ``path`` (atomically; rank 0 writes, all wait).

        Model weights, optimizer, scheduler, loss scaler, EMA, history, metric and loss
        configuration, callbacks, AutoSaver, SDE/sampler, model type, seed, RNG states and
        versions. ``TensorDataset`` training/validation data is embedded (up to 256 MiB)
        unless ``include_datasets=False``.

        ``blocking=False`` snapshots the state now and writes the same file on a background
        thread, returning a :class:`~nnh.checkpoint.background.SaveHandle` (``done()``,
        ``result()``); training can go on meanwhile. A failed background write is raised by
        the next ``train``, ``save``, ``predict`` or ``wait_for_saves`` call.

        ``full=True`` under ``strategy="fsdp"``: one ordinary file gathered from the shards,
        parameter by parameter (every rank must call it; blocking only); elsewhere the
        ordinary file.

        Example:
            >>> from torch.utils.data import TensorDataset
            >>> h = NNHandler(nn.Linear, in_features=2, out_features=1, model_type="regression")
            >>> h.set_optimizer(torch.optim.SGD, lr=0.1); h.set_loss_fn(nn.functional.mse_loss)
            >>> h.set_train_loader(TensorDataset(torch.randn(8, 2), torch.randn(8, 1)), batch_size=4)
            >>> import os, tempfile
            >>> path = os.path.join(tempfile.mkdtemp(), "run.pth")
            >>> h.train(epochs=1, progress_bar=False); h.save(path)
            >>> NNHandler.load(path).train_losses == h.train_losses
            True
            >>> handle = h.save(path, blocking=False); handle.result().name
            'run.pth'
        """
        raise_save_failures(self)
        if not blocking:
            return submit_checkpoint(self, path, include_datasets=include_datasets, full=full)
        write_checkpoint(self, path, include_datasets=include_datasets, full=full)
        return None

    def _write_checkpoint(self, path: str, *, guard_replace: bool) -> None:
        """A blocking save for callbacks (``guard_replace``: see ``saving.write_checkpoint``)."""
        write_checkpoint(self, path, guard_replace=guard_replace)

    def wait_for_saves(self, timeout: float | None = None) -> None:
        """Block until every background save of this handler is written; raise the first
        failure (a :class:`~nnh.checkpoint.CheckpointError` naming the file).

        Example:
            >>> h = NNHandler(nn.Linear, in_features=2, out_features=1, model_type="regression")
            >>> h.wait_for_saves()   # nothing pending: returns at once
        """
        wait_for_saves(self, timeout)

    def _background_writer(self) -> BackgroundWriter:
        if self._saves is None:
            self._saves = BackgroundWriter(pacing=pacing_from_env())
        return self._saves

    @property
    def remaining_epochs(self) -> int:
        """Epochs left of the ``train()`` call that was under way when this handler's state
        was saved: an automatic checkpoint (epoch or step) written inside ``train(10)`` at
        epoch 5 has 5 left; 0 when that call had finished."""
        if self._state is None:
            return 0
        return max(int(self._target_epoch) - self._state.epoch, 0)

    def resume_training(self, **overrides: Any) -> None:
        """Finish the ``train()`` call an automatic checkpoint was written in, with its options.

        ``NNHandler.load(checkpoint).resume_training()`` runs the :attr:`remaining_epochs`
        and ends bitwise equal to the uninterrupted run (CPU; same data and code), from an
        epoch checkpoint or a mid-epoch step checkpoint alike.

        Example:
            >>> h = NNHandler(nn.Linear, in_features=2, out_features=1, model_type="regression")
            >>> h.resume_training()
            Traceback (most recent call last):
                ...
            RuntimeError: no train() call is left unfinished (remaining_epochs is 0): call train(epochs)
        """
        if self.remaining_epochs == 0:
            raise RuntimeError(
                "no train() call is left unfinished (remaining_epochs is 0): call train(epochs)"
            )
        self.train(epochs=self.remaining_epochs, **overrides)

    @classmethod
    def load(
        cls,
        path: str,
        device: torch.device | str | None = None,
        strict_load: bool = False,
        skip_optimizer: bool = False,
        skip_scheduler: bool = False,
        skip_history: bool = False,
        skip_callbacks: bool = False,
        skip_sampler_sde: bool = False,
        skip_ema: bool = False,
        trust_model_code: bool = False,
        trusted: Sequence[Any] | None = None,
        trust_modules: Sequence[str] | str | None = None,
        strategy: str | None = None,
        fsdp: dict[str, Any] | None = None,
    ) -> NNHandler:
        """Rebuild a working handler from a file written by :meth:`save`, or a folder.

        ``strategy="fsdp"`` (and ``fsdp={...}``) loads an ordinary file (single-process, DDP
        or ``full=True``) into a sharded run under torchrun: each rank takes its shards. A
        sharded checkpoint folder (saved under FSDP) loads on any number of ranks or in one
        process; it restores FSDP (its options, or ``fsdp``) unless ``strategy="ddp"``.

        ``skip_*`` leave that part at its fresh default. Stored model source is executed
        only with ``trust_model_code=True`` (when the class can no longer be imported).
        In DDP every rank loads onto its own device. The file is data: it selects from nnh's
        registry (torch losses, optimizers, schedulers, nnh callbacks, SDEs, torchmetrics)
        and never supplies code or authority (:mod:`nnh.handler.loading`). Your own classes
        and functions are restored when the file is your own (signed with your key, as every
        file you save is) or when you vouch for them in this call: ``trusted=[MyCallback,
        my_loss]`` or ``trust_modules=("mypkg",)``; otherwise they are dropped with one
        warning. With ``strict_load=False`` missing or unexpected weights are listed in a
        warning.

        Example:
            >>> from torch.utils.data import TensorDataset
            >>> h = NNHandler(nn.Linear, in_features=2, out_features=1, model_type="regression")
            >>> h.set_optimizer(torch.optim.SGD, lr=0.1); h.set_loss_fn(nn.functional.mse_loss)
            >>> h.set_train_loader(TensorDataset(torch.randn(8, 2), torch.randn(8, 1)), batch_size=4)
            >>> import os, tempfile
            >>> path = os.path.join(tempfile.mkdtemp(), "run.pth")
            >>> h.save(path)
            >>> g = NNHandler.load(path, skip_optimizer=True)
            >>> torch.equal(g.module.weight, h.module.weight), len(g.optimizer.state)
            (True, 0)
        """
        options = {k: v for k, v in locals().items() if k not in ("cls", "path")}
        from nnh.handler.loading import load_handler

        return load_handler(cls, path, **options)

    @classmethod
    def initialize_from_checkpoint(
        cls,
        checkpoint_path: str,
        model_class: type[nn.Module],
        model_type: ModelType | str | None = None,
        device: torch.device | str | None = None,
        strict_load: bool = True,
        **model_kwargs: Any,
    ) -> NNHandler:
        """A new handler with only the model weights of ``checkpoint_path`` (a bare
        ``state_dict`` or a full checkpoint); no optimizer, history or the rest.
        ``strategy="fsdp", fsdp={...}`` among the keywords: each rank takes its shards.

        Example:
            >>> h = NNHandler(nn.Linear, in_features=2, out_features=1, model_type="regression")
            >>> import os, tempfile
            >>> path = os.path.join(tempfile.mkdtemp(), "weights.pth")
            >>> torch.save(h.module.state_dict(), path)
            >>> g = NNHandler.initialize_from_checkpoint(path, nn.Linear, in_features=2, out_features=1)
            >>> torch.equal(g.module.weight, h.module.weight), g.optimizer is None
            (True, True)
        """
        from nnh.handler.loading import initialize_handler

        return initialize_handler(
            cls, checkpoint_path, model_class, model_type, device, strict_load, model_kwargs
        )

    # ------------------------------------------------------------------ evaluation
    def eval(self, activate: bool = True, log: bool = True) -> None:
        """Evaluation mode (``activate=True``) or training mode; kept-eval modules stay eval.

        Example:
            >>> h = NNHandler(nn.Linear, in_features=2, out_features=1, model_type="regression")
            >>> h.eval(); h.module.training
            False
        """
        if activate:
            self.module.eval()
        else:
            train_mode(self)
        if log:
            self._log(f"model set to {'eval' if activate else 'train'} mode")

    def keep_eval_on_module(self, module: nn.Module, activate: bool = True) -> None:
        """Keep ``module`` in eval mode through training (``activate=False`` releases it).

        Example:
            >>> h = NNHandler(nn.Sequential, model_type="regression")
            >>> bn = nn.BatchNorm1d(2)
            >>> h.keep_eval_on_module(bn); h.eval(activate=False); bn.training
            False
        """
        if not isinstance(module, nn.Module):
            raise TypeError(f"expected an nn.Module, got {type(module).__name__}")
        if activate:
            if not any(m is module for m in self._keep_eval):
                self._keep_eval.append(module)
            module.eval()
        else:
            self._keep_eval = [m for m in self._keep_eval if m is not module]

    def freeze_module(self, module: nn.Module, verbose: bool = False) -> None:
        """``requires_grad = False`` for every parameter of ``module``.

        Example:
            >>> h = NNHandler(nn.Linear, in_features=2, out_features=1, model_type="regression")
            >>> h.freeze_module(h.module); h.count_parameters()
            0
        """
        if not isinstance(module, nn.Module):
            raise TypeError(f"expected an nn.Module, got {type(module).__name__}")
        count = 0
        for p in module.parameters():
            p.requires_grad_(False)
            count += p.numel()
        if verbose:
            message = f"froze {count} parameters of {type(module).__name__}"
            self._log(message)
            if self._logger is None and self._dist.is_main:
                print(message)

    def predict(
        self, data_loader: DataLoader | Dataset, apply_ema: bool = True
    ) -> list[Any] | None:
        """Model outputs for every batch of ``data_loader`` (eval mode, no gradients).

        Batches are ``(input, [target], *extra)`` like in training (a lone tensor is the
        input). EMA weights are used when ``apply_ema`` and EMA exists, then restored. In DDP,
        rank 0 returns the outputs of every sample once, in dataset order; other ranks None.

        Example:
            >>> from torch.utils.data import TensorDataset
            >>> h = NNHandler(nn.Linear, in_features=2, out_features=1, model_type="regression")
            >>> h.set_optimizer(torch.optim.SGD, lr=0.1); h.set_loss_fn(nn.functional.mse_loss)
            >>> h.set_train_loader(TensorDataset(torch.randn(8, 2), torch.randn(8, 1)), batch_size=4)
            >>> outputs = h.predict(h.train_loader)
            >>> len(outputs), outputs[0].shape
            (2, torch.Size([4, 1]))
        """
        return inference.predict(self, data_loader, apply_ema)

    def evaluate(
        self, loader: DataLoader | Dataset | None = None, apply_ema: bool = True
    ) -> dict[str, float]:
        """Loss and every metric over ``loader`` (default: the validation loader).

        Exact sample-weighted means over every sample once; under DDP every rank gets the
        same numbers. EMA weights are used when ``apply_ema`` and EMA exists (then
        restored); ``train()``'s logged ``val_*`` values use the live weights, so
        ``evaluate(apply_ema=False)`` reproduces them for the same weights.

        Example:
            >>> from torch.utils.data import TensorDataset
            >>> h = NNHandler(nn.Linear, in_features=2, out_features=1, model_type="regression")
            >>> h.set_optimizer(torch.optim.SGD, lr=0.1); h.set_loss_fn(nn.functional.mse_loss)
            >>> h.set_val_loader(TensorDataset(torch.randn(8, 2), torch.randn(8, 1)), batch_size=4)
            >>> sorted(h.evaluate())
            ['loss']
        """
        return inference.evaluate(self, loader, apply_ema)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Forward pass through the model: ``handler(x)``.

        Example:
            >>> h = NNHandler(nn.Linear, in_features=2, out_features=1, model_type="regression")
            >>> h(torch.zeros(4, 2)).shape
            torch.Size([4, 1])
        """
        if self._model is None:
            raise RuntimeError("no model is set; call set_model first")
        return self._model(*args, **kwargs)

    # ------------------------------------------------------------------ generative models
    def set_sde(self, sde_class: type, **sde_kwargs: Any) -> None:
        """Use ``sde_class(**sde_kwargs)`` (e.g. ``VPSDE``) for score-based training and sampling.

        Example:
            >>> from nnh.generative import VPSDE
            >>> h = NNHandler(nn.Linear, in_features=2, out_features=1, model_type="regression")
            >>> h.set_sde(VPSDE, beta_max=10.0)
            >>> h.sde.beta_max
            10.0
        """
        try:
            self.sde = sde_class(**sde_kwargs)
        except TypeError as err:
            raise TypeError(
                f"{getattr(sde_class, '__name__', sde_class)} cannot be built with "
                f"{sorted(sde_kwargs)}: {err}"
            ) from err

    def set_sampler(self, sampler_class: type, **sampler_kwargs: Any) -> None:
        """Use ``sampler_class(**sampler_kwargs)`` (a :class:`nnh.Sampler`) for ``get_samples``.

        Example:
            >>> from nnh.generative.sampler import Sampler
            >>> class Zeros(Sampler):
            ...     def sample(self, N, device=None):
            ...         return torch.zeros(N, 2)
            >>> h = NNHandler(nn.Linear, in_features=2, out_features=1, model_type="regression")
            >>> h.set_sampler(Zeros); h.get_samples(3).shape
            torch.Size([3, 2])
        """
        try:
            self.sampler = sampler_class(**sampler_kwargs)
        except TypeError as err:
            raise TypeError(
                f"{getattr(sampler_class, '__name__', sampler_class)} cannot be built with "
                f"{sorted(sampler_kwargs)}: {err}"
            ) from err

    def get_samples(self, N: int, device: torch.device | str | None = None) -> Any:
        """``N`` samples from the custom sampler (rank 0; ``None`` on other ranks).

        Example:
            >>> from nnh.generative.sampler import Sampler
            >>> class Ones(Sampler):
            ...     def sample(self, N, device=None):
            ...         return torch.ones(N)
            >>> h = NNHandler(nn.Linear, in_features=2, out_features=1, model_type="regression")
            >>> h.set_sampler(Ones); h.get_samples(2).tolist()
            [1.0, 1.0]
        """
        if self._sampler is None:
            raise RuntimeError("no sampler: call set_sampler(SamplerClass, **kwargs) first")
        if not self._dist.is_main:
            return None
        from nnh.handler.generation import rank_local

        with rank_local():  # a sampler calling self.sample on rank 0 alone must not wait for peers
            return self._sampler.sample(N, device=device if device is not None else self._device)

    def _require_sde(self, what: str) -> Any:
        if self._sde is None:
            raise RuntimeError(
                f"{what} needs an SDE: call set_sde(VPSDE, ...) (or VESDE, SubVPSDE) first"
            )
        return self._sde

    def score(self, t: torch.Tensor, x: torch.Tensor, *args: Any) -> torch.Tensor:
        """``s(t, x) = model(t, x, *args) / sigma(t)``: the model outputs sigma(t) times the score.

        Example:
            >>> from nnh.generative import VPSDE
            >>> class Zero(nn.Module):
            ...     def __init__(self):
            ...         super().__init__()
            ...         self.w = nn.Parameter(torch.zeros(()))
            ...     def forward(self, t, x):
            ...         return self.w * x
            >>> h = NNHandler(Zero, model_type="score_based"); h.set_sde(VPSDE)
            >>> h.score(torch.full((3,), 0.5), torch.ones(3, 2)).abs().sum().item()
            0.0
        """
        from nnh.generative.sde import as_time_tensor, expand_time

        sde = self._require_sde("score")
        t = as_time_tensor(t, x)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        return self._inference_model()(t, x, *args) / expand_time(sde.sigma(t), x)

    def sample(
        self,
        shape: tuple[int, ...],
        steps: int,
        condition: list | None = None,
        likelihood_score_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        guidance_factor: float = 1.0,
        apply_ema: bool = True,
        bar: bool = True,
        stop_on_NaN: bool = True,
        method: str = "em",
        ode_method: str = "Heun",
        corrector_steps: int = 1,
        snr: float = 0.16,
        denoise: bool = False,
        time_grid: str = "uniform",
        data_scale: float | None = None,
    ) -> torch.Tensor | None:
        """Samples ``shape`` from the model: reverse-SDE ``"em"``, predictor-corrector ``"pc"`` or ``"ode"``.

        ``condition`` items go to the model after ``(t, x)``; ``likelihood_score_fn(t, x)``
        adds ``guidance_factor`` times its value to the score (every method). ``"em"``
        (default): Euler-Maruyama, one model call per step, the last step noise-free.
        ``"pc"``: ``corrector_steps`` Langevin steps (``snr``) before each EM step.
        ``"ode"``: the probability-flow ODE with ``ode_method`` (``"Euler"``, ``"Heun"``,
        ``"RK4"``, or the one-call-per-step ``"dpm++2m"``/``"dpm++3m"``/``"unipc"``). ``time_grid``:
        ``"uniform"``, ``"edm"`` or ``"logsnr"``; names are case-insensitive; ``denoise``
        (a bool): a final Tweedie step. ``data_scale``: the data's per-coordinate std, moving the
        noise-level grids' first step (see :mod:`nnh.generative.time_grid`). Noise comes from the global generator (seed it with ``handler.seed``). Under
        DDP every rank must call it: the ``shape[0]`` samples are split across ranks and
        rank 0 returns all of them, the others ``None``. See :mod:`nnh.handler.generation`.

        Example:
            >>> from nnh.generative import VPSDE
            >>> class Zero(nn.Module):
            ...     def __init__(self):
            ...         super().__init__()
            ...         self.w = nn.Parameter(torch.zeros(()))
            ...     def forward(self, t, x):
            ...         return self.w * x
            >>> h = NNHandler(Zero, model_type="score_based"); h.set_sde(VPSDE)
            >>> h.sample((5, 2), steps=10, bar=False).shape
            torch.Size([5, 2])
            >>> h.sample((5, 2), steps=10, bar=False, method="ode", time_grid="edm").shape
            torch.Size([5, 2])
        """
        options = {k: v for k, v in locals().items() if k != "self"}
        from nnh.handler.generation import handler_sample

        return handler_sample(self, **options)

    def log_likelihood(
        self,
        x: torch.Tensor | Dataset | DataLoader,
        *args: Any,
        ode_steps: int | None = None,
        n_cotangent_vectors: int = 1,
        noise_type: str = "rademacher",
        method: str = "Euler",
        t0: float | None = None,
        t1: float | None = None,
        apply_ema: bool = True,
        pbar: bool = False,
        verbose: int | bool | None = None,
        fresh_probes: bool = True,
        differentiable: bool = False,
        divergence: str = "hutchinson",
        rtol: float = 1e-5,
        atol: float = 1e-5,
    ) -> torch.Tensor | None:
        """log p(x) in nats per sample via the probability-flow ODE and Hutchinson's estimator.

        ``x``: a tensor ``[B, ...]`` (rank 0 only; ``None`` elsewhere) or a ``Dataset`` /
        ``DataLoader`` of ``x`` or ``(x, *condition)`` batches, sharded across ranks under DDP
        and returned on rank 0 as one tensor in dataset order (every rank must call).
        ``n_cotangent_vectors`` probes of ``noise_type`` (``'rademacher'`` or ``'gaussian'``;
        ``'exact'`` for the exact divergence) are drawn afresh at every ODE step (``fresh_probes=False``: once, for the whole
        trajectory), all batched in one vector-Jacobian product per drift evaluation.
        ``method`` (any case): ``'Euler'`` (``ode_steps`` evaluations), ``'Heun'`` (``2 * ode_steps``),
        ``'RK4'`` (``4 * ode_steps``) or ``'dopri5'`` (adaptive to ``rtol``/``atol``, ``ode_steps``
        = the most step attempts, default 1000). ``divergence='exact'``: the exact trace (samples
        of <= 256 entries). ``t0``/``t1`` (numbers or 0-d tensors) default to ``sde.epsilon``/``sde.T``.
        ``verbose`` (score_models' keyword) overrides ``pbar``. Memory does not grow with
        ``ode_steps``; ``differentiable=True`` keeps the graph (use ``apply_ema=False``).
        See :mod:`nnh.handler.generation`.

        Example:
            >>> from nnh.generative import VPSDE
            >>> class Zero(nn.Module):
            ...     def __init__(self):
            ...         super().__init__()
            ...         self.w = nn.Parameter(torch.zeros(()))
            ...     def forward(self, t, x):
            ...         return self.w * x
            >>> h = NNHandler(Zero, model_type="score_based"); h.set_sde(VPSDE)
            >>> h.log_likelihood(torch.zeros(3, 2), ode_steps=4, method="Heun").shape
            torch.Size([3])
        """
        options = {k: v for k, v in locals().items() if k not in ("self", "x", "args")}
        from nnh.handler.generation import handler_log_likelihood

        return handler_log_likelihood(self, x, args, **options)

    # ------------------------------------------------------------------ utilities
    def compile_model(self, **kwargs: Any) -> None:
        """``torch.compile`` the model (options as keywords); ``module`` stays the plain one.

        Example:
            >>> h = NNHandler(nn.Linear, in_features=2, out_features=1, model_type="regression")
            >>> h.compile_model(backend="eager")
            >>> h.model is not h.module
            True
        """
        if not hasattr(torch, "compile"):
            raise RuntimeError("torch.compile needs PyTorch 2.0 or newer")
        if self._ensemble is not None:
            raise RuntimeError("compile_model does not support ensembles (ensemble_size=...) yet")
        self._model = torch.compile(self._model, **kwargs)
        self._compile_kwargs = dict(kwargs)
        self._log(f"model compiled with {kwargs or 'default options'}")

    def count_parameters(self, trainable_only: bool = True) -> int:
        """Number of (trainable) parameters of the plain module.

        Example:
            >>> h = NNHandler(nn.Linear, in_features=2, out_features=1, model_type="regression")
            >>> h.count_parameters(), h.count_parameters(trainable_only=False)
            (3, 3)
        """
        return sum(
            p.numel() for p in self.module.parameters() if p.requires_grad or not trainable_only
        )

    def plot_losses(self, log_y_scale: bool = False, save_path: str | None = None) -> Any:
        """Training and validation loss per epoch (rank 0; returns the Figure).

        Example:
            >>> from torch.utils.data import TensorDataset
            >>> h = NNHandler(nn.Linear, in_features=2, out_features=1, model_type="regression")
            >>> h.set_optimizer(torch.optim.SGD, lr=0.1); h.set_loss_fn(nn.functional.mse_loss)
            >>> h.set_train_loader(TensorDataset(torch.randn(8, 2), torch.randn(8, 1)), batch_size=4)
            >>> h.train(epochs=2, progress_bar=False)
            >>> h.plot_losses(log_y_scale=True).axes[0].get_yscale()
            'log'
        """
        if not self._dist.is_main:
            return None
        from nnh.handler.plotting import plot_losses

        return plot_losses(self._history, log_y_scale=log_y_scale, save_path=save_path)

    def plot_metrics(self, log_y_scale: bool = False, save_path_prefix: str | None = None) -> Any:
        """One figure per metric, training and validation (rank 0; returns the Figures).

        Example:
            >>> from torch.utils.data import TensorDataset
            >>> h = NNHandler(nn.Linear, in_features=2, out_features=1, model_type="regression")
            >>> h.set_optimizer(torch.optim.SGD, lr=0.1); h.set_loss_fn(nn.functional.mse_loss)
            >>> h.set_train_loader(TensorDataset(torch.randn(8, 2), torch.randn(8, 1)), batch_size=4)
            >>> h.add_metric("mae", lambda out, y: (out - y).abs().mean())
            >>> h.train(epochs=2, progress_bar=False)
            >>> sorted(h.plot_metrics())
            ['mae']
        """
        if not self._dist.is_main:
            return None
        from nnh.handler.plotting import plot_metrics

        return plot_metrics(
            self._history, log_y_scale=log_y_scale, save_path_prefix=save_path_prefix
        )

    def print(self, show_model_structure: bool = False) -> str:
        """A summary of the handler's configuration and progress, **returned** as text (it
        does not print; ``print(handler.print())`` shows it): model, parameters, optimizer,
        scheduler, loss, metrics, callbacks, data, progress, and the last epoch's training
        and validation loss and metrics.

        Example:
            >>> h = NNHandler(nn.Linear, in_features=2, out_features=1, model_type="regression")
            >>> "Linear" in h.print()
            True
        """
        from nnh.handler.summary import summarize

        return summarize(self, show_model_structure=show_model_structure)

    def __repr__(self) -> str:
        name = type(self._module).__name__ if self._module is not None else None
        epochs = self._state.epoch if self._state is not None else len(self._history.train_losses)
        return f"NNHandler(model={name}, type={self._model_type.value}, device={self._device}, epochs={epochs})"
