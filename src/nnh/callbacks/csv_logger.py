"""CSVLogger: one CSV row per epoch with every logged value."""

from __future__ import annotations

import csv
import io
import math
import os
import re
import stat
from pathlib import Path
from typing import Any

import torch

from nnh.callbacks.base import Callback
from nnh.checkpoint.atomic import claim_temp_file
from nnh.warn import warn as nnh_warn

__all__ = ["CSVLogger", "header_cell", "header_name", "read_header"]

# What a spreadsheet takes for the start of a formula (and the guard itself, to stay reversible)
_FORMULA_START = ("=", "+", "-", "@", "'")
_UNSAFE = re.compile(r"[\\\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_UNESCAPE = re.compile(r"\\(\\|n|r|t|x[0-9a-f]{2}|u[0-9a-f]{4})")


def header_cell(name: str) -> str:
    """A column name as written in the CSV file: one line, never a formula, reversible.

    Backslashes and control, line-breaking and bidirectional-override characters are
    written as backslash escapes (``\\n``, ``\\x1b``), and a name starting with ``=``,
    ``+``, ``-``, ``@`` or ``'`` gets a leading ``'``, so a spreadsheet shows it as text
    instead of running it. :func:`header_name` undoes it (nnh reads its own header so).

    Example:
        >>> header_cell("val_loss"), header_cell("=cmd|' /C calc'!A0"), header_cell("a\\nb")
        ('val_loss', "'=cmd|' /C calc'!A0", 'a\\\\nb')
        >>> header_name(header_cell("=1+1")) == "=1+1"
        True
    """
    text = _UNSAFE.sub(
        lambda m: (
            _ESCAPES.get(m.group())
            or (
                f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100 else f"\\u{ord(m.group()):04x}"
            )
        ),
        str(name),
    )
    return "'" + text if text.startswith(_FORMULA_START) else text


def header_name(cell: str) -> str:
    """The column name a header cell written by :func:`header_cell` stands for.

    Example:
        >>> header_name("'=cmd"), header_name("a\\\\nb"), header_name("plain")
        ('=cmd', 'a\\nb', 'plain')
    """
    if len(cell) > 1 and cell[0] == "'" and cell[1] in _FORMULA_START:
        cell = cell[1:]

    def unescape(m: re.Match[str]) -> str:
        code = m.group(1)
        return {"\\": "\\", "n": "\n", "r": "\r", "t": "\t"}.get(code) or chr(int(code[1:], 16))

    return _UNESCAPE.sub(unescape, cell)


def read_header(path: str | os.PathLike[str], separator: str = ",") -> list[str]:
    """The column names of a CSV file written by :class:`CSVLogger` (decoded with
    :func:`header_name`); ``[]`` for an empty file.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "log.csv"
        >>> _ = p.write_text("epoch,'=cmd" + chr(10) + "1,2" + chr(10))
        >>> read_header(p)
        ['epoch', '=cmd']
    """
    with open(path, newline="", encoding="utf-8") as f:
        first = next(csv.reader(f, delimiter=separator), [])
    return [header_name(c) for c in first]


def _cell(value: Any) -> str:
    """A logged value as CSV text: full float precision (``repr``), empty for ``None``;
    anything but a number is escaped like a header cell (one line, never a formula)."""
    if value is None:
        return ""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    if isinstance(value, int):
        return str(value)
    return header_cell(str(value))


class CSVLogger(Callback):
    """Write one row per epoch to a CSV file: ``epoch`` and every key of the epoch ``logs``.

    The columns are fixed by the first row (``epoch`` first, then the logged keys in the
    order they are logged). A later epoch that logs a new key (``val_loss`` on the first
    validated epoch with ``validate_every=2``) adds a column at the end: the file is
    rewritten with the wider header (to a temporary file, then ``os.replace``, so it is
    never half-written), earlier rows get empty cells. A key missing from an epoch gives
    an empty cell. Floats are written with full precision (``repr``), so
    ``float(cell) == handler.train_losses[i]`` exactly. Every row is flushed to disk when
    the epoch ends.

    The file is started afresh (truncated) by the first ``train()`` call of this callback
    unless ``append=True``; later ``train()`` calls, and a run resumed from a checkpoint
    (the callback's state records that it started the file), continue it. When continuing,
    rows of epochs after the epoch training resumes from (written after the checkpoint
    was saved) are dropped, so a resumed run has no duplicate epochs.

    The file is safe to open anywhere: header cells are quoted and written with
    :func:`header_cell` (a metric name holding the separator, quotes or a newline stays one
    cell on one line; one starting with ``=``, ``+``, ``-``, ``@`` gets a leading ``'`` so a
    spreadsheet does not run it; :func:`read_header` gives the names back), and text values
    likewise. A logger restored from a checkpoint (:meth:`load_state_dict`) only truncates,
    rewrites or appends to a file that is its own: a regular file (not a link) that is empty
    or whose header starts with ``epoch`` and the columns it recorded. Otherwise it warns
    and writes nothing, so a crafted checkpoint cannot make it clobber another file.

    Rank 0 only (``all_ranks = False``). Register it *after* callbacks that add keys to the
    logs (:class:`~nnh.callbacks.LearningRateMonitor`, :class:`~nnh.callbacks.EpochTimer`).

    Args:
        filename: path of the CSV file (parent folders are created).
        separator: the field delimiter (one character, not a quote or a line break).
        append: continue an existing file (its header gives the columns) instead of
            starting a new one.

    Example:
        >>> logger = CSVLogger("runs/log.csv")
        >>> logger.filename, logger.separator, logger.append
        ('runs/log.csv', ',', False)
        >>> # handler.add_callback(logger); handler.train(10)
    """

    all_ranks = False

    def __init__(
        self, filename: str | os.PathLike[str], separator: str = ",", append: bool = False
    ):
        super().__init__()
        if not isinstance(separator, str) or len(separator) != 1 or separator in "\"'\r\n\x00":
            raise ValueError(
                "CSVLogger separator must be a single character other than a quote or a line "
                f"break (e.g. ',' or ';'), got {separator!r}"
            )
        self.filename = os.fspath(filename)
        self.separator = separator
        self.append = bool(append)
        self.columns: list[str] | None = None
        self._started = False
        self._from_checkpoint = False
        self._disabled = False

    # ------------------------------------------------------------------ file helpers
    @property
    def path(self) -> Path:
        """The CSV file as a :class:`~pathlib.Path`.

        Example:
            >>> CSVLogger("log.csv").path.name
            'log.csv'
        """
        return Path(self.filename)

    def _read(self) -> tuple[list[str], list[list[str]]]:
        """The decoded column names and the raw (still escaped) data rows."""
        with open(self.path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f, delimiter=self.separator))
        if not rows:
            return [], []
        return [header_name(c) for c in rows[0]], rows[1:]

    def _own_file_problem(self) -> str | None:
        """Why a restored logger must leave the existing file alone (``None``: it is its own)."""
        try:
            info = os.lstat(self.path)
        except FileNotFoundError:
            return None
        except OSError as err:
            return f"cannot be inspected ({err})"
        if not stat.S_ISREG(info.st_mode):
            return "is a link, a folder or a special file"
        if info.st_size == 0:
            return None
        try:
            header = read_header(self.path, self.separator)
        except (OSError, UnicodeDecodeError, csv.Error) as err:
            return f"is not a CSV file ({type(err).__name__})"
        if not header or header[0] != "epoch":
            return "does not start with an 'epoch' column"
        if self.columns is not None and header[: len(self.columns)] != self.columns:
            return f"has other columns than the logger recorded ({self.columns})"
        return None

    def _rewrite(self, columns: list[str], rows: list[list[str]]) -> None:
        """Atomically replace the file with ``columns`` + ``rows`` (rows padded with empties)."""
        buf = io.StringIO()
        csv.writer(
            buf, delimiter=self.separator, lineterminator="\n", quoting=csv.QUOTE_ALL
        ).writerow([header_cell(c) for c in columns])
        writer = csv.writer(buf, delimiter=self.separator, lineterminator="\n")
        for row in rows:
            writer.writerow(list(row) + [""] * (len(columns) - len(row)))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp, fd = claim_temp_file(self.path)  # mode 0o666 & ~umask, like open()
        try:
            with os.fdopen(fd, "w", newline="", encoding="utf-8") as f:
                f.write(buf.getvalue())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    # ------------------------------------------------------------------ hooks
    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        if self._from_checkpoint:
            problem = self._own_file_problem()
            if problem is not None:
                self._disabled = True
                nnh_warn(
                    f"CSVLogger restored from a checkpoint: the file {self.filename!r} {problem}; "
                    "it is not this logger's own, so nothing is written to it. What to do: add "
                    "a CSVLogger yourself (handler.add_callback(CSVLogger(path))) with a new "
                    "path, or with append=True to continue that file.",
                )
                return
            self._from_checkpoint = False  # its own file from now on
        continuing = self._started or self.append
        self._started = True
        if not continuing:
            self.path.unlink(missing_ok=True)
        if not self.path.exists():
            self.columns = None
            return
        header, rows = self._read()
        if not header:
            self.columns = None
            return
        self.columns = header
        start_epoch = (logs or {}).get("start_epoch")
        if start_epoch is None or "epoch" not in header:
            return
        col = header.index("epoch")
        kept = [r for r in rows if not (len(r) > col and _is_after(r[col], start_epoch))]
        if len(kept) != len(rows):
            self._rewrite(header, kept)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if self._disabled:
            return
        values = dict(logs or {})
        values["epoch"] = epoch
        if self.columns is None:
            self.columns = ["epoch"] + [k for k in values if k != "epoch"]
            self._rewrite(self.columns, [])
        new = [k for k in values if k not in self.columns]
        if new:
            columns = self.columns + new
            _, rows = self._read() if self.path.exists() else ([], [])
            self._rewrite(columns, rows)
            self.columns = columns
        row = [_cell(values.get(k)) for k in self.columns]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            csv.writer(f, delimiter=self.separator, lineterminator="\n").writerow(row)
            f.flush()
            os.fsync(f.fileno())

    def state_dict(self) -> dict[str, Any]:
        """``{"columns": [...] or None, "started": bool}`` (a resume continues the file).

        Example:
            >>> CSVLogger("log.csv").state_dict()
            {'columns': None, 'started': False}
        """
        return {
            "columns": None if self.columns is None else list(self.columns),
            "started": self._started,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the columns and whether this logger already started its file.

        A restored logger continues (or restarts) only its own file; see the class docstring.

        Example:
            >>> c = CSVLogger("log.csv"); c.load_state_dict({"columns": ["epoch", "loss"], "started": True})
            >>> c.columns
            ['epoch', 'loss']
        """
        columns = state.get("columns")
        self.columns = None if columns is None else [str(c) for c in columns]
        self._started = bool(state.get("started", False))
        self._from_checkpoint = True
        self._disabled = False


def _is_after(cell: str, start_epoch: int) -> bool:
    try:
        return int(float(cell)) > int(start_epoch)
    except ValueError:
        return False
