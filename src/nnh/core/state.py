"""The training state record.

A :class:`TrainState` is a frozen attrs record. Its tensor fields are TensorDicts keyed by
parameter/buffer names; its counters are Python ints. Core functions never mutate a record
they receive (unless told they may, with ``donate=True``); they return a new one made with
:func:`attrs.evolve`.
"""

from __future__ import annotations

import attrs
import torch
from tensordict import TensorDict
from torch import nn

from nnh.core.optim import OptimizerAdapter
from nnh.core.scaler import LossScaler, init_scaler_state
from nnh.core.tree import clone_parameters, clone_tensors, flat_td

__all__ = ["TrainState", "clone_state", "init_train_state"]


@attrs.frozen(eq=False)
class TrainState:
    """Everything that changes while a model trains.

    Attributes:
        params: named parameters (``nn.Parameter`` leaves).
        buffers: named buffers (BatchNorm statistics, ...).
        opt_state: per-parameter optimizer state, ``{param_name: {state_key: tensor}}``.
        grads: gradients accumulated in an open accumulation window, else ``None``.
        ema: exponential moving average of ``params``, or ``None`` when EMA is off.
        scaler: dynamic loss-scaler state (``scale``, ``growth_tracker``) or ``None``.
        rng: CPU generator state used for the step's randomness (dropout, noise), or
            ``None`` to use the ambient global generator (the shell's choice).
        step: optimizer updates applied (skipped loss-scaler steps excluded).
        micro_step: micro-batches in the open accumulation window.
        window_samples: samples in the open accumulation window.
        window_first: size of the first micro-batch of the open window (the loss unit).
        epoch: completed epochs.
        skipped_steps: updates skipped because the loss scaler saw inf/NaN gradients.

    Example:
        >>> model = nn.Linear(3, 1)
        >>> opt = OptimizerAdapter.create(torch.optim.SGD, model, lr=0.1)
        >>> state = init_train_state(model, opt)
        >>> state.step, sorted(state.params.keys())
        (0, ['bias', 'weight'])
    """

    params: TensorDict
    buffers: TensorDict
    opt_state: TensorDict
    grads: TensorDict | None = None
    ema: TensorDict | None = None
    scaler: TensorDict | None = None
    rng: torch.Tensor | None = None
    step: int = 0
    micro_step: int = 0
    window_samples: int = 0
    window_first: int = 0
    epoch: int = 0
    skipped_steps: int = 0


def init_train_state(
    module: nn.Module,
    optimizer: OptimizerAdapter,
    *,
    ema: bool = False,
    loss_scaler: LossScaler | None = None,
    seed: int | None = None,
) -> TrainState:
    """Build the initial state of ``module`` trained with ``optimizer``.

    The record *aliases* the module's parameters and buffers (no copy): the module is bound
    to it, so a donated :func:`~nnh.core.train_step` runs in place. Pass ``seed`` to carry
    an explicit CPU generator in the record (deterministic dropout without the global RNG).

    Example:
        >>> model = nn.Linear(3, 1)
        >>> opt = OptimizerAdapter.create(torch.optim.Adam, model, lr=1e-3)
        >>> state = init_train_state(model, opt, ema=True, seed=0)
        >>> state.ema is not None and state.rng is not None
        True
    """
    params = flat_td(dict(module.named_parameters()))
    buffers = flat_td(dict(module.named_buffers()))
    device = next(iter(params.values())).device if len(params.keys()) else torch.device("cpu")
    rng = None
    if seed is not None:
        rng = torch.Generator().manual_seed(int(seed)).get_state()
    return TrainState(
        params=params,
        buffers=buffers,
        opt_state=optimizer.export_state(params),
        ema=flat_td({k: v.detach().clone() for k, v in params.items()}) if ema else None,
        scaler=init_scaler_state(loss_scaler, device) if loss_scaler is not None else None,
        rng=rng,
    )


def clone_state(state: TrainState) -> TrainState:
    """A record with the same values in fresh storage: what ``donate=False`` works on.

    Example:
        >>> model = nn.Linear(2, 1)
        >>> s = init_train_state(model, OptimizerAdapter.create(torch.optim.SGD, model, lr=1.0))
        >>> c = clone_state(s)
        >>> c.params["weight"] is s.params["weight"]
        False
    """
    params = clone_parameters(state.params)
    grads = None
    if state.grads is not None:
        grads = flat_td({k: v.detach().clone() for k, v in state.grads.items()})
    return attrs.evolve(
        state,
        params=params,
        buffers=clone_tensors(state.buffers),
        opt_state=clone_tensors(state.opt_state),
        grads=grads,
        ema=clone_tensors(state.ema),
        scaler=clone_tensors(state.scaler),
        rng=None if state.rng is None else state.rng.clone(),
    )
