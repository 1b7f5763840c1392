"""The handler's logger: standard ``logging``, console and/or file, rank 0 only."""

from __future__ import annotations

import itertools
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

from nnh.handler.enums import LoggingMode
from nnh.warn import warn as nnh_warn

__all__ = ["EscapingFormatter", "escape_controls", "logging_options", "make_logger"]

_counter = itertools.count()
_FORMAT = "%(asctime)s [%(levelname)s] %(name)s: %(message)s"
_DEFAULT_FILE = "NNHandler.log"
# C0 and C1 controls, DEL, Unicode line/paragraph separators and bidirectional overrides
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape_controls(text: str) -> str:
    """``text`` on one line: newlines, carriage returns, tabs and every other control,
    line-breaking or bidirectional-override character written as an escape.

    Example:
        >>> print(escape_controls("loaded 'a.pth\\n2024-01-01 [INFO] fake'\\x1b[2J"))
        loaded 'a.pth\\n2024-01-01 [INFO] fake'\\x1b[2J
    """
    return _UNSAFE.sub(
        lambda m: (
            _ESCAPES.get(m.group(), f"\\x{ord(m.group()):02x}")
            if ord(m.group()) < 0x100
            else f"\\u{ord(m.group()):04x}"
        ),
        text,
    )


class EscapingFormatter(logging.Formatter):
    """A formatter whose every record is one line: the formatted message has its control
    characters escaped (:func:`escape_controls`), so a newline inside a string read from a
    file cannot start a forged log line, nor an escape sequence rewrite the terminal. A
    traceback or stack, if logged, follows on lines indented by two spaces (its own line
    breaks kept, every other control character escaped), so only real records start at the
    first column.

    Example:
        >>> record = logging.LogRecord("nnh", logging.INFO, __file__, 1, "a\\nb", None, None)
        >>> EscapingFormatter("%(message)s").format(record)
        'a\\\\nb'
    """

    def formatMessage(self, record: logging.LogRecord) -> str:
        return escape_controls(super().formatMessage(record))

    def formatException(self, ei: Any) -> str:
        return _indented(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return _indented(super().formatStack(stack_info))


def _indented(text: str) -> str:
    return "\n".join("  " + escape_controls(line) for line in text.splitlines())


def make_logger(
    mode: LoggingMode | str | None, filename: str, level: int, *, is_main: bool = True
) -> logging.Logger | None:
    """A logger named ``nnh.handler.N`` with the requested handlers, or ``None``.

    ``None`` when ``mode`` is ``None`` or on a non-main rank. It does not propagate to the
    root logger, so records are not printed twice. Every record is written on one line
    (:class:`EscapingFormatter`): control characters in a message are escaped.

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
    formatter = EscapingFormatter(_FORMAT)
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


def logging_options(
    record: dict | None, source: str = "checkpoint", *, confine: bool = True
) -> dict:
    """The ``NNHandler`` logging arguments a checkpoint recorded, for the loaded handler.

    The resumed run logs where the saved one did (a file is appended to), within limits, as
    the record is data from a stranger. Never raises; each problem is a warning naming the
    record and the fix:

    * ``mode`` must be one of ``"console"``, ``"file"``, ``"both"`` (any case) or ``None``
      (no logging); anything else logs to the console;
    * ``level`` must be an int in ``[0, 50]``, else ``logging.INFO``;
    * a file (modes ``"file"``, ``"both"``) must be a ``str`` ending in ``.log`` and, when
      ``confine`` is True, a confined path (:func:`nnh.checkpoint.confine.path_problem`
      over :func:`~nnh.checkpoint.confine.working_folders`: the working folder, or the
      folder of the checkpoint ``source``). A file outside the working folder is taken only
      if its folder exists (nnh never creates folders outside the working folder). A
      refused file gives console logging.

    Example:
        >>> logging_options({"mode": "file", "filename": "runs/train.log", "level": 20})
        {'logger_mode': 'file', 'logger_filename': 'runs/train.log', 'logger_level': 20}
        >>> logging_options({"mode": None, "filename": None, "level": 20})
        {}
        >>> import warnings
        >>> with warnings.catch_warnings(record=True):
        ...     logging_options({"mode": "both", "filename": "../x.log", "level": 99})
        {'logger_mode': 'console', 'logger_filename': 'NNHandler.log', 'logger_level': 20}
    """
    from nnh.checkpoint.confine import path_problem, safe_repr, working_folders

    def warn(message: str) -> None:
        nnh_warn(f"checkpoint {safe_repr(source)}: {message}")

    fix = "set handler.logger, or build the handler with logger_mode=/logger_filename="
    if record is None:
        return {}
    if not isinstance(record, dict):
        warn(f"logging = {safe_repr(record)} is not a dict; no logging. What to do: {fix}")
        return {}
    raw_mode = record.get("mode")
    if raw_mode is None:
        return {}
    values = {m.value for m in LoggingMode}
    if isinstance(raw_mode, str) and raw_mode.lower() in values:
        mode = LoggingMode(raw_mode.lower())
    else:
        warn(
            f"logging.mode = {safe_repr(raw_mode)} is not one of {sorted(values)}; logging to "
            f"the console instead. What to do: {fix}"
        )
        mode = LoggingMode.CONSOLE
    level = record.get("level", logging.INFO)
    if not (isinstance(level, int) and not isinstance(level, bool) and 0 <= level <= 50):
        warn(
            f"logging.level = {safe_repr(level)} is not an int in [0, 50]; using INFO (20). "
            "What to do: set handler.logger.setLevel(...) after loading"
        )
        level = logging.INFO
    filename = record.get("filename")
    if filename is None:
        filename = _DEFAULT_FILE
    if mode is LoggingMode.CONSOLE:
        return {"logger_mode": mode.value, "logger_filename": _DEFAULT_FILE, "logger_level": level}
    problem = None
    if not isinstance(filename, str) or not filename.endswith(".log"):
        problem = (
            f"logging.filename = {safe_repr(filename)}: the saved log file name does not end in "
            f"'.log'; logging to the console instead. What to do: {fix}"
        )
    elif confine:
        folders = working_folders(source)
        reason = path_problem(filename, base=folders, kind="file")
        work = os.path.realpath(folders[0])
        parent = os.path.dirname(os.path.realpath(os.path.join(work, filename)))
        if (
            reason is None
            and os.path.commonpath([parent, work]) != work
            and not os.path.isdir(parent)
        ):
            reason = "lies in a folder outside the working folder that does not exist (nnh does not create it)"
        if reason is not None:
            problem = (
                f"logging.filename = {safe_repr(filename)} {reason}; logging to the console "
                f"instead. What to do: {fix}"
            )
    elif "\x00" in filename:
        problem = f"logging.filename = {safe_repr(filename)} contains a NUL byte; logging to the console instead. What to do: {fix}"
    if problem is not None:
        warn(problem)
        return {"logger_mode": "console", "logger_filename": _DEFAULT_FILE, "logger_level": level}
    return {"logger_mode": mode.value, "logger_filename": filename, "logger_level": level}
