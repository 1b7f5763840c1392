"""Sample-weighted metric sums: the unit in which epoch values are exact means."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = ["MetricError", "metric_sums"]


class MetricError(RuntimeError):
    """A registered metric function raised or returned something that is not a number."""


def _weighted(value: torch.Tensor, num_samples: int) -> torch.Tensor:
    """``value * num_samples`` in float64, multiplied in the value's own precision first.

    A float32 batch mean ``k / n`` times ``n`` rounds back to exactly ``k`` in float32, so
    accuracy-like sums stay exact integers and ``195 / 200`` logs as ``0.975`` rather than
    ``0.97500002`` (what float32's ``0.975`` is in float64). No host sync.
    """
    if value.dtype in (torch.float16, torch.bfloat16):
        value = value.float()
    return (value * num_samples).double()


def metric_sums(
    metrics: Mapping[str, Callable[[Any, Any], Any]], output: Any, target: Any, num_samples: int
) -> dict[str, torch.Tensor | float]:
    """``{name: metric(output, target) * num_samples}``; tensors stay on their device (no sync).

    Example:
        >>> acc = lambda out, y: (out.argmax(1) == y).float().mean()
        >>> sums = metric_sums({"acc": acc}, torch.eye(2), torch.tensor([0, 0]), 2)
        >>> float(sums["acc"])
        1.0
        >>> mean = torch.tensor(195 / 200, dtype=torch.float32)   # a float32 accuracy
        >>> float(metric_sums({"acc": lambda o, t: mean}, None, None, 200)["acc"]) / 200
        0.975
    """
    out: dict[str, torch.Tensor | float] = {}
    with torch.no_grad():
        for name, fn in metrics.items():
            try:
                value = fn(output, target)
            except Exception as err:
                raise MetricError(
                    f"metric {name!r} failed on a batch: {type(err).__name__}: {err}"
                ) from err
            if isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    raise MetricError(
                        f"metric {name!r} returned a tensor of shape {tuple(value.shape)}; "
                        "return a number or a 0-d tensor (the batch mean)"
                    )
                out[name] = _weighted(value.detach().reshape(()), num_samples)
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                out[name] = float(value) * num_samples
            else:
                raise MetricError(
                    f"metric {name!r} returned {type(value).__name__}; return a number or a 0-d tensor"
                )
    return out
