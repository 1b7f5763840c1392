"""Warnings that point at the user's line, once per process.

Every warning nnh raises goes through :func:`warn`: it is attributed to the first frame of
the call stack outside the ``nnh`` package (the user's line that led to it, not nnh's
internals), and a given warning is shown at most once per process. Set the environment
variable ``NNH_WARN_ALWAYS=1`` (or call ``set_repeat(True)``) to see every repetition.

Example:
    >>> import warnings
    >>> from nnh.warn import reset, warn
    >>> reset()
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     first = warn("careful")
    ...     again = warn("careful")   # the same warning again: not repeated
    >>> first, again
    (True, False)
    >>> len(caught)
    1
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

__all__ = ["reset", "set_repeat", "warn"]

_PACKAGE = str(Path(__file__).resolve().parent) + os.sep
_seen: set[tuple[type, str]] = set()
_repeat = False


def _inside_nnh(filename: str) -> bool:
    try:
        return str(Path(filename).resolve()).startswith(_PACKAGE)
    except (OSError, ValueError):
        return False


def warn(message: str, category: type[Warning] = UserWarning, *, key: str | None = None) -> bool:
    """Warn ``message`` at the first frame outside nnh; at most once per process per
    ``(category, key or message)``. Returns whether the warning was issued.

    Example:
        >>> from nnh.warn import reset, warn
        >>> reset()
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     issued = warn("check the data", RuntimeWarning)
        >>> issued, caught[0].category.__name__
        (True, 'RuntimeWarning')
    """
    ident = (category, key if key is not None else message)
    if ident in _seen and not (_repeat or os.environ.get("NNH_WARN_ALWAYS") == "1"):
        return False
    _seen.add(ident)
    frame = sys._getframe(1)
    level = 2
    while frame is not None and _inside_nnh(frame.f_code.co_filename):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)
    return True


def set_repeat(repeat: bool) -> None:
    """Show every repetition of a warning (``True``) or each one once (``False``, default).

    Example:
        >>> from nnh.warn import set_repeat
        >>> set_repeat(False)
    """
    global _repeat
    _repeat = bool(repeat)


def reset() -> None:
    """Forget which warnings were shown (each shows once again).

    Example:
        >>> from nnh.warn import reset
        >>> reset()
    """
    _seen.clear()
