"""Argument checks for the handler's public methods: a clear error at the call, before work.

Each check names the argument, what it got and what it expects, so a typo such as
``train(gradient_clipping_norm="1.0")`` fails at once instead of deep inside a step.
"""

from __future__ import annotations

import numbers
import os
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

__all__ = [
    "check_dataset",
    "check_has_batches",
    "check_predict_data",
    "check_samples_seen",
    "check_save_path",
    "check_train_args",
    "epoch_matching_history",
]


def _kind(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _int_at_least(name: str, value: Any, low: int) -> None:
    if not _is_int(value):
        raise TypeError(f"{name} must be an int >= {low}, got {_kind(value)}")
    if value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def _flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {_kind(value)}")


def check_train_args(
    *,
    epochs: Any,
    validate_every: Any,
    gradient_accumulation_steps: Any,
    use_amp: Any,
    gradient_clipping_norm: Any,
    ema_decay: Any,
    seed: Any,
    progress_bar: Any,
    debug_print_interval: Any,
    save_on_last_epoch: Any,
    epoch_train_and_val_pbar: Any,
) -> None:
    """Check every argument of ``NNHandler.train`` (types and ranges).

    Example:
        >>> args = dict(epochs=2, validate_every=1, gradient_accumulation_steps=1,
        ...             use_amp=False, gradient_clipping_norm=None, ema_decay=0.0, seed=None,
        ...             progress_bar=True, debug_print_interval=None, save_on_last_epoch=True,
        ...             epoch_train_and_val_pbar=False)
        >>> check_train_args(**args)
        >>> check_train_args(**{**args, "ema_decay": "0.9"})
        Traceback (most recent call last):
        ...
        TypeError: ema_decay must be a number in [0, 1) (0 turns EMA off), got '0.9' (str)
        >>> check_train_args(**{**args, "epochs": True})
        Traceback (most recent call last):
        ...
        TypeError: epochs must be an int >= 0, got True (bool)
    """
    _int_at_least("epochs", epochs, 0)
    _int_at_least("validate_every", validate_every, 1)
    _int_at_least("gradient_accumulation_steps", gradient_accumulation_steps, 1)
    if not isinstance(use_amp, (bool, str, torch.dtype)):
        raise TypeError(
            f"use_amp must be True/False, 'bf16'/'fp16' or a torch.dtype, got {_kind(use_amp)}"
        )
    if gradient_clipping_norm is not None and (
        not _is_real(gradient_clipping_norm) or not gradient_clipping_norm > 0
    ):
        raise TypeError(
            "gradient_clipping_norm must be a number > 0 or None (no clipping), got "
            f"{_kind(gradient_clipping_norm)}"
        )
    if not _is_real(ema_decay) or not 0 <= ema_decay < 1:
        raise TypeError(
            f"ema_decay must be a number in [0, 1) (0 turns EMA off), got {_kind(ema_decay)}"
        )
    if seed is not None and not _is_int(seed):
        raise TypeError(f"seed must be an int or None, got {_kind(seed)}")
    _flag("progress_bar", progress_bar)
    if debug_print_interval is not None:
        _int_at_least("debug_print_interval", debug_print_interval, 1)
    _flag("save_on_last_epoch", save_on_last_epoch)
    _flag("epoch_train_and_val_pbar", epoch_train_and_val_pbar)


def check_dataset(argument: str, dataset: Any) -> Any:
    """``dataset`` if it is a Dataset, a DataLoader, or a sized indexable collection of
    samples (not a path); else a clear error.

    Example:
        >>> len(check_dataset("dataset", [(torch.zeros(2), 0)]))
        1
        >>> check_dataset("dataset", "data.csv")
        Traceback (most recent call last):
        ...
        TypeError: dataset must be a torch Dataset or DataLoader (or a list of samples), got 'data.csv' (str); a file path is not read: load it into a Dataset (e.g. TensorDataset) first
    """
    if isinstance(dataset, (Dataset, DataLoader)):
        return dataset
    hint = ""
    if isinstance(dataset, (str, bytes, os.PathLike)):
        hint = "; a file path is not read: load it into a Dataset (e.g. TensorDataset) first"
    elif hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__"):
        return dataset
    raise TypeError(
        f"{argument} must be a torch Dataset or DataLoader (or a list of samples), "
        f"got {_kind(dataset)}{hint}"
    )


def check_has_batches(which: str, loader: DataLoader) -> DataLoader:
    """``loader``; one that yields no batch is an error naming why (size, batch size,
    drop_last). Loaders without a length (iterable datasets) are checked after an epoch.

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> len(check_has_batches("training", DataLoader(TensorDataset(torch.zeros(3, 1)), batch_size=4)))
        1
        >>> check_has_batches("training", DataLoader(TensorDataset(torch.zeros(3, 1)), batch_size=4, drop_last=True))
        Traceback (most recent call last):
        ...
        ValueError: the training loader yields no batches: 3 samples, batch_size=4, drop_last=True (drop_last drops the only, partial batch). Give it data, a smaller batch_size, or drop_last=False
        >>> check_has_batches("training", DataLoader(TensorDataset(torch.zeros(0, 1)), batch_size=4))
        Traceback (most recent call last):
        ...
        ValueError: the training loader yields no batches: 0 samples, batch_size=4, drop_last=False. Give it data
    """
    if isinstance(getattr(loader, "dataset", None), IterableDataset):
        return loader
    try:
        n_batches = len(loader)
    except TypeError:
        return loader
    if n_batches:
        return loader
    try:
        n = len(loader.dataset)
    except TypeError:
        n = "an unknown number of"
    drop_last = getattr(loader, "drop_last", False)
    why = " (drop_last drops the only, partial batch)" if drop_last and n else ""
    fix = "Give it data, a smaller batch_size, or drop_last=False" if drop_last else "Give it data"
    raise ValueError(
        f"the {which} loader yields no batches: {n} samples, batch_size={loader.batch_size}, "
        f"drop_last={drop_last}{why}. {fix}"
    )


def check_samples_seen(which: str, count: float) -> None:
    """After an epoch: a loader that yielded nothing (e.g. an empty iterable dataset, which
    has no length to check up front) is reported as such, not as a diverged loss.

    Example:
        >>> check_samples_seen("training", 0)
        Traceback (most recent call last):
        ...
        ValueError: the training loader yielded no batches this epoch (0 samples on every rank): give it data
    """
    if not count:
        raise ValueError(
            f"the {which} loader yielded no batches this epoch (0 samples on every rank): "
            "give it data"
        )


def check_predict_data(data_loader: Any) -> None:
    """``predict``'s input: a DataLoader or a Dataset.

    Example:
        >>> check_predict_data(None)
        Traceback (most recent call last):
        ...
        TypeError: data_loader must be a DataLoader or a Dataset to predict on, got None (NoneType)
    """
    if data_loader is None or isinstance(data_loader, (str, bytes, os.PathLike)):
        raise TypeError(
            f"data_loader must be a DataLoader or a Dataset to predict on, got {_kind(data_loader)}"
        )
    check_dataset("data_loader", data_loader)


def check_save_path(value: Any) -> str:
    """A folder path as ``str`` (``str`` or ``os.PathLike``), never ``None``.

    Example:
        >>> check_save_path("ckpt")
        'ckpt'
        >>> check_save_path(None)
        Traceback (most recent call last):
        ...
        TypeError: save_path must be a folder path (str or os.PathLike), got None (NoneType); use "." for the working directory
    """
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise TypeError(
            "save_path must be a folder path (str or os.PathLike), got "
            f'{_kind(value)}; use "." for the working directory'
        )
    return str(os.fspath(value))


def epoch_matching_history(state: Any, start_epoch: int, recorded: int) -> Any:
    """``state`` with its epoch counter at ``start_epoch`` plus the epochs ``train()`` recorded.

    A ``train()`` that failed after an epoch's steps but before that epoch was recorded in
    the history (divergence, a failing metric or validation) leaves the counter one ahead;
    this puts it back so the counter, the history and the next epoch's number agree.

    Example:
        >>> import attrs
        >>> @attrs.frozen
        ... class S:
        ...     epoch: int
        >>> epoch_matching_history(S(epoch=3), start_epoch=0, recorded=2)
        S(epoch=2)
    """
    if state is None or state.epoch == start_epoch + recorded:
        return state
    import attrs

    return attrs.evolve(state, epoch=start_epoch + recorded)


_SDE_METHODS = ("sigma", "mu", "drift", "diffusion", "prior", "prior_log_prob", "marginal_prob")


def check_sde(value: Any) -> None:
    """Raise ``TypeError`` unless ``value`` is ``None`` or has what nnh needs of an SDE.

    Example:
        >>> from nnh.generative import VPSDE
        >>> check_sde(VPSDE()); check_sde(None)
        >>> check_sde(object())
        Traceback (most recent call last):
        ...
        TypeError: object is not an SDE: it lacks ['sigma', 'mu', 'drift', 'diffusion', 'prior', 'prior_log_prob', 'marginal_prob']; use nnh.generative.VESDE/VPSDE/SubVPSDE or a subclass of nnh.generative.SDE
    """
    if value is None:
        return
    missing = [m for m in _SDE_METHODS if not callable(getattr(value, m, None))]
    if missing or not hasattr(value, "T") or not hasattr(value, "epsilon"):
        raise TypeError(
            f"{type(value).__name__} is not an SDE: it lacks {missing or ['T', 'epsilon']}; "
            "use nnh.generative.VESDE/VPSDE/SubVPSDE or a subclass of nnh.generative.SDE"
        )
