"""The nnh checkpoint format marker.

An nnh checkpoint is a ``dict`` saved with :func:`torch.save` whose top level holds::

    "nnh_format": {"name": "nnh-checkpoint", "version": 2}
    "versions":   {"nnh": "0.1.0", "torch": "2.13.0", "python": "3.11.9"}

next to the payload sections (``"model_state_dict"`` and so on). The marker tells an nnh
checkpoint from any other torch file, and the version lets an older nnh refuse a file
written in a newer layout instead of misreading it.
"""

from __future__ import annotations

import functools
import os
import platform
from collections.abc import Mapping
from typing import Any

import torch

from nnh.checkpoint.errors import CheckpointError

__all__ = [
    "FIRST_SEALED_VERSION",
    "FORMAT_KEY",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "VERSIONS_KEY",
    "check_header",
    "format_version",
    "has_header",
    "make_header",
]

FORMAT_NAME = "nnh-checkpoint"
FORMAT_VERSION = 2
# Version 2 added the "integrity" checksums (nnh.checkpoint.integrity), which every version-2
# file must carry; version-1 files still load, without that verification.
FIRST_SEALED_VERSION = 2
FORMAT_KEY = "nnh_format"
VERSIONS_KEY = "versions"


@functools.lru_cache(maxsize=1)
def _nnh_version() -> str:
    # importlib.metadata, not ``nnh.__version__``: this module may be imported while the
    # ``nnh`` package itself is still initialising.
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover - Python < 3.8
        return "unknown"
    try:
        return version("nnh")
    except PackageNotFoundError:
        return "unknown"


def make_header() -> dict[str, Any]:
    """Return the format marker and library versions to put at a checkpoint's top level.

    Example:
        >>> header = make_header()
        >>> header["nnh_format"] == {"name": FORMAT_NAME, "version": FORMAT_VERSION}
        True
        >>> sorted(header["versions"])
        ['nnh', 'python', 'torch']
    """
    return {
        FORMAT_KEY: {"name": FORMAT_NAME, "version": FORMAT_VERSION},
        VERSIONS_KEY: {
            "nnh": _nnh_version(),
            "torch": str(torch.__version__),
            "python": platform.python_version(),
        },
    }


def has_header(payload: object) -> bool:
    """Tell whether ``payload`` carries an nnh format marker (valid or not).

    Example:
        >>> has_header(make_header()), has_header({"weight": 1})
        (True, False)
    """
    return isinstance(payload, Mapping) and FORMAT_KEY in payload


def _describe(payload: object) -> str:
    if isinstance(payload, Mapping):
        keys = sorted(str(k) for k in payload)
        shown = ", ".join(repr(k) for k in keys[:6]) + (", ..." if len(keys) > 6 else "")
        return f"a dict with keys [{shown}]"
    return f"a {type(payload).__name__}"


def _not_nnh(payload: object, where: str, path: str | os.PathLike[str] | None) -> CheckpointError:
    hint = ""
    if (
        isinstance(payload, Mapping)
        and payload
        and all(isinstance(v, torch.Tensor) for v in payload.values())
    ):
        hint = (
            " It looks like a bare model state_dict: load it with "
            "NNHandler.initialize_from_checkpoint (or nnh.checkpoint.load_weights_file)."
        )
    return CheckpointError(
        f"{where} is a valid PyTorch file but not an nnh checkpoint: it holds "
        f"{_describe(payload)} and no {FORMAT_KEY!r} marker.{hint} "
        "What to do: pass a file written by NNHandler.save.",
        path=path,
        kind="not_nnh",
    )


def format_version(payload: Mapping[str, Any]) -> int:
    """The format version of a payload that passed :func:`check_header`.

    Example:
        >>> format_version(make_header()) == FORMAT_VERSION
        True
    """
    return int(payload[FORMAT_KEY]["version"])


def check_header(payload: object, path: str | os.PathLike[str] | None = None) -> None:
    """Raise :class:`CheckpointError` unless ``payload`` is an nnh checkpoint this nnh can read.

    Checks that the marker exists, names the nnh format, and that its version is an integer
    no newer than :data:`FORMAT_VERSION`.

    Example:
        >>> check_header(make_header(), "ok.pt")  # passes silently
        >>> try:
        ...     check_header({"weight": 1}, "other.pt")
        ... except CheckpointError as err:
        ...     print(err.kind)
        not_nnh
    """
    where = "checkpoint" if path is None else f"checkpoint {os.fspath(path)!r}"
    if not has_header(payload):
        raise _not_nnh(payload, where, path)
    marker = payload[FORMAT_KEY]  # type: ignore[index]
    name = marker.get("name") if isinstance(marker, Mapping) else None
    version = marker.get("version") if isinstance(marker, Mapping) else None
    if name != FORMAT_NAME or isinstance(version, bool) or not isinstance(version, int):
        raise CheckpointError(
            f"{where} has a malformed format marker {marker!r}; expected "
            f"{{'name': {FORMAT_NAME!r}, 'version': <int>}}. The file was not written by nnh "
            "or was edited. What to do: re-save it with NNHandler.save.",
            path=path,
            kind="bad_header",
        )
    if version < 1:
        raise CheckpointError(
            f"{where} declares format version {version}, which never existed (versions start "
            "at 1). What to do: re-save it with NNHandler.save.",
            path=path,
            kind="bad_header",
        )
    if version > FORMAT_VERSION:
        written_by = ""
        versions = payload.get(VERSIONS_KEY)  # type: ignore[union-attr]
        if isinstance(versions, Mapping) and "nnh" in versions:
            written_by = f" by nnh {versions['nnh']}"
        raise CheckpointError(
            f"{where} was written{written_by} in checkpoint format version {version}, which is "
            f"newer than this nnh {_nnh_version()} understands (up to version {FORMAT_VERSION}). "
            "What to do: upgrade nnh (pip install -U nnh) to load it.",
            path=path,
            kind="newer_version",
        )
