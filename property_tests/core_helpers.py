"""Shared builders for the core property tests."""

from __future__ import annotations

import torch
from torch import nn

from nnh.core import OptimizerAdapter, Supervised, TrainConfig, TrainState, init_train_state

OPTIMIZERS = {
    "sgd": (torch.optim.SGD, {"lr": 0.05}),
    "sgd_momentum": (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3}),
    "adam": (torch.optim.Adam, {"lr": 1e-2}),
    "adamw_amsgrad": (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1, "amsgrad": True}),
    "rmsprop": (torch.optim.RMSprop, {"lr": 1e-2, "momentum": 0.5, "centered": True}),
    "adagrad": (torch.optim.Adagrad, {"lr": 1e-2}),
    "nadam": (torch.optim.NAdam, {"lr": 1e-2}),
    "radam": (torch.optim.RAdam, {"lr": 1e-2}),
    "adamax": (torch.optim.Adamax, {"lr": 1e-2}),
    "adadelta": (torch.optim.Adadelta, {"lr": 1.0}),
    "asgd": (torch.optim.ASGD, {"lr": 1e-2}),
    "rprop": (torch.optim.Rprop, {"lr": 1e-2}),
}


def mlp(d_in: int, hidden: int, d_out: int, *, seed: int, dropout: float = 0.0, batchnorm: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(d_in, hidden)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(hidden))
    layers.append(nn.Tanh())
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(hidden, d_out))
    return nn.Sequential(*layers)


def setup(
    model: nn.Module,
    opt_name: str = "adam",
    *,
    ema: bool = False,
    seed: int | None = None,
    **config_kwargs,
) -> tuple[TrainState, TrainConfig]:
    cls, kwargs = OPTIMIZERS[opt_name]
    adapter = OptimizerAdapter.create(cls, model, **kwargs)
    state = init_train_state(model, adapter, ema=ema, seed=seed, loss_scaler=config_kwargs.get("loss_scaler"))
    config = TrainConfig(model=model, optimizer=adapter, objective=Supervised(nn.functional.mse_loss), **config_kwargs)
    return state, config


def all_tensors(state: TrainState) -> dict[str, torch.Tensor]:
    """Every tensor in the record, keyed by field and name."""
    out: dict[str, torch.Tensor] = {}
    for field in ("params", "buffers", "opt_state", "grads", "ema", "scaler"):
        td = getattr(state, field)
        if td is None:
            continue
        for key, value in td.items(include_nested=True, leaves_only=True):
            out[f"{field}/{key}"] = value
    if state.rng is not None:
        out["rng"] = state.rng
    return out


def snapshot(state: TrainState) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in all_tensors(state).items()}


def bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    if a.keys() != b.keys():
        return False
    return all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


def counters(state: TrainState) -> tuple[int, ...]:
    return (state.step, state.micro_step, state.window_samples, state.window_first, state.epoch, state.skipped_steps)
