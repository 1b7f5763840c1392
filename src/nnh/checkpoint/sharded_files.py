"""Checksums of the files of a sharded checkpoint folder: computed at save, verified at load."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from nnh.checkpoint.errors import CheckpointError

# the nnh metadata file of a sharded checkpoint (nnh.checkpoint.sharded) holds these sums
MANIFEST_EXCLUDE = frozenset({"nnh_manifest.json", "nnh_checkpoint.pth"})


def sha256_file(path: Path) -> str:
    """The hex SHA-256 of the file at ``path``."""
    return _sha256(path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_checksums(
    folder: os.PathLike | str, skip: set[str] | frozenset[str] = frozenset()
) -> dict[str, str]:
    """SHA-256 of every file in ``folder`` (relative path -> hex digest), the manifest and the
    relative paths in ``skip`` excluded.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp()); _ = (d / "__0_0.distcp").write_bytes(b"x")
        >>> list(folder_checksums(d))
        ['__0_0.distcp']
    """
    folder = Path(folder)
    return {
        p.relative_to(folder).as_posix(): _sha256(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
        and p.name not in MANIFEST_EXCLUDE
        and p.relative_to(folder).as_posix() not in skip
    }


def verify_folder(folder: os.PathLike | str, expected: dict[str, str]) -> None:
    """Raise :class:`CheckpointError` naming the first shard file missing or not matching.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp()); _ = (d / "s").write_bytes(b"x")
        >>> sums = folder_checksums(d); _ = (d / "s").write_bytes(b"y")
        >>> verify_folder(d, sums)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        nnh.checkpoint.errors.CheckpointError: shard file 's' in ... is corrupt ...
    """
    folder = Path(folder)
    for name, digest in expected.items():
        shard = folder / name
        if not shard.is_file():
            raise CheckpointError(
                f"shard file {name!r} of the checkpoint folder {str(folder)!r} is missing",
                path=shard,
                kind="missing",
            )
        if _sha256(shard) != digest:
            raise CheckpointError(
                f"shard file {name!r} in {str(folder)!r} is corrupt (its SHA-256 does not match "
                "the one recorded at save). What to do: load an earlier checkpoint.",
                path=shard,
                kind="corrupt",
            )
