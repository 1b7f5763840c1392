"""What the experiment-tracker callbacks send: the run's configuration as flat plain values,
the numeric epoch logs, and the newest auto-saved checkpoint path.

Shared by :class:`~nnh.callbacks.MLflowLogger` and :class:`~nnh.callbacks.WandbLogger`;
nothing here imports a tracker library.
"""

from __future__ import annotations

import importlib.util
import math
import re
from numbers import Real
from typing import Any

import torch

__all__ = ["checkpoint_path", "numeric_logs", "require", "run_config"]

_PLAIN = (bool, int, float, str)


def require(package: str, extra: str, user: str) -> None:
    """Raise an ImportError naming the extra to install when ``package`` is missing; never
    imports it (so rank 0 alone pays for the import, when training begins).

    Example:
        >>> require("math", "none", "Doc")
        >>> require("no_such_pkg_xyz", "xyz", "XYZLogger")
        Traceback (most recent call last):
        ...
        ImportError: XYZLogger needs the 'no_such_pkg_xyz' package, which is not installed: pip install nnh[xyz]
    """
    if importlib.util.find_spec(package) is None:
        raise ImportError(
            f"{user} needs the '{package}' package, which is not installed: pip install nnh[{extra}]"
        )


def _plain(value: Any) -> Any:
    """A config value as a plain scalar (``None`` -> ``"None"``; other objects -> their name)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, _PLAIN):
        return value
    if value is None:
        return "None"
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '')}.{value.__qualname__}".lstrip(".")
    if isinstance(value, (list, tuple)) and all(isinstance(v, _PLAIN) for v in value):
        return str(list(value))
    return type(value).__qualname__


def _flatten(prefix: str, values: dict[str, Any], out: dict[str, Any]) -> None:
    for key, value in values.items():
        if key == "params":
            continue
        out[f"{prefix}{key}"] = _plain(value)


def run_config(handler: Any, begin_logs: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run's configuration as ``{name: plain scalar}``: the model class and keyword
    arguments (``model.*``), the optimizer and its hyperparameters (``optimizer.*``, from the
    first parameter group), the loss function, the scheduler, and ``train()``'s options
    (``train.*``, with ``epochs`` and ``start_epoch`` from ``begin_logs``).

    Example:
        >>> import torch
        >>> from nnh import NNHandler
        >>> h = NNHandler(torch.nn.Linear, in_features=2, out_features=1, model_type="regression")
        >>> h.set_optimizer(torch.optim.SGD, lr=0.1)
        >>> c = run_config(h, {"epochs": 3, "start_epoch": 0})
        >>> c["model.class"], c["model.in_features"], c["optimizer.class"], c["optimizer.lr"]
        ('torch.nn.modules.linear.Linear', 2, 'torch.optim.sgd.SGD', 0.1)
        >>> c["train.epochs"]
        3
    """
    out: dict[str, Any] = {}
    model_class = getattr(handler, "_model_class", None)
    if model_class is not None:
        out["model.class"] = _plain(model_class)
    _flatten("model.", dict(getattr(handler, "_model_kwargs", None) or {}), out)
    optimizer = getattr(handler, "optimizer", None)
    if optimizer is not None:
        out["optimizer.class"] = _plain(type(optimizer))
        _flatten("optimizer.", dict(optimizer.param_groups[0]), out)
    if getattr(handler, "loss_fn", None) is not None:
        out["loss_fn"] = _plain(handler.loss_fn)
    if getattr(handler, "scheduler", None) is not None:
        out["scheduler.class"] = _plain(type(handler.scheduler))
    for name in ("seed", "world_size", "ensemble_size"):
        out[name] = _plain(getattr(handler, name, None))
    _flatten("train.", dict(getattr(handler, "_last_train_kwargs", None) or {}), out)
    for key in ("epochs", "start_epoch"):
        if begin_logs and key in begin_logs:
            out[f"train.{key}"] = _plain(begin_logs[key])
    return out


def numeric_logs(logs: dict[str, Any] | None) -> dict[str, float]:
    """The finite-or-not numeric values of an epoch's ``logs`` as floats, ``epoch`` left out
    (it is the step).

    Example:
        >>> numeric_logs({"epoch": 2, "loss": 0.5, "lr": 0.1, "note": "x", "flag": True})
        {'loss': 0.5, 'lr': 0.1}
    """
    out = {}
    for key, value in (logs or {}).items():
        if key == "epoch":
            continue
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, Real):
            continue
        out[str(key)] = float(value)
    return out


def finite(values: dict[str, float]) -> dict[str, float]:
    """Only the finite values (an epoch that was not validated logs no ``val_*``).

    Example:
        >>> finite({"loss": 1.0, "val_loss": float("nan")})
        {'loss': 1.0}
    """
    return {k: v for k, v in values.items() if math.isfinite(v)}


def checkpoint_path(handler: Any) -> str | None:
    """The newest checkpoint the handler's auto-saver wrote (``None`` when none).

    Example:
        >>> checkpoint_path(None) is None
        True
    """
    saver = getattr(handler, "auto_saver", None)
    return getattr(saver, "last_saved", None) if saver is not None else None


def restore_run_state(logger: Any, state: dict[str, Any], what: str, max_len: int) -> None:
    """Restore a tracker's ``run_id`` (checked: 1..``max_len`` letters, digits, ``-``, ``_``)
    and its last logged checkpoint path from a saved callback state.

    Example:
        >>> class T: pass
        >>> t = T(); restore_run_state(t, {"run_id": "a1"}, "an MLflow", 64); t.run_id
        'a1'
    """
    run_id = state.get("run_id")
    if run_id is not None and not (
        isinstance(run_id, str) and re.fullmatch(rf"[A-Za-z0-9_-]{{1,{max_len}}}", run_id)
    ):
        raise ValueError(
            f"{type(logger).__name__} state run_id must be {what} run id, got {run_id!r}"
        )
    checkpoint = state.get("checkpoint")
    logger.run_id = run_id
    logger._checkpoint = checkpoint if isinstance(checkpoint, str) else None
    logger._restored = True
