"""Progress output that reads well both in a terminal and in a log file.

In a terminal (stderr is a TTY) nnh draws tqdm bars. In a Slurm log, under ``nohup`` or
with stderr redirected to a file, a bar would write a carriage-return frame at every
refresh; there nnh writes one plain line per epoch instead, and no bars.
``NNH_PROGRESS=bars`` or ``NNH_PROGRESS=lines`` overrides the choice.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any

__all__ = ["epoch_line", "interactive"]


def interactive() -> bool:
    """Whether progress bars should be drawn: stderr is a terminal (or ``NNH_PROGRESS=bars``).

    Example:
        >>> import os
        >>> from nnh.handler.progress import interactive
        >>> os.environ["NNH_PROGRESS"] = "lines"
        >>> interactive()
        False
        >>> del os.environ["NNH_PROGRESS"]
    """
    choice = os.environ.get("NNH_PROGRESS", "").strip().lower()
    if choice in ("bars", "bar"):
        return True
    if choice in ("lines", "line"):
        return False
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):
        return False


def epoch_line(epoch: int, last_epoch: int, logs: dict[str, Any]) -> str:
    """One line for a log file: ``Epoch 3/10: loss=0.412, val_loss=0.398``; written to stderr.

    Example:
        >>> from nnh.handler.progress import epoch_line
        >>> import contextlib, io
        >>> with contextlib.redirect_stderr(io.StringIO()):
        ...     epoch_line(3, 10, {"loss": 0.41234, "val_loss": float("nan")})
        'Epoch 3/10: loss=0.4123'
    """
    values = ", ".join(
        f"{k}={v:.4g}"
        for k, v in logs.items()
        if k != "epoch" and isinstance(v, (int, float)) and not math.isnan(v)
    )
    line = f"Epoch {epoch}/{last_epoch}" + (f": {values}" if values else "")
    print(line, file=sys.stderr, flush=True)
    return line
