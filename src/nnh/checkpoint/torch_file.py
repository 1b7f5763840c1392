"""Write :func:`torch.save`'s file format, optionally without a CRC-32 per record.

:func:`torch.save` writes a zip archive and computes the zip CRC-32 of every record: for a
100M-parameter state on this project's benchmark machine that is about 85 ms of the
160 ms ``torch.save`` spends before the disk is involved, and it holds a core that a
background save shares with training. :func:`torch.load` does not check those CRCs; an nnh
checkpoint carries its own checksums (:mod:`nnh.checkpoint.integrity`: a 64-bit sum per
tensor and a sha256 digest of everything else), verified on every load. So
:func:`nnh.checkpoint.save_checkpoint` writes with ``crc32=False``. The file is the same
format either way and loads with plain ``torch.load``; only zip tools (``unzip -t``) would
report the CRC fields, which hold 0, as wrong.

Writing without CRCs uses torch's own writer (``torch._C.PyTorchFileWriter`` with
``compute_crc32=False`` and ``torch.serialization._save``) for this call only; the global
``torch.serialization.set_crc32_options`` is never touched, so other threads' saves are
unaffected. Where those internals differ (another torch version), it falls back to
``torch.save`` with CRCs (:data:`CAN_SKIP_CRC32` says which).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import pickle
from typing import Any

import torch

__all__ = ["CAN_SKIP_CRC32", "write_torch_file"]

_SAVE_PARAMETERS = [
    "obj",
    "zip_file",
    "pickle_module",
    "pickle_protocol",
    "_disable_byteorder_record",
]


def _can_skip_crc32() -> bool:
    serialization = torch.serialization
    save = getattr(serialization, "_save", None)
    if save is None or not hasattr(serialization, "_get_storage_alignment"):
        return False
    if not hasattr(torch._C, "PyTorchFileWriter"):
        return False
    try:
        return list(inspect.signature(save).parameters) == _SAVE_PARAMETERS
    except (TypeError, ValueError):
        return False


CAN_SKIP_CRC32: bool = _can_skip_crc32()


def write_torch_file(obj: Any, path: str | os.PathLike[str], *, crc32: bool = True) -> None:
    """Write ``obj`` to ``path`` in :func:`torch.save`'s format; ``crc32=False`` skips the
    per-record zip CRC-32 (see the module docstring for when that is safe).

    Example:
        >>> import tempfile, torch
        >>> path = f"{tempfile.mkdtemp()}/x.pth"
        >>> write_torch_file({"w": torch.arange(3.0)}, path, crc32=False)
        >>> torch.load(path, weights_only=True)["w"].tolist()
        [0.0, 1.0, 2.0]
    """
    name = os.fspath(path)
    if crc32 or not CAN_SKIP_CRC32:
        torch.save(obj, name)
        return
    serialization = torch.serialization
    alignment = serialization._get_storage_alignment()
    stream = None
    try:
        if name.isascii():  # torch's C++ writer opens ASCII names itself
            writer = torch._C.PyTorchFileWriter(name, False, alignment)
        else:
            stream = open(name, "wb")  # noqa: SIM115 - closed below
            writer = torch._C.PyTorchFileWriter(stream, False, alignment)
    except TypeError:  # a writer without the compute_crc32 argument
        if stream is not None:
            stream.close()
        torch.save(obj, name)
        return
    try:
        try:
            serialization._save(obj, writer, pickle, serialization.DEFAULT_PROTOCOL, False)
        except BaseException:
            # finish the writer now: its destructor would otherwise try again and, failing
            # inside a destructor (a full disk), abort the interpreter
            with contextlib.suppress(Exception):
                writer.write_end_of_file()
            raise
        writer.write_end_of_file()
    finally:
        if stream is not None:
            stream.close()
