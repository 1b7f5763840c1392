"""CSVLogger: one CSV row per epoch with every logged value."""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path
from typing import Any

import torch

from nnh.callbacks.base import Callback
from nnh.checkpoint.atomic import claim_temp_file

__all__ = ["CSVLogger"]


def _cell(value: Any) -> str:
    """A logged value as CSV text: full float precision (``repr``), empty for ``None``."""
    if value is None:
        return ""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    return str(value)


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

    Rank 0 only (``all_ranks = False``). Register it *after* callbacks that add keys to the
    logs (:class:`~nnh.callbacks.LearningRateMonitor`, :class:`~nnh.callbacks.EpochTimer`).

    Args:
        filename: path of the CSV file (parent folders are created).
        separator: the field delimiter (one character).
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
        if not isinstance(separator, str) or len(separator) != 1:
            raise ValueError(f"CSVLogger separator must be a single character, got {separator!r}")
        self.filename = os.fspath(filename)
        self.separator = separator
        self.append = bool(append)
        self.columns: list[str] | None = None
        self._started = False

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
        with open(self.path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f, delimiter=self.separator))
        if not rows:
            return [], []
        return rows[0], rows[1:]

    def _rewrite(self, columns: list[str], rows: list[list[str]]) -> None:
        """Atomically replace the file with ``columns`` + ``rows`` (rows padded with empties)."""
        buf = io.StringIO()
        writer = csv.writer(buf, delimiter=self.separator, lineterminator="\n")
        writer.writerow(columns)
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

        Example:
            >>> c = CSVLogger("log.csv"); c.load_state_dict({"columns": ["epoch", "loss"], "started": True})
            >>> c.columns
            ['epoch', 'loss']
        """
        columns = state.get("columns")
        self.columns = None if columns is None else [str(c) for c in columns]
        self._started = bool(state.get("started", False))


def _is_after(cell: str, start_epoch: int) -> bool:
    try:
        return int(float(cell)) > int(start_epoch)
    except ValueError:
        return False
