"""The handler's logger: standard ``logging``, console and/or file, rank 0 only."""

from __future__ import annotations

import itertools
import logging
import sys
from pathlib import Path

from nnh.handler.enums import LoggingMode

__all__ = ["logging_options", "make_logger"]

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


def logging_options(record: dict | None, source: str = "checkpoint", *, confine: bool = True) -> dict:
    """The ``NNHandler`` logging arguments a checkpoint recorded, for the loaded handler.

    The resumed run logs where the saved one did (a file is appended to). A file name is
    taken from the checkpoint only when it ends in ``.log``, so a crafted file cannot make
    nnh append to an arbitrary path; otherwise logging goes to the console, with a warning.

    Example:
        >>> logging_options({"mode": "file", "filename": "runs/train.log", "level": 20})
        {'logger_mode': 'file', 'logger_filename': 'runs/train.log', 'logger_level': 20}
        >>> logging_options({"mode": None, "filename": None, "level": 20})
        {}
    """
    if not record or record.get("mode") is None:
        return {}
    mode = LoggingMode(str(record["mode"]).lower())
    filename = str(record.get("filename") or "NNHandler.log")
    level = int(record.get("level", logging.INFO))
    if mode is not LoggingMode.CONSOLE and not filename.endswith(".log"):
        import warnings

        warnings.warn(
            f"{source}: the saved log file name {filename!r} does not end in '.log'; "
            "logging to the console instead (set handler.logger to log elsewhere)",
            stacklevel=3,
        )
        mode = LoggingMode.CONSOLE
    return {"logger_mode": mode.value, "logger_filename": filename, "logger_level": level}
