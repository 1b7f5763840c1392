"""The pure functional core: state records in, state records out.

Read ``docs/core.md`` for the contract. Everything here is usable without
:class:`nnh.NNHandler`.
"""

from nnh.core.binding import ModuleBinding, unwrap_module
from nnh.core.ema import ema_update, ema_update_
from nnh.core.ensemble import (
    EnsembleConfig,
    EnsembleModule,
    ensemble_end_epoch,
    ensemble_eval_step,
    ensemble_train_step,
    member_state,
    stack_states,
)
from nnh.core.metrics import MetricError, metric_sums
from nnh.core.objectives import Evaluation, Supervised, batch_size, split_batch
from nnh.core.optim import OptimizerAdapter
from nnh.core.scaler import LossScaler, init_scaler_state, scaler_update, unscale_grads_
from nnh.core.state import TrainState, clone_state, init_train_state
from nnh.core.step import (
    EvalOutput,
    StepOutput,
    TrainConfig,
    apply_pending_update,
    end_epoch,
    eval_step,
    train_step,
)

__all__ = [
    "EnsembleConfig",
    "EnsembleModule",
    "EvalOutput",
    "Evaluation",
    "LossScaler",
    "MetricError",
    "ModuleBinding",
    "OptimizerAdapter",
    "StepOutput",
    "Supervised",
    "TrainConfig",
    "TrainState",
    "apply_pending_update",
    "batch_size",
    "clone_state",
    "ema_update",
    "ema_update_",
    "end_epoch",
    "ensemble_end_epoch",
    "ensemble_eval_step",
    "ensemble_train_step",
    "eval_step",
    "init_scaler_state",
    "init_train_state",
    "member_state",
    "metric_sums",
    "scaler_update",
    "split_batch",
    "stack_states",
    "train_step",
    "unscale_grads_",
    "unwrap_module",
]
