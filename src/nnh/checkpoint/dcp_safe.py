"""Reading torch.distributed.checkpoint folders without running code stored in them.

DCP reads its ``.metadata`` index with ``pickle.load`` and the non-tensor values of a state
dict (an optimizer's hyper-parameters) with ``torch.load(weights_only=False)``: a crafted
folder would run code when loaded. nnh reads both safely instead: :class:`SafeReader`
unpickles ``.metadata`` with an unpickler that can build only DCP's own metadata records,
``torch.Size``, dtypes and layouts (anything else is a :class:`CheckpointError`, kind
``"unsafe"``, and nothing runs), and :class:`SafeLoadPlanner` reads the non-tensor values with
``weights_only=True``. Tensors are read by DCP itself with ``weights_only=True``.

Example:
    >>> import io, pickle
    >>> bad = pickle.dumps(print)                      # a pickle naming a callable
    >>> try:
    ...     safe_unpickle(io.BytesIO(bad), "x/.metadata")
    ... except CheckpointError as err:
    ...     print(err.kind)
    unsafe
"""

from __future__ import annotations

import io
import os
import pickle
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import (
    DefaultLoadPlanner,
    _EmptyStateDictLoadPlanner,
)

from nnh.checkpoint.errors import CheckpointError

__all__ = ["SafeEmptyPlanner", "SafeLoadPlanner", "SafeReader", "safe_unpickle"]

_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_ALLOWED: dict[str, frozenset[str]] = {
    _METADATA_MODULE: frozenset({
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    }),
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo"}),
    "torch.serialization": frozenset({"_get_layout"}),
    "torch": frozenset({"Size"}),
    "collections": frozenset({"OrderedDict"}),
    "pathlib": frozenset({"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"}),
}  # fmt: skip


class _Restricted(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)  # a dtype is a value, not a callable
        raise pickle.UnpicklingError(f"{module}.{name}")


def safe_unpickle(stream: Any, where: str | os.PathLike[str]) -> Any:
    """Unpickle DCP metadata from ``stream``, building only DCP's own records.

    Raises :class:`CheckpointError` (kind ``"unsafe"``) naming what the pickle referred to.
    """
    try:
        return _Restricted(stream).load()
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"the DCP metadata {os.fspath(where)!r} refers to {str(err)[:100]!r}, which is not "
            "part of a torch.distributed.checkpoint index. nnh refused to load it and did NOT "
            "execute anything from it. What to do: use a checkpoint folder written by "
            "NNHandler.save.",
            path=where,
            kind="unsafe",
        ) from None
    except Exception as err:  # truncated or random bytes
        raise CheckpointError(
            f"the DCP metadata {os.fspath(where)!r} is damaged ({type(err).__name__}). What to "
            "do: use an intact copy of the checkpoint folder.",
            path=where,
            kind="corrupt",
        ) from None


class SafeReader(FileSystemReader):
    """``FileSystemReader`` whose ``.metadata`` is read by :func:`safe_unpickle`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        from torch.distributed.checkpoint.metadata import StorageMeta

        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            metadata = safe_unpickle(io.BytesIO(stream.read()), path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _load_plain(value: io.BytesIO) -> Any:
    try:
        return torch.load(value, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"a non-tensor value in a checkpoint shard holds objects other than numbers, "
            f"strings, lists and dicts ({str(err).splitlines()[0][:120]}); nnh did not run it.",
            kind="unsafe",
        ) from None


class _PlainBytes:
    """``load_bytes`` of DCP's ``DefaultLoadPlanner``, with ``weights_only=True``."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        obj = _load_plain(value)
        if self.flatten_state_dict:  # type: ignore[attr-defined]
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)  # type: ignore[attr-defined]
        else:
            self.state_dict[read_item.dest_index.fqn] = obj  # type: ignore[attr-defined]


class SafeLoadPlanner(_PlainBytes, DefaultLoadPlanner):
    """``DefaultLoadPlanner`` reading non-tensor values with ``weights_only=True``."""


class SafeEmptyPlanner(_PlainBytes, _EmptyStateDictLoadPlanner):
    """DCP's planner that loads a whole folder into an empty dict (what ``dcp_to_torch_save``
    uses), reading non-tensor values with ``weights_only=True``."""
