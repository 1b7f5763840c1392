"""``NNHandler``: the stateful shell around the pure core.

The handler owns the outside world — the model object and its device, DDP, data loaders,
the optimizer and scheduler objects, callbacks, logging, progress bars and files — and
threads a :class:`nnh.core.TrainState` through the core's step functions. It holds no
training arithmetic of its own.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import attrs
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

from nnh.callbacks.base import Callback, CallbackList
from nnh.checkpoint.background import BackgroundWriter, SaveHandle
from nnh.checkpoint.ownership import new_run_id
from nnh.checkpoint.shapes import check_meta_model
from nnh.core import (
    LossScaler,
    OptimizerAdapter,
    Supervised,
    TrainConfig,
    TrainState,
    init_train_state,
)
from nnh.core.accumulate import pack_sums
from nnh.core.ensemble import EnsembleConfig, check_vectorisable
from nnh.core.objectives import batch_size
from nnh.core.tree import flat_td
from nnh.distributed import DEFAULT_DIST_TIMEOUT_S, setup_distributed
from nnh.distributed.ddp import ShardCounter, real_samples, trim_batch
from nnh.handler import validation as check
from nnh.handler.autosaver import AutoSaver
from nnh.handler.data import build_loader, fast_loader, move_to_device
from nnh.handler.devices import check_device
from nnh.handler.ensemble import Ensemble, check_ensemble_size, gather_member_predictions
from nnh.handler.enums import LoggingMode, ModelType
from nnh.handler.foreign_data import guard_restored_data
from nnh.handler.history import History
from nnh.handler.logs import make_logger
from nnh.handler.metric_objects import as_handler_metric
from nnh.handler.persistence import capture_rng, restore_rng
from nnh.handler.saving import (
    check_resume_batch_size,
    raise_save_failures,
    submit_checkpoint,
    wait_for_saves,
    write_checkpoint,
    write_step_checkpoint,
)
from nnh.handler.seeding import check_seed, model_kwargs_with_seed, seed_everything
from nnh.handler.train_options import remembers_train_options
from nnh.handler.training import epoch_means, run_train_epoch, run_val_epoch

__all__ = ["NNHandler"]

# While NNHandler.load builds a handler, (the checkpoint's weights, its path): the model is
# built on the meta device and checked against them before any allocation; one whose
# parameters and buffers all come from the file receives them directly (no init, no copy).
_CHECKPOINT_TENSORS: contextvars.ContextVar[tuple[Any, str] | None] = contextvars.ContextVar(
    "nnh_checkpoint_tensors", default=None
)


def _check_model_kwargs(model_class: type, model_kwargs: dict[str, Any]) -> None:
    if not (isinstance(model_class, type) and issubclass(model_class, nn.Module)):
        raise TypeError(f"model_class must be an nn.Module subclass, got {model_class!r}")
    try:
        inspect.signature(model_class).bind(**model_kwargs)
    except TypeError as err:
        try:
            accepted = str(inspect.signature(model_class))
        except (TypeError, ValueError):
            accepted = "(unknown)"
        raise TypeError(
            f"{model_class.__name__} cannot be built with keyword arguments {sorted(model_kwargs)}: "
            f"{err}. Its constructor takes {accepted}"
        ) from None


class NNHandler:
    """A model's whole life: build, train, evaluate, predict, save, load, sample.

    ``dist_timeout``: seconds a DDP collective waits for the other ranks (default 1800).

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
        **model_kwargs: Any,
    ):
        _check_model_kwargs(model_class, model_kwargs)
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
        self._module: nn.Module | None = None
        self._model: nn.Module | None = None
        self._model_class: type[nn.Module] | None = None
        self._model_kwargs: dict[str, Any] = {}
        self._save_model_code = save_model_code
        self._compile_kwargs: dict[str, Any] | None = None
        self._optimizer_spec: tuple[type[torch.optim.Optimizer], dict[str, Any]] | None = None
        self._adapter: OptimizerAdapter | None = None
        self._scheduler_spec: tuple[type, dict[str, Any]] | None = None
        self._scheduler: Any = None
        self._loss_fn: Callable[..., torch.Tensor] | None = None
        self._loss_fn_kwargs: dict[str, Any] = {}
        self._pass_epoch_to_loss = False
        self._train_loader: DataLoader | None = None
        self._val_loader: DataLoader | None = None
        self._loader_kwargs: dict[str, dict[str, Any]] = {}
        self._metrics: dict[str, Callable[[Any, Any], Any]] = {}
        self._callbacks: list[Callback] = []
        self._history = History()
        self._state: TrainState | None = None
        self._loss_scaler_config = LossScaler()
        self._keep_eval: list[nn.Module] = []
        self._sde: Any = None
        self._sampler: Any = None
        self._auto_saver = AutoSaver()
        self._last_train_kwargs: dict[str, Any] | None = None
        self._resume: dict[str, Any] | None = None
        self._epoch_start_rng: dict[str, Any] | None = None
        self._target_epoch = 0
        self._run_id = new_run_id()
        self._saves: BackgroundWriter | None = None
        self.stop_training = False
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
        import warnings

        if self._dist.is_main:
            warnings.warn(message, stacklevel=3)
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
        if value is not None:
            missing = [
                m
                for m in (
                    "sigma",
                    "mu",
                    "drift",
                    "diffusion",
                    "prior",
                    "prior_log_prob",
                    "marginal_prob",
                )
                if not callable(getattr(value, m, None))
            ]
            if missing or not hasattr(value, "T") or not hasattr(value, "epsilon"):
                raise TypeError(
                    f"{type(value).__name__} is not an SDE: it lacks {missing or ['T', 'epsilon']}; "
                    "use nnh.generative.VESDE/VPSDE/SubVPSDE or a subclass of nnh.generative.SDE"
                )
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
        _check_model_kwargs(model_class, model_kwargs)
        if model_type is not None:
            self._model_type = ModelType.from_string(model_type)
        module = self._build_module(model_class, model_kwargs)
        self._model_class, self._model_kwargs = model_class, dict(model_kwargs)
        self._save_model_code = bool(save_model_code)
        self._install_module(module)

    def _build_module(
        self, model_class: type[nn.Module], model_kwargs: dict[str, Any]
    ) -> nn.Module:
        supplied = _CHECKPOINT_TENSORS.get()
        if supplied is not None:  # loading: shapes are checked before any allocation
            try:
                with torch.device("meta"):
                    module = self._construct(model_class, model_kwargs)
            except Exception:  # a constructor that needs real tensors: built for real below
                module = None
            if module is not None and check_meta_model(module, *supplied):
                module._nnh_meta_init = True  # type: ignore[attr-defined]
                return module  # every tensor comes from the checkpoint: no init needed
        return self._construct(model_class, model_kwargs).to(self._device)

    def _construct(self, model_class: type[nn.Module], model_kwargs: dict[str, Any]) -> nn.Module:
        if self._ensemble is None:
            return model_class(**model_kwargs)
        return self._ensemble.build(model_class, model_kwargs)

    def _install_module(self, module: nn.Module) -> None:
        self._module = module
        # a meta-built module is wrapped once NNHandler.load has assigned its weights
        self._model = module if getattr(module, "_nnh_meta_init", False) else self._wrap(module)
        self._compile_kwargs = None
        self._state = None
        self._keep_eval = []
        if self._optimizer_spec is not None:
            cls, kwargs = self._optimizer_spec
            self.set_optimizer(cls, **kwargs)
        if self._scheduler_spec is not None:
            cls, kwargs = self._scheduler_spec
            self.set_scheduler(cls, **kwargs)

    def _wrap(self, module: nn.Module) -> nn.Module:
        if not self._dist.enabled:
            return module
        if not any(p.requires_grad for p in module.parameters()):
            return module
        device_ids = [self._device.index] if self._device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=device_ids)

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

    def _make_loader(
        self, which: str, dataset: Dataset | DataLoader, loader_kwargs: dict[str, Any]
    ) -> DataLoader:
        kwargs = dict(loader_kwargs)
        sampler = kwargs.pop("sampler", None)
        if (
            sampler is None
            and self._dist.enabled
            and not isinstance(dataset, DataLoader)
            and "batch_sampler" not in kwargs
        ):
            sampler = DistributedSampler(
                dataset,
                num_replicas=self._dist.world_size,
                rank=self._dist.rank,
                shuffle=bool(kwargs.get("shuffle", False)),
                seed=self._seed if self._seed is not None else 0,
                drop_last=bool(kwargs.get("drop_last", False)),
            )
        loader = build_loader(dataset, sampler=sampler, **kwargs)
        self._loader_kwargs[which] = dict(loader_kwargs)
        return loader

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
        loader = self._make_loader("train", check.check_dataset("dataset", dataset), loader_kwargs)
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
        loader = self._make_loader("val", check.check_dataset("dataset", dataset), loader_kwargs)
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

    # ------------------------------------------------------------------ training
    def _objective(self) -> Callable[..., Any]:
        if self._model_type is ModelType.SCORE_BASED:
            from nnh.generative.objective import ScoreMatching, UserScoreLoss

            if self._loss_fn is not None:
                return UserScoreLoss(
                    self._loss_fn, self._sde, self._loss_fn_kwargs, self._pass_epoch_to_loss
                )
            if self._sde is None:
                raise RuntimeError(
                    "a SCORE_BASED model trains against an SDE: call set_sde(VPSDE, ...) "
                    "before train(), or set_loss_fn(your_loss)"
                )
            return ScoreMatching(self._sde)
        if self._loss_fn is None:
            raise RuntimeError("no loss function: call set_loss_fn(loss_fn) before train()")
        return Supervised(
            self._loss_fn,
            loss_kwargs=self._loss_fn_kwargs,
            pass_epoch=self._pass_epoch_to_loss,
            inputs_are_targets=self._model_type.inputs_are_targets,
        )

    def _amp_dtype(self, use_amp: bool | str | torch.dtype) -> torch.dtype | None:
        if use_amp is False or use_amp is None:
            return None
        if isinstance(use_amp, torch.dtype):
            return use_amp
        if isinstance(use_amp, str):
            table = {
                "bf16": torch.bfloat16,
                "bfloat16": torch.bfloat16,
                "fp16": torch.float16,
                "float16": torch.float16,
            }
            if use_amp.lower() not in table:
                raise ValueError(f"use_amp={use_amp!r}: use True, False, 'bf16' or 'fp16'")
            return table[use_amp.lower()]
        return torch.float16 if self._device.type == "cuda" else torch.bfloat16

    def _ensure_state(self, ema: bool, scaler: bool) -> TrainState:
        if self._adapter is None:
            raise RuntimeError(
                "no optimizer: call set_optimizer(optimizer_class, **kwargs) before train()"
            )
        state = self._state
        if state is not None:
            live = [id(p) for p in self.module.parameters()]
            if live != [id(p) for p in state.params.values()]:
                self._warn(
                    "the model's parameters were replaced since the last training; "
                    "rebuilding the optimizer and training state"
                )
                cls, kwargs = self._optimizer_spec  # type: ignore[misc]
                self._adapter = OptimizerAdapter.create(cls, self.module, **kwargs)
                state = None
        if state is None:
            state = init_train_state(
                self.module,
                self._adapter,
                ema=ema,
                loss_scaler=self._loss_scaler_config if scaler else None,
            )
        if ema and state.ema is None:
            state = attrs.evolve(
                state, ema=flat_td({k: v.detach().clone() for k, v in state.params.items()})
            )
        elif not ema and state.ema is not None:
            self._warn(
                "train(ema_decay=0) discards the EMA weights this handler holds; pass "
                "ema_decay=<the previous decay> (or leave it out) to keep them"
            )
            state = attrs.evolve(state, ema=None)
        if scaler and state.scaler is None:
            from nnh.core import init_scaler_state

            state = attrs.evolve(
                state, scaler=init_scaler_state(self._loss_scaler_config, self._device)
            )
        elif not scaler and state.scaler is not None:
            state = attrs.evolve(state, scaler=None)
        self._state = state
        return state

    def _train_config(self, **settings: Any) -> TrainConfig:
        """The core's static configuration; reused while nothing it depends on changed, so
        repeated ``train()`` calls do not rebuild the module binding."""
        objective = self._objective()
        key = (
            id(self._model),
            id(self.module),
            id(self._adapter),
            type(objective),
            id(getattr(objective, "loss_fn", None)),
            id(self._loss_fn_kwargs),
            self._pass_epoch_to_loss,
            id(self._sde),
            self._model_type,
            tuple(sorted(settings.items(), key=lambda kv: kv[0])),
        )
        cached = getattr(self, "_config_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        config = (TrainConfig if self._ensemble is None else EnsembleConfig)(
            model=self._model,
            module=self.module,
            optimizer=self._adapter,
            objective=objective,
            **settings,
        )
        self._config_cache = (key, config)
        return config

    def _check_ready(self) -> None:
        if self._train_loader is None:
            raise RuntimeError(
                "no training data: call set_train_loader(dataset, batch_size=...) before train()"
            )
        if self._adapter is None:
            raise RuntimeError(
                "no optimizer: call set_optimizer(optimizer_class, **kwargs) before train()"
            )
        self._objective()

    def _train_mode(self) -> None:
        self.module.train()
        for m in self._keep_eval:
            m.eval()

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
        check.check_train_args(**{k: v for k, v in locals().items() if k != "self"})
        self._check_ready()
        raise_save_failures(self)
        if self._resume is not None:
            check_resume_batch_size(self._resume, self._train_loader)
        self._last_train_kwargs = {
            "validate_every": validate_every,
            "gradient_accumulation_steps": gradient_accumulation_steps,
            "use_amp": use_amp if isinstance(use_amp, (bool, str)) else str(use_amp).split(".")[-1],
            "gradient_clipping_norm": gradient_clipping_norm,
            "ema_decay": float(ema_decay),
            "progress_bar": progress_bar,
            "debug_print_interval": debug_print_interval,
            "save_on_last_epoch": save_on_last_epoch,
            "epoch_train_and_val_pbar": epoch_train_and_val_pbar,
        }
        amp_dtype = self._amp_dtype(use_amp)
        use_scaler = amp_dtype is torch.float16
        if seed is not None and self._resume is None:
            self.seed = seed
        state = self._ensure_state(ema=ema_decay > 0, scaler=use_scaler)
        config = self._train_config(
            accumulation_steps=gradient_accumulation_steps,
            clip_norm=gradient_clipping_norm,
            amp_dtype=amp_dtype,
            loss_scaler=self._loss_scaler_config if use_scaler else None,
            ema_decay=float(ema_decay),
        )
        self._auto_saver.check_name(self._log_keys())
        self.stop_training = False
        callbacks = CallbackList(self._callbacks, is_main=self._dist.is_main)
        show = progress_bar and self._dist.is_main
        start_epoch, history_at_start = state.epoch, len(self._history.train_losses)
        self._target_epoch = start_epoch + epochs
        self._log(
            f"training epochs {start_epoch + 1}..{start_epoch + epochs} "
            f"(accumulation {gradient_accumulation_steps}, amp {amp_dtype}, clip {gradient_clipping_norm}, "
            f"ema {ema_decay})"
        )
        callbacks.call("on_train_begin", {"epochs": epochs, "start_epoch": start_epoch})
        epoch_bar = tqdm(
            total=epochs, desc="Epochs", unit="epoch", disable=not show, dynamic_ncols=True
        )
        logs: dict[str, Any] = {}
        try:
            for i in range(epochs):
                epoch = start_epoch + i + 1
                logs = self._run_epoch(
                    state_config=config,
                    epoch=epoch,
                    callbacks=callbacks,
                    validate=(epoch % validate_every == 0),
                    epoch_bar=epoch_bar if show else None,
                    batch_bars=show and epoch_train_and_val_pbar,
                    debug_print_interval=debug_print_interval,
                    last=(i == epochs - 1),
                    save_on_last_epoch=save_on_last_epoch,
                )
                raise_save_failures(self)
                if show:
                    epoch_bar.update(1)
                    epoch_bar.set_postfix(
                        {
                            k: f"{v:.4g}"
                            for k, v in logs.items()
                            if k in ("loss", "val_loss") and not math.isnan(v)
                        },
                        refresh=False,
                    )
                if self._dist.any_true(self.stop_training, self._device):
                    self.stop_training = True
                    self._target_epoch = epoch  # the call is complete: nothing left to resume
                    self._log(f"training stopped by a callback after epoch {epoch}")
                    if i != epochs - 1:
                        self._auto_saver_final(logs, save_on_last_epoch)
                    break
            wait_for_saves(self)  # every background save is on disk before train() returns
        except BaseException as exc:
            self._drain_saves_after(exc)
            recorded = len(self._history.train_losses) - history_at_start
            self._state = check.epoch_matching_history(self._state, start_epoch, recorded)
            error = self._dist.fail(exc)
            if error is exc:
                raise
            raise error from exc
        finally:
            epoch_bar.close()
        callbacks.call("on_train_end", logs)

    def _run_epoch(
        self,
        *,
        state_config: TrainConfig,
        epoch: int,
        callbacks: CallbackList,
        validate: bool,
        epoch_bar: Any,
        batch_bars: bool,
        debug_print_interval: int | None,
        last: bool,
        save_on_last_epoch: bool,
    ) -> dict[str, Any]:
        assert self._state is not None and self._train_loader is not None
        config = state_config
        sampler = getattr(self._train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch - 1)
        resume, self._resume = self._resume, None
        if resume is not None and resume.get("epoch") != epoch:
            resume = None
        generator = getattr(self._train_loader, "generator", None)
        if not isinstance(generator, torch.Generator):
            generator = None
        if resume is not None:
            restore_rng(resume["epoch_start_rng"])
            loader_rng = resume["epoch_start_rng"].get("loader")
            if generator is not None and isinstance(loader_rng, torch.Tensor):
                generator.set_state(loader_rng)  # the loader's own shuffle replays too
        if self._auto_saver.every_n_steps:
            self._epoch_start_rng = capture_rng()
            if generator is not None:
                self._epoch_start_rng["loader"] = generator.get_state()
        if resume is None:
            callbacks.call("on_epoch_begin", epoch, {})
        self._train_mode()
        loader = fast_loader(self._train_loader)
        bar = (
            tqdm(total=len(loader), desc=f"Epoch {epoch} train", leave=False, dynamic_ncols=True)
            if batch_bars
            else None
        )
        uneven = (
            self._dist.enabled
            and isinstance(self._model, nn.parallel.DistributedDataParallel)
            and not isinstance(getattr(self._train_loader, "sampler", None), DistributedSampler)
        )
        join = self._model.join() if uneven else contextlib.nullcontext()
        try:
            with join:
                result = run_train_epoch(
                    self._state,
                    config,
                    loader,
                    device=self._device,
                    metrics=self._metrics,
                    callbacks=callbacks,
                    progress=bar,
                    status=bar if bar is not None else epoch_bar,
                    debug_print_interval=debug_print_interval,
                    log=self._log,
                    epoch_label=f"epoch {epoch}",
                    on_step=self._step_hook(epoch),
                    skip_batches=resume["batch_offset"] if resume else 0,
                    after_skip=(lambda: restore_rng(resume["step_rng"])) if resume else None,
                    initial_sums=resume["sums"] if resume else None,
                    real_samples=real_samples(self._train_loader),
                )
        finally:
            if bar is not None:
                bar.close()
        self._state = result.state
        packed = [pack_sums(result.sums)]
        val_result = None
        has_val = validate and self._val_loader is not None
        if has_val:
            callbacks.call("on_val_begin", {"epoch": epoch})
            val_result = self._validate(config, callbacks, batch_bars, epoch)
            packed.append(pack_sums(val_result.sums))
        flat = torch.cat(packed)
        self._dist.all_reduce_sum(flat)
        names = list(self._metrics)
        n_train = packed[0].numel()
        train_loss, train_metrics = epoch_means(flat[:n_train], self._metrics, "train")
        if not math.isfinite(train_loss):
            raise FloatingPointError(
                f"the training loss of epoch {epoch} is {train_loss} (on every rank): training diverged. "
                "Lower the learning rate, clip gradients (gradient_clipping_norm=...), or check the "
                "data and the loss function for inf/NaN"
            )
        logs: dict[str, Any] = {"epoch": epoch, "loss": train_loss, **train_metrics}
        val_loss, val_metrics = None, None
        if has_val:
            val_loss, val_metrics = epoch_means(flat[n_train:], self._metrics, "val")
            logs["val_loss"] = val_loss
            logs.update({f"val_{k}": v for k, v in val_metrics.items()})
            callbacks.call("on_val_end", dict(logs))
        self._history.append(train_loss, val_loss, train_metrics, val_metrics)
        if self._ensemble is not None:
            self._ensemble.record_epoch(flat, n_train, names, has_val)
        optimizer = self.optimizer
        if optimizer is not None:
            logs["lr"] = float(optimizer.param_groups[0]["lr"])  # the rate this epoch trained with
        self._step_scheduler(train_loss, val_loss)
        self._log(
            f"epoch {epoch}: " + ", ".join(f"{k}={v:.6g}" for k, v in logs.items() if k != "epoch")
        )
        callbacks.call("on_epoch_end", epoch, logs)
        self._auto_saver_epoch(epoch, logs, last and save_on_last_epoch)
        return logs

    def _validate(
        self, config: TrainConfig, callbacks: CallbackList, batch_bars: bool, epoch: int
    ) -> Any:
        assert self._val_loader is not None and self._state is not None
        loader = fast_loader(self._val_loader)
        bar = (
            tqdm(total=len(loader), desc=f"Epoch {epoch} val", leave=False, dynamic_ncols=True)
            if batch_bars
            else None
        )
        if self._dist.enabled:
            config = attrs.evolve(config, model=self._inference_model())
        self.module.eval()
        try:
            return run_val_epoch(
                self._state,
                config,
                loader,
                device=self._device,
                metrics=self._metrics,
                callbacks=callbacks,
                progress=bar,
                real_samples=real_samples(self._val_loader),
                loss_epoch=epoch - 1,
            )
        finally:
            if bar is not None:
                bar.close()
            self._train_mode()

    def _step_scheduler(self, train_loss: float, val_loss: float | None) -> None:
        if self._scheduler is None:
            return
        if isinstance(self._scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            if val_loss is not None:
                self._scheduler.step(val_loss)
            elif self._val_loader is None:
                self._scheduler.step(train_loss)
        else:
            self._scheduler.step()

    # ------------------------------------------------------------------ auto-saving
    def _step_hook(self, epoch: int) -> Callable[[TrainState, int, Any], None] | None:
        every = self._auto_saver.every_n_steps
        if not every:
            return None

        def on_step(state: TrainState, index: int, sums: Any) -> None:
            if (index + 1) % every:
                return
            self._state = state
            resume = {
                "epoch": epoch,
                "batch_offset": index + 1,
                "batch_size": getattr(self._train_loader, "batch_size", None),
                "epoch_start_rng": self._epoch_start_rng,
                "step_rng": capture_rng(),
                "sums": {"loss": sums.loss, "count": sums.count, "metrics": dict(sums.metrics)},
                "target_epoch": self._target_epoch,
            }
            saver = self._auto_saver
            write_step_checkpoint(self, str(saver.step_path()), resume=resume,
                                  guard_replace=saver.from_checkpoint, background=saver.async_save)  # fmt: skip

        return on_step

    def _auto_saver_epoch(self, epoch: int, logs: dict[str, Any], final: bool) -> None:
        saver = self._auto_saver
        due = saver.due(epoch, final)
        if due:
            self._save_auto(logs)

    def _auto_saver_final(self, logs: dict[str, Any], save_on_last_epoch: bool) -> None:
        if save_on_last_epoch and self._auto_saver.enabled:
            self._save_auto(logs)

    def _save_auto(self, logs: dict[str, Any]) -> None:
        saver = self._auto_saver
        path = saver.path_for(logs)
        # the file records itself as the last save, so a run resumed from it rotates it
        self._auto_saver = attrs.evolve(saver, last_saved=str(path))
        run_id = self._run_id
        try:
            if saver.async_save:  # the previous file goes once the new one is written
                submit_checkpoint(
                    self,
                    str(path),
                    guard_replace=saver.from_checkpoint,
                    after=lambda written: saver.remove_previous(written, run_id),
                    in_training=True,
                )
                return
            write_checkpoint(self, str(path), guard_replace=saver.from_checkpoint)
        except BaseException:
            self._auto_saver = saver
            raise
        if self._dist.is_main:
            saver.remove_previous(path, run_id)

    # ------------------------------------------------------------------ checkpoints
    def save(
        self, path: str, include_datasets: bool = True, blocking: bool = True
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
            return submit_checkpoint(self, path, include_datasets=include_datasets)
        write_checkpoint(self, path, include_datasets=include_datasets)
        return None

    def wait_for_saves(self, timeout: float | None = None) -> None:
        """Block until every background save of this handler is written; raise the first
        failure (a :class:`~nnh.checkpoint.CheckpointError` naming the file).

        Example:
            >>> h = NNHandler(nn.Linear, in_features=2, out_features=1, model_type="regression")
            >>> h.wait_for_saves()   # nothing pending: returns at once
        """
        wait_for_saves(self, timeout)

    def _drain_saves_after(self, exc: BaseException) -> None:
        """Finish pending background saves after ``exc`` stopped training; report, not raise,
        their failures (``exc`` is the error to surface)."""
        if self._saves is None:
            return
        for err in self._saves.wait():
            if err is not exc:
                self._log(f"a background save failed while training stopped: {err}", logging.ERROR)

    def _background_writer(self) -> BackgroundWriter:
        if self._saves is None:
            self._saves = BackgroundWriter()
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
    ) -> NNHandler:
        """Rebuild a working handler from a file written by :meth:`save`.

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
        from nnh.handler.loading import load_handler

        return load_handler(
            cls,
            path,
            device=device,
            strict_load=strict_load,
            skip_optimizer=skip_optimizer,
            skip_scheduler=skip_scheduler,
            skip_history=skip_history,
            skip_callbacks=skip_callbacks,
            skip_sampler_sde=skip_sampler_sde,
            skip_ema=skip_ema,
            trust_model_code=trust_model_code,
            trusted=trusted,
            trust_modules=trust_modules,
        )

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

        Example:
            >>> h = NNHandler(nn.Linear, in_features=2, out_features=1, model_type="regression")
            >>> import os, tempfile
            >>> path = os.path.join(tempfile.mkdtemp(), "weights.pth")
            >>> torch.save(h.module.state_dict(), path)
            >>> g = NNHandler.initialize_from_checkpoint(path, nn.Linear, in_features=2, out_features=1)
            >>> torch.equal(g.module.weight, h.module.weight), g.optimizer is None
            (True, True)
        """
        from nnh.checkpoint import load_model_state, load_weights_file, strip_wrapper_prefixes

        weights = load_weights_file(checkpoint_path, map_location="cpu")
        handler = cls(
            model_class,
            device=device if device is not None else "cpu",
            model_type=model_type if model_type is not None else ModelType.CLASSIFICATION,
            **model_kwargs,
        )
        load_model_state(
            handler.module,
            strip_wrapper_prefixes(weights),
            strict=strict_load,
            source=str(checkpoint_path),
        )
        handler._dist.barrier()
        return handler

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
            self._train_mode()
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

    @contextlib.contextmanager
    def _ema_weights(self, apply_ema: bool) -> Iterator[bool]:
        """Temporarily copy the EMA weights into the model; restores them bitwise after."""
        state = self._state
        if not apply_ema or state is None or state.ema is None:
            yield False
            return
        names = list(state.params.keys())
        live = [state.params[n] for n in names]
        backup = [p.detach().clone() for p in live]
        with torch.no_grad():
            torch._foreach_copy_(live, [state.ema[n] for n in names])
        try:
            yield True
        finally:
            with torch.no_grad():
                torch._foreach_copy_(live, backup)

    def _forward_batch(self, batch: Any) -> Any:
        model = self._inference_model()
        if isinstance(batch, torch.Tensor):
            return model(batch)
        if isinstance(batch, (list, tuple)):
            if self._model_type.inputs_are_targets:
                return model(*batch)
            return model(batch[0], *batch[2:])
        if isinstance(batch, dict):
            return model(**batch)
        return model(batch)

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
        raise_save_failures(self)
        check.check_predict_data(data_loader)
        if not isinstance(data_loader, DataLoader):
            data_loader = DataLoader(data_loader, batch_size=64)
        from nnh.distributed.ddp import gather_predictions, sharded_eval_loader

        data_loader = sharded_eval_loader(data_loader, self._dist)
        shard = ShardCounter(real_samples(data_loader))
        was_training = self.module.training
        self.module.eval()
        outputs: list[Any] = []
        try:
            with self._ema_weights(apply_ema), torch.no_grad():
                for batch in fast_loader(data_loader):
                    n = batch_size(batch)
                    k = shard.take(n)
                    if k == 0:
                        continue  # all DistributedSampler padding
                    if k < n:
                        batch = trim_batch(batch, k)
                    outputs.append(self._forward_batch(move_to_device(batch, self._device)))
        finally:
            if was_training:
                self._train_mode()
        if not self._dist.enabled:
            return outputs
        if self._ensemble is not None:
            return gather_member_predictions(self._dist, outputs, data_loader)
        return gather_predictions(self._dist, outputs, data_loader)

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
    ) -> torch.Tensor | None:
        """Samples ``shape`` from the model: reverse-SDE ``"em"``, predictor-corrector ``"pc"`` or ``"ode"``.

        ``condition`` items go to the model after ``(t, x)``; ``likelihood_score_fn(t, x)``
        adds ``guidance_factor`` times its value to the score (every method). ``"em"``
        (default): Euler-Maruyama, one model call per step, the last step noise-free.
        ``"pc"``: ``corrector_steps`` Langevin steps (``snr``) before each EM step.
        ``"ode"``: the probability-flow ODE with ``ode_method`` (``"Euler"``, ``"Heun"``,
        ``"RK4"``). ``time_grid``: ``"uniform"`` or ``"edm"``; ``denoise``: a final Tweedie
        step. Noise comes from the global generator (seed it with ``handler.seed``). Under
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
        from nnh.handler.generation import handler_sample

        return handler_sample(
            self,
            shape,
            steps,
            condition,
            likelihood_score_fn,
            guidance_factor,
            apply_ema,
            bar,
            stop_on_NaN,
            method=method,
            ode_method=ode_method,
            corrector_steps=corrector_steps,
            snr=snr,
            denoise=denoise,
            time_grid=time_grid,
        )

    def log_likelihood(
        self,
        x: torch.Tensor | Dataset | DataLoader,
        *args: Any,
        ode_steps: int,
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
    ) -> torch.Tensor | None:
        """log p(x) in nats per sample via the probability-flow ODE and Hutchinson's estimator.

        ``x``: a tensor ``[B, ...]`` (rank 0 only; ``None`` elsewhere) or a ``Dataset`` /
        ``DataLoader`` of ``x`` or ``(x, *condition)`` batches, sharded across ranks under DDP
        and returned on rank 0 as one tensor in dataset order (every rank must call).
        ``n_cotangent_vectors`` probes of ``noise_type`` (``'rademacher'`` or ``'gaussian'``;
        ``'exact'`` for the exact divergence) are drawn afresh at every ODE step (``fresh_probes=False``: once, for the whole
        trajectory), all batched in one vector-Jacobian product per drift evaluation.
        ``method``: ``'Euler'`` (``ode_steps`` evaluations), ``'Heun'`` (``2 * ode_steps``) or
        ``'RK4'`` (``4 * ode_steps``). ``t0``/``t1`` default to ``sde.epsilon``/``sde.T``.
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
        from nnh.handler.generation import handler_log_likelihood

        return handler_log_likelihood(
            self,
            x,
            args,
            ode_steps=ode_steps,
            n_cotangent_vectors=n_cotangent_vectors,
            noise_type=noise_type,
            method=method,
            t0=t0,
            t1=t1,
            apply_ema=apply_ema,
            pbar=pbar,
            verbose=verbose,
            fresh_probes=fresh_probes,
            differentiable=differentiable,
        )

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
