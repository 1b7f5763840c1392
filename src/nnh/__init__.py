"""nnh: a PyTorch model's whole life on a pure functional core.

The functional core (:mod:`nnh.core`) is pure: state records in, state records out.
:class:`NNHandler` threads those records through loops, DDP collectives, callbacks and
checkpoint files.

Example:
    >>> from nnh import NNHandler, Callback
    >>> NNHandler.ModelType.from_string("regression")
    <ModelType.REGRESSION: 'regression'>
"""

from nnh.callbacks import Callback
from nnh.core import (
    LossScaler,
    OptimizerAdapter,
    Supervised,
    TrainConfig,
    TrainState,
    ema_update,
    end_epoch,
    eval_step,
    init_train_state,
    train_step,
)
from nnh.generative.sampler import Sampler
from nnh.handler import NNHandler
from nnh.handler.enums import LoggingMode, ModelType

__version__ = "0.1.0"

__all__ = [
    "Callback",
    "LoggingMode",
    "LossScaler",
    "ModelType",
    "NNHandler",
    "OptimizerAdapter",
    "Sampler",
    "Supervised",
    "TrainConfig",
    "TrainState",
    "__version__",
    "ema_update",
    "end_epoch",
    "eval_step",
    "init_train_state",
    "train_step",
]
