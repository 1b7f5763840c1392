"""The checkpoint file layer: atomic writes, safe loads, key mapping, import paths, source.

Everything here is a plain function over files and dicts; ``NNHandler.save/load`` build on
it. Guarantees:

* files are written atomically and durably (:func:`atomic_save`): a reader sees the old or
  the new complete file, never a partial one;
* files are sealed with checksums at save and verified at load (:mod:`.integrity`): a
  flipped bit is caught before anything is used;
* files are read with ``torch.load(weights_only=True)`` (:func:`load_checkpoint`): nothing
  stored in a file is executed, and every failure is a :class:`CheckpointError` naming the
  file, the problem and what to do;
* classes are recorded by import path (:func:`import_path`), and stored model source runs
  only on explicit ``trust_code=True`` (:func:`rebuild_class_from_source`);
* a file only *selects* from a closed registry with schema-checked arguments
  (:mod:`.registry`); user code is restored only when the user vouches for it — the file
  is their own (signed with their key, :mod:`.signing`), or passed in ``trusted=`` /
  ``trust_modules=`` (:mod:`.policy`) — and vouched names are still type-checked
  against their slot (:mod:`.trust`).

Example:
    >>> import tempfile, torch
    >>> from nnh.checkpoint import save_checkpoint, load_checkpoint
    >>> path = save_checkpoint({"model_state_dict": {"w": torch.ones(2)}},
    ...                        f"{tempfile.mkdtemp()}/run.pth")
    >>> load_checkpoint(path)["model_state_dict"]["w"].tolist()
    [1.0, 1.0]
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from nnh.checkpoint.atomic import (
    atomic_save,
    atomic_write_bytes,
    atomic_write_text,
    cleanup_stale_temps,
    list_temp_files,
    replace_previous,
)
from nnh.checkpoint.errors import CheckpointError, ImportPathError
from nnh.checkpoint.format import (
    FORMAT_KEY,
    FORMAT_NAME,
    FORMAT_VERSION,
    VERSIONS_KEY,
    check_header,
    has_header,
    make_header,
)
from nnh.checkpoint.imports import (
    import_path,
    import_record,
    is_importable,
    resolve_import_path,
)
from nnh.checkpoint.integrity import INTEGRITY_KEY, seal, tensor_checksum, verify
from nnh.checkpoint.keys import (
    KeyMismatchWarning,
    KeyReport,
    canonical_key,
    compare_state_dict,
    load_model_state,
    match_state_dict,
    strip_wrapper_prefixes,
)
from nnh.checkpoint.newest import latest
from nnh.checkpoint.safe_load import load_checkpoint, load_weights_file, to_flat_state_dict
from nnh.checkpoint.signing import is_own, sign_record
from nnh.checkpoint.source import capture_model_source, rebuild_class_from_source, resolve_class

__all__ = [
    "FORMAT_KEY",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "INTEGRITY_KEY",
    "VERSIONS_KEY",
    "CheckpointError",
    "ImportPathError",
    "KeyMismatchWarning",
    "KeyReport",
    "atomic_save",
    "atomic_write_bytes",
    "atomic_write_text",
    "canonical_key",
    "capture_model_source",
    "check_header",
    "cleanup_stale_temps",
    "compare_state_dict",
    "has_header",
    "import_path",
    "import_record",
    "is_importable",
    "is_own",
    "latest",
    "list_temp_files",
    "load_checkpoint",
    "load_model_state",
    "load_weights_file",
    "make_header",
    "match_state_dict",
    "rebuild_class_from_source",
    "replace_previous",
    "resolve_class",
    "resolve_import_path",
    "save_checkpoint",
    "seal",
    "sharded_to_file",
    "strip_wrapper_prefixes",
    "tensor_checksum",
    "to_flat_state_dict",
    "verify",
]


def save_checkpoint(
    payload: Mapping[str, Any],
    path: str | os.PathLike[str],
    *,
    durable: bool = True,
    sign: bool = True,
    before_replace: Callable[[Path], None] | None = None,
) -> Path:
    """Add the nnh format header to ``payload`` and write it atomically to ``path``.

    ``payload`` must hold only what ``torch.load(weights_only=True)`` accepts (tensors,
    numbers, strings, lists, tuples, dicts, TensorDicts); keys of the header (``nnh_format``,
    ``versions``) and ``integrity`` are reserved and set here: the file is sealed with the
    checksums that :func:`load_checkpoint` verifies. Because those checksums cover the
    whole file, the zip CRC-32 that :func:`torch.save` adds to every record is not computed
    (:mod:`nnh.checkpoint.torch_file`); the file still loads with plain ``torch.load``.
    With ``sign=True`` (the default) the seal carries a MAC under this user's key
    (:mod:`nnh.checkpoint.signing`), so that loading recognises the file as the user's own.
    ``before_replace`` runs under the target's lock just before the rename (see
    :func:`atomic_save`): automatic saves check ownership there.

    Example:
        >>> import tempfile, torch
        >>> p = save_checkpoint({"epoch": 2}, f"{tempfile.mkdtemp()}/c.pth")
        >>> load_checkpoint(p)["epoch"]
        2
    """
    reserved = {FORMAT_KEY, VERSIONS_KEY, INTEGRITY_KEY} & set(payload)
    if reserved:
        raise ValueError(f"payload keys {sorted(reserved)} are reserved for the nnh header")
    sealed = seal({**make_header(), **payload})
    if sign:
        sign_record(sealed[INTEGRITY_KEY])
    return atomic_save(sealed, path, durable=durable, crc32=False, before_replace=before_replace)


def sharded_to_file(folder: str | os.PathLike[str], path: str | os.PathLike[str]) -> Path:
    """Convert a sharded checkpoint folder (written under FSDP) into one nnh checkpoint file,
    offline, in one process: see :func:`nnh.checkpoint.sharded_export.sharded_to_file`.

    Example::

        nnh.checkpoint.sharded_to_file("run/e2.pth", "e2-full.pth")
    """
    from nnh.checkpoint.sharded_export import sharded_to_file as convert

    return convert(folder, path)
