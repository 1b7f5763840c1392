"""Errors from a stranger's data, named as such.

A checkpoint may embed its training and validation data. nnh checks what it can at load
(tensor counts and lengths, index ranges, dtypes of a score model's samples), but whether
data fits a model — target classes in range, feature sizes, dtypes the model accepts — is
only known when the model runs on it. For a handler loaded from a file that is not the
user's own, :func:`guard_restored_data` turns an error raised while ``train()`` runs on the
loaders that file supplied into a :class:`~nnh.checkpoint.CheckpointError` (kind
``"incompatible_data"``) naming the file, with the original error attached as its cause.
Once the user sets a loader of their own, errors pass through unchanged.

Example:
    >>> class Demo:
    ...     _train_loader = "restored"
    ...     _val_loader = None
    ...     _restored_data = ("x.pth", "restored", None)
    ...     @guard_restored_data
    ...     def train(self):
    ...         raise IndexError("Target 1000000 is out of bounds.")
    >>> try:
    ...     Demo().train()
    ... except CheckpointError as err:
    ...     print(err.kind)
    incompatible_data
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from nnh.checkpoint.errors import CheckpointError

__all__ = ["guard_restored_data"]

F = TypeVar("F", bound=Callable[..., Any])


def _on_restored_data(handler: Any) -> str | None:
    restored = getattr(handler, "_restored_data", None)
    if restored is None:
        return None
    path, train, val = restored
    if handler._train_loader is train and handler._val_loader in (val, None):
        return path
    return None


def guard_restored_data(train: F) -> F:
    """Wrap ``train`` so an error on a foreign file's data is a ``CheckpointError``."""

    @functools.wraps(train)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return train(self, *args, **kwargs)
        except (CheckpointError, FloatingPointError):
            raise
        except Exception as err:
            path = _on_restored_data(self)
            if path is None:
                raise
            raise CheckpointError(
                f"training on the data embedded in checkpoint {path!r} failed "
                f"({type(err).__name__}: {str(err)[:300]}). That file is not your own and its "
                "data does not fit the model. What to do: set your own data with "
                "set_train_loader(...) / set_val_loader(...), or load with "
                "NNHandler.load(path) only files you trust.",
                path=path,
                kind="incompatible_data",
            ) from err

    return wrapper  # type: ignore[return-value]
