"""Commit a checkpoint folder written under a temporary name (the sharded-checkpoint building block).

A sharded checkpoint is a folder that several ranks write into. It is written under a hidden
temporary name next to its target and committed last by one process, so a reader sees the old
folder or the complete new one, never a partial one.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from nnh.checkpoint.atomic import _fsync_folder, _temp_name


def temp_folder_for(final: os.PathLike | str) -> Path:
    """Create and return a new, uniquely named hidden folder next to ``final``.

    Example:
        >>> import tempfile
        >>> tmp = temp_folder_for(Path(tempfile.mkdtemp()) / "ckpt")
        >>> tmp.is_dir(), tmp.name.startswith(".ckpt.tmp-")
        (True, True)
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(16):
        tmp = final.parent / _temp_name(final)
        try:
            tmp.mkdir()
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a unique temporary folder next to {str(final)!r}")


def commit_folder(tmp: os.PathLike | str, final: os.PathLike | str) -> Path:
    """Make the fully written folder ``tmp`` appear at ``final``; the previous one is removed after.

    The files in ``tmp`` are fsynced before the rename. If ``final`` exists it is first renamed
    to a hidden retired name (still on disk until the new folder is in place).

    Example:
        >>> import tempfile
        >>> final = Path(tempfile.mkdtemp()) / "ckpt"
        >>> tmp = temp_folder_for(final); _ = (tmp / "a").write_text("1")
        >>> commit_folder(tmp, final).joinpath("a").read_text()
        '1'
    """
    tmp, final = Path(tmp), Path(final)
    if not tmp.is_dir():
        raise NotADirectoryError(f"commit_folder: tmp={str(tmp)!r} is not a folder")
    for entry in tmp.rglob("*"):
        if entry.is_file():
            fd = os.open(entry, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_folder(tmp)
    retired = None
    if final.exists():
        retired = final.parent / _temp_name(final)
        os.replace(final, retired)
    os.replace(tmp, final)
    _fsync_folder(final.parent)
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)
    return final
