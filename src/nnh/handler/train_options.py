"""``train()`` options that carry over: a call continues with the options of the last one.

The handler remembers the options of its last :meth:`~nnh.NNHandler.train` call (they are
saved in checkpoints too). An option not passed to the next call keeps that value instead
of falling back to the signature's default, so ``NNHandler.load(path).train(epochs=5)``
continues with the same accumulation, AMP, clipping and EMA as the run that wrote ``path``.
Pass an option to change it.

Example:
    >>> class Demo:
    ...     _last_train_kwargs = {"ema_decay": 0.99, "use_amp": True}
    ...     def _log(self, message): print(message)
    ...     @remembers_train_options
    ...     def train(self, epochs, use_amp=False, ema_decay=0.0, seed=None):
    ...         return epochs, use_amp, ema_decay
    >>> Demo().train(3, use_amp=False)
    train(): continuing with the options of the last call: ema_decay=0.99
    (3, False, 0.99)
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["TRAIN_OPTIONS", "remembers_train_options"]

# The options a handler remembers (``epochs`` and ``seed`` apply to one call only).
TRAIN_OPTIONS = (
    "validate_every",
    "gradient_accumulation_steps",
    "use_amp",
    "gradient_clipping_norm",
    "ema_decay",
    "progress_bar",
    "debug_print_interval",
    "save_on_last_epoch",
    "epoch_train_and_val_pbar",
)

F = TypeVar("F", bound=Callable[..., Any])


def remembers_train_options(train: F) -> F:
    """Wrap ``train(self, epochs, **options)`` so options not passed take the values of
    ``self._last_train_kwargs`` (when set); the signature shown stays ``train``'s own."""
    signature = inspect.signature(train)

    @functools.wraps(train)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(self, *args, **kwargs)
        saved = getattr(self, "_last_train_kwargs", None) or {}
        continued = {k: saved[k] for k in TRAIN_OPTIONS if k in saved and k not in bound.arguments}
        if continued:
            self._log(
                "train(): continuing with the options of the last call: "
                + ", ".join(f"{k}={v!r}" for k, v in continued.items())
            )
            bound.arguments.update(continued)
        return train(*bound.args, **bound.kwargs)

    return wrapper  # type: ignore[return-value]
