"""Per-epoch history of losses and metrics."""

from __future__ import annotations

from typing import Any

import attrs

__all__ = ["History"]


@attrs.define
class History:
    """Epoch means, aligned by epoch: a list entry per trained epoch.

    Validation entries are ``nan`` for epochs that were not validated
    (``validate_every > 1``), so index ``i`` is always epoch ``i + 1``.

    Example:
        >>> h = History()
        >>> h.append(1.0, None, {}, {})
        >>> h.train_losses, h.val_losses
        ([1.0], [nan])
    """

    train_losses: list[float] = attrs.field(factory=list)
    val_losses: list[float] = attrs.field(factory=list)
    train_metrics: dict[str, list[float]] = attrs.field(factory=dict)
    val_metrics: dict[str, list[float]] = attrs.field(factory=dict)
    # epochs after which a loaded checkpoint continued (plots mark them); not part of
    # state_dict, so a resumed run's history equals the uninterrupted one's
    resumed_at: list[int] = attrs.field(factory=list)

    def append(
        self,
        train_loss: float,
        val_loss: float | None,
        train_metrics: dict[str, float],
        val_metrics: dict[str, float] | None,
    ) -> None:
        """Record one epoch (metrics first seen later are padded with ``nan`` before)."""
        epoch = len(self.train_losses)
        self.train_losses.append(float(train_loss))
        self.val_losses.append(float("nan") if val_loss is None else float(val_loss))
        _append_metrics(self.train_metrics, train_metrics, epoch)
        _append_metrics(self.val_metrics, val_metrics or {}, epoch)

    def state_dict(self) -> dict[str, Any]:
        """Plain lists and dicts (checkpoint-safe)."""
        return attrs.asdict(self, filter=lambda a, _: a.name != "resumed_at")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`."""
        self.train_losses = [float(v) for v in state.get("train_losses", [])]
        self.val_losses = [float(v) for v in state.get("val_losses", [])]
        self.train_metrics = {
            k: [float(x) for x in v] for k, v in state.get("train_metrics", {}).items()
        }
        self.val_metrics = {
            k: [float(x) for x in v] for k, v in state.get("val_metrics", {}).items()
        }


def _append_metrics(store: dict[str, list[float]], values: dict[str, float], epoch: int) -> None:
    for name in set(store) | set(values):
        series = store.setdefault(name, [float("nan")] * epoch)
        series.append(float(values.get(name, float("nan"))))
