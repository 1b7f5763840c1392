"""What ``train()`` needs before its first step: the objective, the AMP dtype, the core's
training record and its static configuration.

These functions read and update an :class:`~nnh.handler.NNHandler`'s private fields; they
belong to the shell (``nnh.handler``) and are not public API.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
import torch

from nnh.core import OptimizerAdapter, Supervised, TrainConfig, TrainState, init_train_state
from nnh.core.ensemble import EnsembleConfig
from nnh.core.tree import flat_td
from nnh.handler.enums import ModelType

if TYPE_CHECKING:
    from nnh.handler.nnhandler import NNHandler

__all__ = ["amp_dtype", "check_ready", "ensure_state", "objective", "train_config", "train_mode"]


def objective(h: NNHandler) -> Callable[..., Any]:
    if h._model_type is ModelType.SCORE_BASED:
        from nnh.generative.objective import ScoreMatching, UserScoreLoss

        if h._loss_fn is not None:
            return UserScoreLoss(h._loss_fn, h._sde, h._loss_fn_kwargs, h._pass_epoch_to_loss)
        if h._sde is None:
            raise RuntimeError(
                "a SCORE_BASED model trains against an SDE: call set_sde(VPSDE, ...) "
                "before train(), or set_loss_fn(your_loss)"
            )
        return ScoreMatching(h._sde)
    if h._loss_fn is None:
        raise RuntimeError("no loss function: call set_loss_fn(loss_fn) before train()")
    return Supervised(
        h._loss_fn,
        loss_kwargs=h._loss_fn_kwargs,
        pass_epoch=h._pass_epoch_to_loss,
        inputs_are_targets=h._model_type.inputs_are_targets,
    )


def amp_dtype(h: NNHandler, use_amp: bool | str | torch.dtype) -> torch.dtype | None:
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
    if h._fsdp is not None and h._dist.enabled:  # FSDP: bf16 (no loss scaling across shards)
        return torch.bfloat16
    return torch.float16 if h._device.type == "cuda" else torch.bfloat16


def ensure_state(h: NNHandler, ema: bool, scaler: bool) -> TrainState:
    if h._adapter is None:
        raise RuntimeError(
            "no optimizer: call set_optimizer(optimizer_class, **kwargs) before train()"
        )
    state = h._state
    if state is not None:
        live = [id(p) for p in h.module.parameters()]
        if live != [id(p) for p in state.params.values()]:
            h._warn(
                "the model's parameters were replaced since the last training; "
                "rebuilding the optimizer and training state"
            )
            cls, kwargs = h._optimizer_spec  # type: ignore[misc]
            h._adapter = OptimizerAdapter.create(cls, h.module, **kwargs)
            state = None
    if state is None:
        state = init_train_state(
            h.module,
            h._adapter,
            ema=ema,
            loss_scaler=h._loss_scaler_config if scaler else None,
        )
    if ema and state.ema is None:
        state = attrs.evolve(
            state, ema=flat_td({k: v.detach().clone() for k, v in state.params.items()})
        )
    elif not ema and state.ema is not None:
        h._warn(
            "train(ema_decay=0) discards the EMA weights this handler holds; pass "
            "ema_decay=<the previous decay> (or leave it out) to keep them"
        )
        state = attrs.evolve(state, ema=None)
    if scaler and state.scaler is None:
        from nnh.core import init_scaler_state

        state = attrs.evolve(state, scaler=init_scaler_state(h._loss_scaler_config, h._device))
    elif not scaler and state.scaler is not None:
        state = attrs.evolve(state, scaler=None)
    h._state = state
    return state


def train_config(h: NNHandler, **settings: Any) -> TrainConfig:
    """The core's static configuration; reused while nothing it depends on changed, so
    repeated ``train()`` calls do not rebuild the module binding."""
    goal = objective(h)
    key = (
        id(h._model),
        id(h.module),
        id(h._adapter),
        type(goal),
        id(getattr(goal, "loss_fn", None)),
        id(h._loss_fn_kwargs),
        h._pass_epoch_to_loss,
        id(h._sde),
        h._model_type,
        tuple(sorted(settings.items(), key=lambda kv: kv[0])),
    )
    cached = getattr(h, "_config_cache", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    config = (TrainConfig if h._ensemble is None else EnsembleConfig)(
        model=h._model,
        module=h.module,
        optimizer=h._adapter,
        objective=goal,
        **settings,
    )
    h._config_cache = (key, config)
    return config


def check_ready(h: NNHandler) -> None:
    if h._train_loader is None:
        raise RuntimeError(
            "no training data: call set_train_loader(dataset, batch_size=...) before train()"
        )
    if h._adapter is None:
        raise RuntimeError(
            "no optimizer: call set_optimizer(optimizer_class, **kwargs) before train()"
        )
    objective(h)


def train_mode(h: NNHandler) -> None:
    h.module.train()
    for m in h._keep_eval:
        m.eval()
