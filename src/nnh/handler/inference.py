"""Forward passes without training: ``predict`` (outputs) and ``evaluate`` (loss and
metrics), with the EMA weights swapped in on request.

Both run the model in eval mode without gradients, skip DistributedSampler padding, and under
DDP combine the ranks: ``predict`` gathers the outputs in dataset order on rank 0,
``evaluate`` all-reduces exact sample-weighted sums so every rank returns the same numbers.
The functions read an :class:`~nnh.handler.NNHandler`'s private fields; call them through
``NNHandler.predict`` / ``NNHandler.evaluate``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, Dataset

from nnh.callbacks.base import CallbackList
from nnh.core import TrainConfig, TrainState
from nnh.core.accumulate import pack_sums
from nnh.core.ensemble import EnsembleConfig
from nnh.core.objectives import batch_size
from nnh.core.tree import flat_td
from nnh.distributed.ddp import (
    ShardCounter,
    gather_predictions,
    real_samples,
    sharded_eval_loader,
    trim_batch,
)
from nnh.handler import validation as check
from nnh.handler.data import fast_loader, move_to_device
from nnh.handler.ensemble import gather_member_predictions
from nnh.handler.saving import raise_save_failures
from nnh.handler.train_setup import amp_dtype, objective, train_mode
from nnh.handler.training import epoch_means, run_val_epoch

if TYPE_CHECKING:
    from nnh.handler.nnhandler import NNHandler

__all__ = ["ema_weights", "evaluate", "forward_batch", "predict"]


@contextlib.contextmanager
def ema_weights(h: NNHandler, apply_ema: bool) -> Iterator[bool]:
    """Temporarily copy the EMA weights into the model; restores them bitwise after.

    Yields whether EMA weights are in use (``False`` without EMA or with ``apply_ema=False``).

    Example:
        >>> from nnh import NNHandler
        >>> h = NNHandler(torch.nn.Linear, in_features=2, out_features=1, model_type="regression")
        >>> with ema_weights(h, True) as used:
        ...     used
        False
    """
    state = h._state
    if not apply_ema or state is None or state.ema is None:
        yield False
        return
    names = list(state.params.keys())
    live = [_local(state.params[n]) for n in names]  # FSDP2: each rank swaps its own shard
    backup = [p.detach().clone() for p in live]
    with torch.no_grad():
        torch._foreach_copy_(live, [_local(state.ema[n]) for n in names])
    try:
        yield True
    finally:
        with torch.no_grad():
            torch._foreach_copy_(live, backup)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def forward_batch(h: NNHandler, batch: Any) -> Any:
    """The model's output for one batch laid out as in training (``(input, [target], *extra)``;
    a lone tensor is the input; a dict is passed as keywords).

    Example:
        >>> from nnh import NNHandler
        >>> h = NNHandler(torch.nn.Linear, in_features=2, out_features=1, model_type="regression")
        >>> forward_batch(h, (torch.ones(3, 2), torch.zeros(3, 1))).shape
        torch.Size([3, 1])
    """
    model = h._inference_model()
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, (list, tuple)):
        if h._model_type.inputs_are_targets:
            return model(*batch)
        return model(batch[0], *batch[2:])
    if isinstance(batch, dict):
        return model(**batch)
    return model(batch)


def _as_loader(data: DataLoader | Dataset) -> DataLoader:
    return data if isinstance(data, DataLoader) else DataLoader(data, batch_size=64)


def predict(h: NNHandler, data_loader: DataLoader | Dataset, apply_ema: bool) -> list[Any] | None:
    """The body of :meth:`NNHandler.predict`: outputs per batch (rank 0 gets all under DDP).

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> from nnh import NNHandler
        >>> h = NNHandler(torch.nn.Linear, in_features=2, out_features=1, model_type="regression")
        >>> len(predict(h, TensorDataset(torch.randn(70, 2)), apply_ema=True))
        2
    """
    raise_save_failures(h)
    check.check_predict_data(data_loader)
    loader = sharded_eval_loader(_as_loader(data_loader), h._dist)
    shard = ShardCounter(real_samples(loader))
    was_training = h.module.training
    h.module.eval()
    outputs: list[Any] = []
    try:
        with ema_weights(h, apply_ema), torch.no_grad():
            for batch in fast_loader(loader):
                n = batch_size(batch)
                k = shard.take(n)
                if k == 0:
                    continue  # all DistributedSampler padding
                if k < n:
                    batch = trim_batch(batch, k)
                outputs.append(forward_batch(h, move_to_device(batch, h._device)))
    finally:
        if was_training:
            train_mode(h)
    if not h._dist.enabled:
        return outputs
    if h._ensemble is not None:
        return gather_member_predictions(h._dist, outputs, loader)
    return gather_predictions(h._dist, outputs, loader)


def _evaluation_state(h: NNHandler) -> TrainState:
    """The training record, or (before any training) one that aliases the module's tensors."""
    if h._state is not None:
        return h._state
    module = h.module
    return TrainState(
        params=flat_td(dict(module.named_parameters())),
        buffers=flat_td(dict(module.named_buffers())),
        opt_state=flat_td({}),
    )


