"""The shell side of vectorised ensembles (``NNHandler(..., ensemble_size=E)``).

The core (:mod:`nnh.core.ensemble`) trains the members; this module holds what the handler
needs around it: building the members, their per-member epoch histories, and the
checkpoint record. ``NNHandler`` only delegates here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import attrs
import torch
from torch import nn

from nnh.core.accumulate import member_means
from nnh.core.ensemble import EnsembleModule
from nnh.handler.history import History

__all__ = [
    "Ensemble",
    "MemberHistory",
    "check_ensemble_size",
    "gather_member_predictions",
    "move_member_dim",
    "trim_member_batch",
]


def check_ensemble_size(value: Any) -> int | None:
    """``None`` or an int >= 1, else a ``ValueError`` naming the argument.

    Example:
        >>> check_ensemble_size(4), check_ensemble_size(None)
        (4, None)
        >>> check_ensemble_size(0)
        Traceback (most recent call last):
            ...
        ValueError: ensemble_size must be an int >= 1 (or None for a single model), got 0
    """
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(
            f"ensemble_size must be an int >= 1 (or None for a single model), got {value!r}"
        )
    return value


@attrs.define
class MemberHistory:
    """Per-member epoch means: entry ``[epoch][member]``, aligned like :class:`~nnh.History`.

    Example:
        >>> h = MemberHistory()
        >>> h.append([1.0, 3.0], None, {}, None)
        >>> h.train_losses, h.member(1).train_losses
        ([[1.0, 3.0]], [3.0])
    """

    train_losses: list[list[float]] = attrs.field(factory=list)
    val_losses: list[list[float]] = attrs.field(factory=list)
    train_metrics: dict[str, list[list[float]]] = attrs.field(factory=dict)
    val_metrics: dict[str, list[list[float]]] = attrs.field(factory=dict)

    def append(
        self,
        train_losses: Sequence[float],
        val_losses: Sequence[float] | None,
        train_metrics: dict[str, Sequence[float]],
        val_metrics: dict[str, Sequence[float]] | None,
    ) -> None:
        """Record one epoch (validation entries are ``nan`` when it was not validated)."""
        size = len(train_losses)
        epoch = len(self.train_losses)
        self.train_losses.append([float(v) for v in train_losses])
        self.val_losses.append(
            [math.nan] * size if val_losses is None else [float(v) for v in val_losses]
        )
        for store, values in (
            (self.train_metrics, train_metrics),
            (self.val_metrics, val_metrics or {}),
        ):
            for name in set(store) | set(values):
                series = store.setdefault(name, [[math.nan] * size for _ in range(epoch)])
                series.append([float(v) for v in values.get(name, [math.nan] * size)])

    def member(self, index: int) -> History:
        """Member ``index``'s history as a plain :class:`~nnh.History`."""
        pick = lambda rows: [row[index] for row in rows]  # noqa: E731
        return History(
            train_losses=pick(self.train_losses),
            val_losses=pick(self.val_losses),
            train_metrics={k: pick(v) for k, v in self.train_metrics.items()},
            val_metrics={k: pick(v) for k, v in self.val_metrics.items()},
        )

    def state_dict(self) -> dict[str, Any]:
        """Plain lists and dicts (checkpoint-safe)."""
        return attrs.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`."""
        rows = lambda v: [[float(x) for x in row] for row in v]  # noqa: E731
        self.train_losses = rows(state.get("train_losses", []))
        self.val_losses = rows(state.get("val_losses", []))
        self.train_metrics = {k: rows(v) for k, v in state.get("train_metrics", {}).items()}
        self.val_metrics = {k: rows(v) for k, v in state.get("val_metrics", {}).items()}


@attrs.define
class Ensemble:
    """What a handler knows about its ensemble: the size and the per-member history.

    Example:
        >>> ens = Ensemble(3)
        >>> ens.build(nn.Linear, {"in_features": 2, "out_features": 1}).weight.shape
        torch.Size([3, 1, 2])
    """

    size: int
    history: MemberHistory = attrs.field(factory=MemberHistory)

    def build(self, model_class: type[nn.Module], model_kwargs: dict[str, Any]) -> EnsembleModule:
        """``size`` members ``model_class(**model_kwargs)``, built one after another from the
        global generator (seed torch first to reproduce them), stacked."""
        return EnsembleModule([model_class(**model_kwargs) for _ in range(self.size)])

    def record_epoch(
        self, flat: torch.Tensor, n_train: int, names: Sequence[str], has_val: bool
    ) -> None:
        """Append an epoch's per-member means from the handler's reduced sums vector."""
        losses, metrics = member_means(flat[:n_train], names, self.size)
        val_losses, val_metrics = None, None
        if has_val:
            val_losses, val_metrics = member_means(flat[n_train:], names, self.size)
        self.history.append(losses, val_losses, metrics, val_metrics)

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint's ``ensemble`` section."""
        return {"size": self.size, "member_history": self.history.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the per-member history of a checkpoint's ``ensemble`` section."""
        self.history.load_state_dict(state.get("member_history") or {})


def move_member_dim(x: Any, source: int, destination: int) -> Any:
    """``torch.movedim`` on every tensor of a (nested) output.

    Example:
        >>> move_member_dim(torch.zeros(2, 5, 3), 0, -1).shape
        torch.Size([5, 3, 2])
    """
    if isinstance(x, torch.Tensor):
        return x.movedim(source, destination)
    if isinstance(x, (list, tuple)):
        return type(x)(move_member_dim(v, source, destination) for v in x)
    if isinstance(x, dict):
        return {key: move_member_dim(v, source, destination) for key, v in x.items()}
    return x


def gather_member_predictions(dist: Any, outputs: list[Any], loader: Any) -> list[Any] | None:
    """:func:`nnh.distributed.ddp.gather_predictions` for ``[E, B, ...]`` outputs: samples are gathered
    along their own dimension, the member dimension moved last meanwhile."""
    from nnh.distributed.ddp import gather_predictions

    moved = [move_member_dim(o, 0, -1) for o in outputs]
    gathered = gather_predictions(dist, moved, loader)
    return None if gathered is None else [move_member_dim(o, -1, 0) for o in gathered]


def trim_member_batch(x: Any, k: int) -> Any:
    """The first ``k`` samples of every member's ``[E, B, ...]`` outputs (padding removed).

    Example:
        >>> trim_member_batch(torch.zeros(2, 5, 3), 4).shape
        torch.Size([2, 4, 3])
    """
    if isinstance(x, torch.Tensor):
        return x[:, :k] if x.dim() > 1 else x
    if isinstance(x, (list, tuple)):
        return type(x)(trim_member_batch(v, k) for v in x)
    if isinstance(x, dict):
        return {key: trim_member_batch(v, k) for key, v in x.items()}
    return x
