"""Sample-weighted metric sums: the unit in which epoch values are exact means."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = ["MetricError", "metric_sums"]


class MetricError(RuntimeError):
    """A registered metric function raised or returned something that is not a number."""


def metric_sums(
    metrics: Mapping[str, Callable[[Any, Any], Any]], output: Any, target: Any, num_samples: int
) -> dict[str, torch.Tensor | float]:
    """``{name: metric(output, target) * num_samples}``; tensors stay on their device (no sync).

    Example:
        >>> acc = lambda out, y: (out.argmax(1) == y).float().mean()
        >>> sums = metric_sums({"acc": acc}, torch.eye(2), torch.tensor([0, 0]), 2)
        >>> float(sums["acc"])
        1.0
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
                out[name] = value.detach().reshape(()).double() * num_samples
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                out[name] = float(value) * num_samples
            else:
                raise MetricError(
                    f"metric {name!r} returned {type(value).__name__}; return a number or a 0-d tensor"
                )
    return out
