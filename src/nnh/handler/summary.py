"""The text summary behind ``NNHandler.print``."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from nnh.handler import NNHandler

__all__ = ["summarize"]


def _name(obj: object) -> str:
    if obj is None:
        return "None"
    return (
        getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None) or type(obj).__name__
    )


def summarize(handler: NNHandler, *, show_model_structure: bool = False) -> str:
    """A multi-line summary of a handler's configuration and progress (the last epoch's
    training and validation loss and metrics included); returned, not printed."""
    h = handler
    lines = ["NNHandler", "=" * 60]
    lines.append(f"model          : {type(h.module).__name__} ({h.model_type.value})")
    lines.append(
        f"parameters     : {h.count_parameters():,} trainable / {h.count_parameters(False):,} total"
    )
    lines.append(
        f"device         : {h.device}"
        + (f" (rank {h.rank} of {h.world_size})" if h.is_distributed else "")
    )
    opt = h.optimizer
    if opt is not None:
        lines.append(f"optimizer      : {type(opt).__name__} (lr={opt.param_groups[0].get('lr')})")
    else:
        lines.append("optimizer      : None")
    lines.append(
        f"scheduler      : {type(h.scheduler).__name__ if h.scheduler is not None else 'None'}"
    )
    lines.append(
        f"loss function  : {_name(h.loss_fn)}"
        + (f" kwargs={h.loss_fn_kwargs}" if h.loss_fn_kwargs else "")
    )
    lines.append(f"metrics        : {', '.join(h.metrics) or 'none'}")
    lines.append(f"callbacks      : {', '.join(type(c).__name__ for c in h.callbacks) or 'none'}")
    for which, loader in (("train data", h.train_loader), ("val data", h.val_loader)):
        if loader is not None:
            lines.append(
                f"{which:<15}: {len(loader.dataset) if hasattr(loader.dataset, '__len__') else '?'} samples, "
                f"batch size {loader.batch_size}, {len(loader)} batches"
            )
    if h.sde is not None:
        lines.append(f"SDE            : {type(h.sde).__name__}")
    if h.sampler is not None:
        lines.append(f"sampler        : {type(h.sampler).__name__}")
    saver = h.auto_saver
    lines.append(
        f"auto-save      : {'every ' + str(saver.interval) + ' epochs to ' + saver.save_path if saver.enabled else 'off'}"
    )
    state = h.state
    if state is not None:
        lines.append(
            f"progress       : {state.epoch} epochs, {state.step} optimizer steps"
            + (", EMA on" if state.ema is not None else "")
        )
    history = h.history
    if history is not None and history.train_losses:
        last = history.train_losses[-1]
        val = history.val_losses[-1] if history.val_losses else math.nan
        lines.append(
            f"last epoch     : loss {last:.6g}"
            + ("" if math.isnan(val) else f", val_loss {val:.6g}")
        )
        for name, series in history.train_metrics.items():
            val_series = history.val_metrics.get(name) or [math.nan]
            lines.append(
                f"  {name:<13}: {series[-1]:.6g}"
                + ("" if math.isnan(val_series[-1]) else f", val_{name} {val_series[-1]:.6g}")
            )
    if show_model_structure:
        lines.append("-" * 60)
        lines.append(str(h.module))
    return "\n".join(lines)
