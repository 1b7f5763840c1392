"""Stateful metrics (``torchmetrics.Metric`` and alike) as handler metrics.

A plain metric function returns a batch mean that the handler averages over samples; that
is wrong for metrics that are not means of per-batch values (macro-F1, AUROC, ...). An
object with ``update``/``compute``/``reset`` is instead updated on every batch, computed once
at the end of the epoch, and reset at the start of the next. Training and validation keep
separate states. Under DDP ``compute`` runs the metric's own synchronisation over ranks;
DistributedSampler padding is trimmed before ``update``, so the value equals the metric
over the whole data set. Install torchmetrics with ``pip install nnh[metrics]``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "StatefulMetric",
    "as_handler_metric",
    "begin_phase",
    "end_phase",
    "is_stateful_metric",
]

PHASES = ("train", "val")


def is_stateful_metric(obj: Any) -> bool:
    """Whether ``obj`` is a stateful metric (``update``, ``compute`` and ``reset`` methods).

    Example:
        >>> is_stateful_metric(lambda out, y: 0.0)
        False
    """
    return all(callable(getattr(obj, m, None)) for m in ("update", "compute", "reset"))


class StatefulMetric:
    """Adapts a stateful metric to the handler's ``metric(output, target)`` calls.

    Called on a batch it updates the current phase's state and returns ``0.0`` (the
    handler's sample-weighted mean of those is replaced by :func:`end_phase`).

    Example:
        >>> class Total:  # a minimal stateful metric: the sum of all outputs
        ...     def __init__(self): self.total = 0.0
        ...     def update(self, out, y): self.total += float(out.sum())
        ...     def compute(self): return torch.tensor(self.total)
        ...     def reset(self): self.total = 0.0
        >>> m = StatefulMetric(Total())
        >>> begin_phase({"total": m}, "train")
        >>> m(torch.ones(2), None), m(torch.ones(3), None)
        (0.0, 0.0)
        >>> end_phase({"total": m}, "train", {"total": 0.0})
        {'total': 5.0}
    """

    def __init__(self, metric: Any):
        self.metric = metric
        self.states = {"train": metric, "val": copy.deepcopy(metric)}
        self.phase = "train"
        self.updated = dict.fromkeys(PHASES, False)
        self.device: torch.device | None = None

    def __call__(self, output: Any, target: Any) -> float:
        state = self.states[self.phase]
        device = getattr(output, "device", None)
        if isinstance(state, torch.nn.Module) and device is not None and device != self.device:
            for metric in self.states.values():  # once: the state lives where the outputs are
                metric.to(device)
            self.device = device
        state.update(output, target)
        self.updated[self.phase] = True
        return 0.0

    def begin(self, phase: str) -> None:
        """Reset ``phase``'s state; the following batches update it."""
        self.phase, self.updated[phase] = phase, False
        self.states[phase].reset()

    def end(self, phase: str) -> float:
        """``phase``'s computed value (``nan`` when it saw no batch), then reset it.

        Under DDP every rank computes (the metric's sync is a collective).
        """
        state = self.states[phase]
        if not (self.updated[phase] or (dist.is_available() and dist.is_initialized())):
            return float("nan")
        value = state.compute()
        state.reset()
        return float(value.item() if isinstance(value, torch.Tensor) else value)


def as_handler_metric(metric: Any) -> Any:
    """A stateful metric wrapped in :class:`StatefulMetric`; a function unchanged.

    Example:
        >>> fn = lambda out, y: 0.0
        >>> as_handler_metric(fn) is fn
        True
    """
    return StatefulMetric(metric) if is_stateful_metric(metric) else metric


def begin_phase(metrics: Mapping[str, Any], phase: str) -> None:
    """Start a training or validation pass: reset the stateful metrics' states of ``phase``."""
    for metric in metrics.values():
        if isinstance(metric, StatefulMetric):
            metric.begin(phase)


def end_phase(metrics: Mapping[str, Any], phase: str, values: dict[str, float]) -> dict[str, float]:
    """``values`` with each stateful metric's entry replaced by its computed value.

    Every rank must call this (a metric's ``compute`` may synchronise over ranks); a metric
    whose phase saw no batch gets ``nan``.
    """
    out = dict(values)
    for name, metric in metrics.items():
        if isinstance(metric, StatefulMetric):
            out[name] = metric.end(phase)
    return out
