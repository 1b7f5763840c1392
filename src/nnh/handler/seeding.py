"""Seeding: the global generators, and a model's initial weights through the handler.

``NNHandler(Model, seed=0)`` seeds torch (CPU and CUDA) and Python's ``random`` *before*
``Model`` is built, so its initial weights are the same on every run. A model whose
constructor itself has a ``seed`` parameter receives the same value too (the handler's
``seed`` is then both: the generators are seeded and the model gets ``seed=``).

Example:
    >>> import torch
    >>> seed_everything(3); a = torch.rand(2)
    >>> seed_everything(3); torch.equal(a, torch.rand(2))
    True
"""

from __future__ import annotations

import inspect
import random
from typing import Any

import torch

__all__ = ["check_seed", "model_kwargs_with_seed", "seed_everything"]


def check_seed(value: Any) -> int | None:
    """``value`` if it is an int or None, else a ``TypeError`` naming the argument.

    Example:
        >>> check_seed(None), check_seed(7)
        (None, 7)
    """
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
        raise TypeError(f"seed must be an int or None, got {type(value).__name__}")
    return value


def seed_everything(value: int) -> None:
    """Seed torch (CPU and every CUDA device) and Python's ``random`` with ``value``."""
    torch.manual_seed(value)
    random.seed(value)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(value)


def model_kwargs_with_seed(
    model_class: type, seed: int | None, model_kwargs: dict[str, Any]
) -> dict[str, Any]:
    """``model_kwargs`` plus ``seed=seed`` when ``model_class`` has a ``seed`` parameter.

    Example:
        >>> class Seeded:
        ...     def __init__(self, width, seed=None): ...
        >>> model_kwargs_with_seed(Seeded, 5, {"width": 2})
        {'width': 2, 'seed': 5}
        >>> model_kwargs_with_seed(torch.nn.Linear, 5, {"in_features": 2})
        {'in_features': 2}
    """
    if seed is None:
        return model_kwargs
    try:
        params = inspect.signature(model_class).parameters
    except (TypeError, ValueError):
        return model_kwargs
    if "seed" in params and params["seed"].kind in (
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.KEYWORD_ONLY,
    ):
        return {**model_kwargs, "seed": seed}
    return model_kwargs
