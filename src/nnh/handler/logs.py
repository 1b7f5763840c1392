"""The handler's logger: standard ``logging``, console and/or file, rank 0 only."""

from __future__ import annotations

import itertools
import logging
import sys
from pathlib import Path

from nnh.handler.enums import LoggingMode

__all__ = ["make_logger"]

_counter = itertools.count()
_FORMAT = "%(asctime)s [%(levelname)s] %(name)s: %(message)s"


def make_logger(
    mode: LoggingMode | str | None, filename: str, level: int, *, is_main: bool = True
) -> logging.Logger | None:
    """A logger named ``nnh.handler.N`` with the requested handlers, or ``None``.

    ``None`` when ``mode`` is ``None`` or on a non-main rank. It does not propagate to the
    root logger, so records are not printed twice.

    Example:
        >>> make_logger(None, "x.log", logging.INFO) is None
        True
    """
    if mode is None or not is_main:
        return None
    mode = LoggingMode(mode.value if isinstance(mode, LoggingMode) else str(mode).lower())
    logger = logging.getLogger(f"nnh.handler.{next(_counter)}")
    logger.setLevel(level)
    logger.propagate = False
    formatter = logging.Formatter(_FORMAT)
    if mode in (LoggingMode.CONSOLE, LoggingMode.BOTH):
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(formatter)
        logger.addHandler(console)
    if mode in (LoggingMode.FILE, LoggingMode.BOTH):
        Path(filename).parent.mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(filename)
        file.setFormatter(formatter)
        logger.addHandler(file)
    return logger
