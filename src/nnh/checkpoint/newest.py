"""Finding the newest loadable checkpoint in a folder, for crash-and-resume.

Step checkpoints carry a short hash in their names (``run.step-1a2b3c4d.pth``) and epoch
checkpoints a formatted pattern, so a user would otherwise glob and guess. :func:`latest`
looks at the ``.pth`` files of one folder, newest first by modification time, and returns
the first one that verifies: the nnh header and every checksum, loaded with
``weights_only=True`` (nothing in the file runs, no model is built). Temporary files of an
interrupted write, empty, truncated or corrupt files are skipped.
"""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path

from nnh.checkpoint.atomic import list_temp_files
from nnh.checkpoint.errors import CheckpointError
from nnh.checkpoint.safe_load import load_checkpoint
from nnh.checkpoint.sharded import METADATA_NAME, is_sharded_checkpoint, read_metadata

__all__ = ["latest"]

_GLOB = set("*?[")


def _matches(file_name: str, name: str | None) -> bool:
    if name is None:
        return True
    if _GLOB & set(name):
        return fnmatch.fnmatchcase(file_name, name)
    return file_name.startswith(name)


def latest(folder: str | os.PathLike[str], name: str | None = None) -> str | None:
    """The path of the newest loadable checkpoint in ``folder``, or ``None`` when there is none.

    ``name`` keeps only files whose name starts with it (``"mlp"`` matches ``mlp_004.pth``
    and ``mlp_{epoch}.step-1a2b3c4d.pth``), or matches it as a glob when it holds ``*?[``.
    Sub-folders are not searched, but a sharded checkpoint folder (written under FSDP) is a
    candidate like a file. Every candidate is verified (header, checksums; for a folder every
    shard's SHA-256) before it is returned, so a file cut short by ``kill -9`` or a full
    disk, or the temporary folder of an interrupted sharded save, is never the answer.

    Example:
        >>> import tempfile, time
        >>> from nnh.checkpoint import save_checkpoint
        >>> from nnh.checkpoint import latest
        >>> d = tempfile.mkdtemp()
        >>> latest(d) is None
        True
        >>> _ = save_checkpoint({"epoch": 1}, f"{d}/run_1.pth")
        >>> _ = save_checkpoint({"epoch": 2}, f"{d}/run_2.pth")
        >>> latest(d).endswith("run_2.pth")
        True
    """
    root = Path(folder)
    if not isinstance(folder, (str, os.PathLike)):
        raise TypeError(f"latest(folder=...): a folder path, got {type(folder).__name__}")
    if name is not None and not isinstance(name, str):
        raise TypeError(f"latest(name=...): a str or None, got {type(name).__name__}")
    if not root.is_dir():
        return None
    temporary = set(list_temp_files(root))
    candidates = []
    for entry in root.iterdir():
        if entry.suffix != ".pth" or entry in temporary or not _matches(entry.name, name):
            continue
        folder = is_sharded_checkpoint(entry)  # an FSDP checkpoint folder: its metadata's time
        try:
            info = (entry / METADATA_NAME).stat() if folder else entry.stat()
        except OSError:
            continue
        if folder or (entry.is_file() and info.st_size > 0):
            candidates.append((info.st_mtime_ns, entry.name, entry))
    for _, _, entry in sorted(candidates, reverse=True):
        try:
            if entry.is_dir():
                read_metadata(entry)  # the metadata file and every shard's SHA-256
            else:
                load_checkpoint(entry, map_location="cpu", mmap=True)
        except (CheckpointError, OSError, RuntimeError, ValueError):
            continue
        return str(entry)
    return None