def _evaluation_config(h: NNHandler) -> TrainConfig:
    """The configuration validation in ``train()`` uses: the same objective and autocast
    (that of the last ``train()`` call), no optimizer."""
    last = h._last_train_kwargs or {}
    config_class = TrainConfig if h._ensemble is None else EnsembleConfig
    return config_class(
        model=h._inference_model(),
        module=h.module,
        optimizer=None,
        objective=objective(h),
        amp_dtype=amp_dtype(h, last.get("use_amp", False)),
    )


def _check_eval_data(h: NNHandler, loader: DataLoader | Dataset | None) -> DataLoader:
    if loader is None:
        if h._val_loader is None:
            raise ValueError(
                "evaluate(loader=None) evaluates the validation loader, but none is set: "
                "pass evaluate(loader) or call set_val_loader(dataset, batch_size=...)"
            )
        return h._val_loader
    if not isinstance(loader, (DataLoader, Dataset)):
        raise TypeError(
            f"evaluate(loader=...) takes a DataLoader or a Dataset, got {type(loader).__name__}"
        )
    return sharded_eval_loader(_as_loader(loader), h._dist)


def evaluate(
    h: NNHandler, loader: DataLoader | Dataset | None = None, apply_ema: bool = True
) -> dict[str, float]:
    """The body of :meth:`NNHandler.evaluate`: ``{"loss": ..., <metric>: ...}`` over ``loader``.

    Exact sample-weighted means over every sample once (DistributedSampler padding skipped),
    summed across ranks under DDP so that every rank returns the same dictionary. With
    ``apply_ema=False`` (or without EMA) the numbers are those ``train()`` logs as
    ``val_loss`` / ``val_<metric>`` for the same weights.

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> from nnh import NNHandler
        >>> h = NNHandler(torch.nn.Linear, in_features=2, out_features=1, model_type="regression")
        >>> h.set_loss_fn(torch.nn.functional.mse_loss)
        >>> data = TensorDataset(torch.zeros(5, 2), torch.zeros(5, 1))
        >>> torch.nn.init.zeros_(h.module.weight); torch.nn.init.zeros_(h.module.bias)
        Parameter containing...
        >>> evaluate(h, data)
        {'loss': 0.0}
    """
    if not isinstance(apply_ema, bool):
        raise TypeError(f"evaluate(apply_ema=...) must be True or False, got {apply_ema!r}")
    raise_save_failures(h)
    loader = _check_eval_data(h, loader)
    state = _evaluation_state(h)
    config = _evaluation_config(h)
    was_training = h.module.training
    h.module.eval()
    cuda = [h._device] if h._device.type == "cuda" else []
    try:
        # iterating a DataLoader draws its base seed from the global RNG: keep the user's
        # stream (and a later resume) exactly as if evaluate had not been called
        with ema_weights(h, apply_ema), torch.random.fork_rng(devices=cuda):
            result = run_val_epoch(
                state,
                config,
                fast_loader(loader),
                device=h._device,
                metrics=h._metrics,
                callbacks=CallbackList([], is_main=h._dist.is_main),
                real_samples=real_samples(loader),
                loss_epoch=max(state.epoch - 1, 0),
            )
    finally:
        if was_training:
            train_mode(h)
    flat = pack_sums(result.sums)
    h._dist.all_reduce_sum(flat)
    loss, metrics = epoch_means(flat, h._metrics, "val")
    return {"loss": float(loss), **{k: float(v) for k, v in metrics.items()}}
