"""The one error type of the checkpoint layer.

Every failure a user can cause while reading or writing a checkpoint (a missing file, a
truncated or planted file, a model that does not fit the stored weights, a class that cannot
be imported) surfaces as :class:`CheckpointError`. Its message names the file or object,
says what is wrong in plain words and what to do about it.
"""

from __future__ import annotations

import os

__all__ = ["CheckpointError", "ImportPathError"]


class CheckpointError(RuntimeError):
    """A checkpoint file or a checkpoint record could not be used.

    Attributes:
        path: the file concerned, or ``None`` when the problem is not tied to a file.
        kind: a short machine-readable tag of the problem, one of ``"missing"``,
            ``"not_a_file"``, ``"unreadable"``, ``"empty"``, ``"corrupt"``, ``"unsafe"``,
            ``"not_nnh"``, ``"bad_header"``, ``"newer_version"``, ``"bad_weights"``,
            ``"mismatch"``, ``"not_importable"``, ``"untrusted_code"``, ``"bad_source"``,
            ``"untrusted"`` (a record names something that is not what its slot expects),
            ``"damaged"`` (a section is missing or malformed), ``"non_finite"`` (refused to
            save a non-finite state), ``"disk_full"``, ``"file_too_large"``,
            ``"not_owned"`` (refused to overwrite a file another run or program wrote),
            ``"batch_size"`` (a step checkpoint resumed with another batch size),
            ``"write_failed"`` (a background write failed), ``"changed_while_saving"``
            (state a background save copies late was changed before its copy),
            ``"too_large"`` (a file's model would need more memory than it stores),
            ``"incompatible_data"`` (a foreign file's embedded data does not fit its model).

    Example:
        >>> err = CheckpointError("checkpoint 'a.pt' does not exist", path="a.pt", kind="missing")
        >>> (isinstance(err, RuntimeError), err.kind, err.path)
        (True, 'missing', 'a.pt')
    """

    def __init__(
        self, message: str, *, path: str | os.PathLike[str] | None = None, kind: str = "error"
    ) -> None:
        super().__init__(message)
        self.path = None if path is None else os.fspath(path)
        self.kind = kind


class ImportPathError(CheckpointError):
    """An object has no import path, or an import path cannot be resolved.

    Example:
        >>> issubclass(ImportPathError, CheckpointError)
        True
    """
