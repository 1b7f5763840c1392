"""Loss and metric plots with matplotlib's object API (headless-safe: no pyplot state)."""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from nnh.handler.history import History

__all__ = ["plot_losses", "plot_metrics"]


def _series(ax, values: list[float], label: str, style: str) -> bool:
    points = [(i + 1, v) for i, v in enumerate(values) if not math.isnan(v)]
    if not points:
        return False
    xs, ys = zip(*points)
    ax.plot(xs, ys, style, label=label, markersize=4)
    return True


def _title(name: str) -> str:
    """Every plot's title: ``'<Name> per epoch'``."""
    return f"{name[:1].upper()}{name[1:]} per epoch"


def _mark_resumes(ax, history: History) -> None:
    """A dotted vertical line after each epoch where a loaded checkpoint continued."""
    epochs = len(history.train_losses)
    points = [e for e in history.resumed_at if 0 < e < epochs]
    for i, epoch in enumerate(points):
        label = "resumed from checkpoint" if i == 0 else None
        ax.axvline(epoch + 0.5, color="gray", linestyle=":", linewidth=1.2, label=label)


def _figure(title: str, ylabel: str, log_y: bool) -> tuple[Figure, object]:
    fig = Figure(figsize=(7, 4.5), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if log_y:
        ax.set_yscale("log")
    return fig, ax


def plot_losses(
    history: History, *, log_y_scale: bool = False, save_path: str | None = None
) -> Figure:
    """Training and validation loss per epoch; saved to ``save_path`` when given.

    Example:
        >>> h = History(); h.append(1.0, 1.2, {}, {}); h.append(0.5, 0.7, {}, {})
        >>> fig = plot_losses(h)
        >>> [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
        ['train', 'validation']
        >>> fig.axes[0].get_title()
        'Loss per epoch'
    """
    if not history.train_losses:
        raise ValueError("no history to plot yet: train first")
    fig, ax = _figure(_title("loss"), "loss", log_y_scale)
    _series(ax, history.train_losses, "train", "o-")
    _series(ax, history.val_losses, "validation", "s--")
    _mark_resumes(ax, history)
    ax.legend()
    if save_path is not None:
        Path(save_path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(save_path)
    return fig


def plot_metrics(
    history: History, *, log_y_scale: bool = False, save_path_prefix: str | None = None
) -> dict[str, Figure]:
    """One figure per metric; saved as ``{prefix}_{metric}.png`` when a prefix is given.

    Example:
        >>> h = History(); h.append(1.0, None, {"acc": 0.5}, {"acc": 0.4})
        >>> sorted(plot_metrics(h))
        ['acc']
    """
    names = sorted(set(history.train_metrics) | set(history.val_metrics))
    if not names:
        raise ValueError("no metrics recorded: register them with add_metric and train first")
    figures = {}
    for name in names:
        fig, ax = _figure(_title(name), name, log_y_scale)
        _series(ax, history.train_metrics.get(name, []), "train", "o-")
        _series(ax, history.val_metrics.get(name, []), "validation", "s--")
        _mark_resumes(ax, history)
        ax.legend()
        if save_path_prefix is not None:
            path = Path(f"{save_path_prefix}_{name}.png")
            path.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(path)
        figures[name] = fig
    return figures
