"""The fields of a fresh :class:`~nnh.handler.nnhandler.NNHandler`, in one place.

``NNHandler.__init__`` checks its arguments and sets up logging and distribution; every
other field starts here at its empty default (the model is installed afterwards by
``set_model``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from nnh.callbacks.base import Callback
from nnh.checkpoint.background import BackgroundWriter
from nnh.checkpoint.ownership import new_run_id
from nnh.core import LossScaler, OptimizerAdapter, TrainState
from nnh.handler.autosaver import AutoSaver
from nnh.handler.history import History

if TYPE_CHECKING:
    from nnh.handler.nnhandler import NNHandler


def init_fields(h: NNHandler, save_model_code: bool) -> None:
    """Give ``h`` every field at its empty default (no model, optimizer, data or history).

    Example:
        >>> from nnh import NNHandler
        >>> h = NNHandler(nn.Linear, in_features=2, out_features=1, model_type="regression")
        >>> h._history.train_losses, h._optimizer_spec, h.stop_training
        ([], None, False)
    """
    h._module: nn.Module | None = None
    h._model: nn.Module | None = None
    h._model_class: type[nn.Module] | None = None
    h._model_kwargs: dict[str, Any] = {}
    h._save_model_code = save_model_code
    h._compile_kwargs: dict[str, Any] | None = None
    h._optimizer_spec: tuple[type[torch.optim.Optimizer], dict[str, Any]] | None = None
    h._adapter: OptimizerAdapter | None = None
    h._scheduler_spec: tuple[type, dict[str, Any]] | None = None
    h._scheduler: Any = None
    h._loss_fn: Callable[..., torch.Tensor] | None = None
    h._loss_fn_kwargs: dict[str, Any] = {}
    h._pass_epoch_to_loss = False
    h._train_loader: DataLoader | None = None
    h._val_loader: DataLoader | None = None
    h._loader_kwargs: dict[str, dict[str, Any]] = {}
    h._metrics: dict[str, Callable[[Any, Any], Any]] = {}
    h._callbacks: list[Callback] = []
    h._history = History()
    h._state: TrainState | None = None
    h._loss_scaler_config = LossScaler()
    h._keep_eval: list[nn.Module] = []
    h._sde: Any = None
    h._sampler: Any = None
    h._auto_saver = AutoSaver()
    h._last_train_kwargs: dict[str, Any] | None = None
    h._resume: dict[str, Any] | None = None
    h._epoch_start_rng: dict[str, Any] | None = None
    h._target_epoch = 0
    h._run_id = new_run_id()
    h._saves: BackgroundWriter | None = None
    h._sharded_saves: Any = None  # FSDP background folders (nnh.handler.sharded_async)
    h.stop_training = False
