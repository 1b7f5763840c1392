"""Callbacks: the base class and the built-ins users expect.

Example:
    >>> from nnh.callbacks import CSVLogger, EarlyStopping, EpochTimer, LearningRateMonitor
    >>> callbacks = [LearningRateMonitor(), EpochTimer(), EarlyStopping(patience=3),
    ...              CSVLogger("log.csv")]
"""

from nnh.callbacks.base import HOOKS, Callback, CallbackList
from nnh.callbacks.csv_logger import CSVLogger
from nnh.callbacks.early_stopping import EarlyStopping
from nnh.callbacks.lr_monitor import LearningRateMonitor
from nnh.callbacks.mlflow_logger import MLflowLogger
from nnh.callbacks.model_checkpoint import ModelCheckpoint
from nnh.callbacks.tensorboard import TensorBoardLogger
from nnh.callbacks.timer import EpochTimer
from nnh.callbacks.wandb_logger import WandbLogger

__all__ = [
    "HOOKS",
    "CSVLogger",
    "Callback",
    "CallbackList",
    "EarlyStopping",
    "EpochTimer",
    "LearningRateMonitor",
    "MLflowLogger",
    "ModelCheckpoint",
    "TensorBoardLogger",
    "WandbLogger",
]
