"""The sharded checkpoint folder: its nnh metadata file, and its verification at load.

Under FSDP, ``NNHandler.save(path)`` writes a FOLDER at ``path``: every rank writes its own
shards with ``torch.distributed.checkpoint`` (``__0_0.distcp``, ``__1_0.distcp``, ... and
DCP's ``.metadata``), and rank 0 writes :data:`METADATA_NAME`, an ordinary nnh checkpoint
file (header, checksums, signed with the user's key as every file nnh saves) holding the
non-tensor state and, under ``"sharded"``, the SHA-256 of every other file of the folder.
The folder is written under a temporary name and committed last
(:mod:`nnh.checkpoint.folder_commit`).

:func:`read_metadata` is the only way nnh reads such a folder: the metadata file is loaded
with ``weights_only=True`` and verified like any checkpoint file, then every shard file is
checked against its recorded SHA-256 (:func:`nnh.checkpoint.sharded_files.verify_folder`),
so a missing or damaged shard is named before any of it is read. The metadata is data: the
names in it select from nnh's registry under the same trust rules as a single file's.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nnh.checkpoint.errors import CheckpointError
from nnh.checkpoint.sharded_files import folder_checksums, verify_folder

__all__ = [
    "METADATA_NAME",
    "SHARDED_KEY",
    "is_sharded_checkpoint",
    "looks_sharded",
    "read_metadata",
    "sharded_record",
    "write_metadata",
]

METADATA_NAME = "nnh_checkpoint.pth"
SHARDED_KEY = "sharded"
LAYOUT = 1
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_MAX_FILES = 100_000


def is_sharded_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a folder holding an nnh sharded checkpoint's metadata file.

    Example:
        >>> import tempfile
        >>> is_sharded_checkpoint(tempfile.mkdtemp())
        False
    """
    folder = Path(path)
    return folder.is_dir() and (folder / METADATA_NAME).is_file()


def looks_sharded(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a folder of a sharded checkpoint, complete or not (it holds the
    nnh metadata file, DCP's ``.metadata`` or ``.distcp`` shards): loading it goes through
    :func:`read_metadata`, whose errors say what is missing.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp()); _ = (d / "__0_0.distcp").write_bytes(b"x")
        >>> looks_sharded(d), is_sharded_checkpoint(d)
        (True, False)
    """
    folder = Path(path)
    if not folder.is_dir():
        return False
    if (folder / METADATA_NAME).is_file() or (folder / ".metadata").is_file():
        return True
    try:
        return any(p.suffix == ".distcp" for p in folder.iterdir())
    except OSError:
        return False


def write_metadata(
    payload: Mapping[str, Any],
    folder: str | os.PathLike[str],
    *,
    record: Mapping[str, Any],
    known: Mapping[str, str] | None = None,
) -> Path:
    """Write ``payload`` plus the shard checksums as the folder's signed nnh metadata file.

    ``record`` holds the sharded-specific entries (world size, which tensor groups the
    shards hold, per-rank RNG states); ``"files"`` (every file's SHA-256) is added here, so
    call this last, once every shard is on disk. ``known``: SHA-256 sums already computed
    (by the ranks that wrote those files, in parallel); every other file is hashed here.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp()); _ = (d / "__0_0.distcp").write_bytes(b"x")
        >>> _ = write_metadata({"epoch": 1}, d, record={"world_size": 1})
        >>> sorted(read_metadata(d)[SHARDED_KEY]["files"])
        ['__0_0.distcp']
    """
    from nnh.checkpoint import save_checkpoint

    folder = Path(folder)
    known = dict(known or {})
    files = folder_checksums(folder, skip=set(known))
    files.update({name: digest for name, digest in known.items() if (folder / name).is_file()})
    full = {**dict(record), "layout": LAYOUT, "files": dict(sorted(files.items()))}
    return save_checkpoint({**dict(payload), SHARDED_KEY: full}, folder / METADATA_NAME)


def sharded_record(payload: Mapping[str, Any], path: str | os.PathLike[str]) -> dict[str, Any]:
    """The checked ``"sharded"`` record of a metadata payload (kind ``"damaged"`` if malformed).

    Example:
        >>> sharded_record({"sharded": {"layout": 1, "world_size": 2, "files": {}}}, "c")["world_size"]
        2
    """
    record = payload.get(SHARDED_KEY)
    files = record.get("files") if isinstance(record, Mapping) else None
    world = record.get("world_size") if isinstance(record, Mapping) else None
    ok = (
        isinstance(files, Mapping)
        and len(files) <= _MAX_FILES
        and all(
            _safe_relative(k) and isinstance(v, str) and _HEX64.match(v) for k, v in files.items()
        )
        and isinstance(world, int)
        and not isinstance(world, bool)
        and 1 <= world <= 1_000_000
        and record.get("layout") == LAYOUT
    )
    if not ok:
        raise CheckpointError(
            f"sharded checkpoint {os.fspath(path)!r}: its metadata record {SHARDED_KEY!r} is not "
            "a list of shard files with their SHA-256 and a world size. The folder was damaged "
            "or crafted; nnh used none of it. What to do: use an intact checkpoint.",
            path=path,
            kind="damaged",
        )
    return dict(record)


def _safe_relative(name: Any) -> bool:
    """A file name inside the folder: relative, no ``..``, no empty or hidden-parent tricks."""
    if not isinstance(name, str) or not name or len(name) > 255 or "\x00" in name:
        return False
    parts = name.split("/")
    return (
        not name.startswith("/")
        and "\\" not in name
        and all(p not in ("", ".", "..") for p in parts)
    )


def read_metadata(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Load and verify a sharded checkpoint folder's metadata, then every shard's SHA-256.

    Raises :class:`CheckpointError` naming the folder when it has no metadata file, the
    metadata file when it is damaged (as for any checkpoint file), and the shard file when
    one is missing or corrupt.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp()); _ = (d / "__0_0.distcp").write_bytes(b"x")
        >>> _ = write_metadata({"epoch": 1}, d, record={"world_size": 1})
        >>> _ = (d / "__0_0.distcp").write_bytes(b"y")
        >>> read_metadata(d)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        nnh.checkpoint.errors.CheckpointError: shard file '__0_0.distcp' in ... is corrupt ...
    """
    from nnh.checkpoint.safe_load import load_checkpoint

    folder = Path(folder)
    meta = folder / METADATA_NAME
    if not meta.is_file():
        raise CheckpointError(
            f"checkpoint folder {str(folder)!r} holds no nnh metadata file {METADATA_NAME!r}, so "
            "it is not a complete nnh sharded checkpoint (a save commits the folder only after "
            "that file is written). What to do: pass a folder written by NNHandler.save under "
            "FSDP, or the checkpoint file itself.",
            path=folder,
            kind="not_nnh",
        )
    payload = load_checkpoint(meta, map_location="cpu")
    record = sharded_record(payload, folder)
    verify_folder(folder, record["files"])
    return payload
