"""Checksums that catch a damaged checkpoint before anything in it is used.

:func:`seal` computes, at save time, a checksum of every tensor in a payload and a digest of
everything else (keys, numbers, strings, the tensors' dtypes and shapes); :func:`verify`
recomputes both after loading and raises :class:`CheckpointError` naming the file and the
damaged entry when they differ.

The tensor checksum is the wrapping 64-bit sum of the tensor's bytes read as little-endian
words (the few trailing bytes weighted by their position). Any single flipped bit, and any
damage confined to one 64-bit word, changes it with certainty; it runs at memory bandwidth
(about 10 ms for 400 MB here), so verification adds only a few percent to a load. It is a
guard against accidents (bit rot, a truncated copy, a bad disk), not against an attacker, who
can simply recompute it: the checks that make a hostile file harmless are the type checks of
:mod:`nnh.checkpoint.trust`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from typing import Any

import torch

from nnh.checkpoint.errors import CheckpointError

__all__ = ["INTEGRITY_KEY", "seal", "tensor_checksum", "verify"]

INTEGRITY_KEY = "integrity"
ALGORITHM = "sum64-v1"


def tensor_checksum(tensor: torch.Tensor) -> int:
    """The wrapping 64-bit sum of ``tensor``'s bytes (trailing bytes weighted by position).

    Example:
        >>> t = torch.arange(4, dtype=torch.float32)
        >>> u = t.clone(); u.view(torch.int32)[2] ^= 1      # flip one bit
        >>> tensor_checksum(t) == tensor_checksum(t.clone()), tensor_checksum(t) == tensor_checksum(u)
        (True, False)
    """
    t = tensor.detach()
    if t.layout is not torch.strided:
        t = t.to_dense()
    if t.device.type != "cpu":
        t = t.cpu()
    flat = t.contiguous().reshape(-1)
    if flat.dtype is not torch.uint8:
        flat = flat.view(torch.uint8)
    n = flat.numel()
    body = n - n % 8
    total = torch.zeros((), dtype=torch.int64)
    if body:
        words = flat[:body]
        try:
            words = words.view(torch.int64)
        except RuntimeError:  # storage offset not 8-byte aligned
            words = words.clone().view(torch.int64)
        total += words.sum()
    if body != n:
        tail = flat[body:].to(torch.int64)
        total += (tail * torch.arange(1, n - body + 1, dtype=torch.int64)).sum()
    return int(total)


_TENSORDICT_BASE: Any = None


def _tensordict_base() -> Any:
    global _TENSORDICT_BASE
    if _TENSORDICT_BASE is None:
        try:
            from tensordict import TensorDictBase
        except ImportError:  # pragma: no cover - tensordict is a dependency
            TensorDictBase = ()  # isinstance(x, ()) is always False
        _TENSORDICT_BASE = TensorDictBase
    return _TENSORDICT_BASE


_PLAIN_LEAVES = frozenset({int, float, str, bool, type(None), bytes, complex})


def _describe(obj: Any, where: str, lines: list[str], sums: dict[str, int]) -> None:
    """Append one ``f"{where}={leaf}"`` line per tensor, container and other leaf of ``obj``
    (containers described by type and length, tensors by dtype and shape) in a fixed order,
    and put each tensor's checksum in ``sums`` under its location.
    """
    kind = type(obj)
    if kind in _PLAIN_LEAVES:  # most of a payload: numbers of RNG states, settings, history
        lines.append(f"{where}={kind.__name__}:{obj!r}")
    elif isinstance(obj, torch.Tensor):
        sums[where] = tensor_checksum(obj)
        lines.append(f"{where}=tensor:{obj.dtype}:{tuple(obj.shape)}")
    elif isinstance(obj, _tensordict_base()):
        _describe(dict(obj.flatten_keys(".").items()), where, lines, sums)
    elif isinstance(obj, Mapping):
        lines.append(f"{where}=dict[{len(obj)}]")
        for key, value in obj.items():
            _describe(value, f"{where}/{key!r}", lines, sums)
    elif isinstance(obj, (list, tuple)):
        lines.append(f"{where}={kind.__name__}[{len(obj)}]")
        if all(type(v) in _PLAIN_LEAVES for v in obj):
            lines.extend(f"{where}[{i}]={type(v).__name__}:{v!r}" for i, v in enumerate(obj))
        else:
            for i, value in enumerate(obj):
                _describe(value, f"{where}[{i}]", lines, sums)
    else:
        lines.append(f"{where}={kind.__name__}:{obj!r}")


def _measure(payload: Mapping[str, Any]) -> tuple[dict[str, int], str]:
    sums: dict[str, int] = {}
    lines: list[str] = []
    for key, value in payload.items():
        if key != INTEGRITY_KEY:
            _describe(value, repr(key), lines, sums)
    lines.append("")  # every line ends with a newline, as hashed line by line before
    digest = hashlib.sha256("\n".join(lines).encode("utf-8", "backslashreplace"))
    return sums, digest.hexdigest()


def seal(payload: Mapping[str, Any]) -> dict[str, Any]:
    """Return ``payload`` with an ``"integrity"`` entry holding its checksums.

    Example:
        >>> sealed = seal({"w": torch.ones(3), "epoch": 2})
        >>> sorted(sealed["integrity"])
        ['algorithm', 'digest', 'tensors']
    """
    sums, digest = _measure(payload)
    return {**payload, INTEGRITY_KEY: {"algorithm": ALGORITHM, "tensors": sums, "digest": digest}}


def verify(payload: Mapping[str, Any], path: str | os.PathLike[str] | None = None) -> None:
    """Raise :class:`CheckpointError` (kind ``"corrupt"``) unless ``payload`` matches its seal.

    Example:
        >>> sealed = seal({"w": torch.ones(3)})
        >>> verify(sealed)                      # intact: passes silently
        >>> sealed["w"][0] = 2.0
        >>> try:
        ...     verify(sealed, "run.pth")
        ... except CheckpointError as err:
        ...     print(err.kind)
        corrupt
    """
    where = "checkpoint" if path is None else f"checkpoint {os.fspath(path)!r}"
    record = payload.get(INTEGRITY_KEY)
    if (
        not isinstance(record, Mapping)
        or record.get("algorithm") != ALGORITHM
        or not isinstance(record.get("tensors"), Mapping)
        or not isinstance(record.get("digest"), str)
    ):
        raise CheckpointError(
            f"{where} has a damaged or unknown integrity record ({INTEGRITY_KEY!r}), so its "
            "contents cannot be verified. What to do: use an intact copy, or re-save it with "
            "NNHandler.save.",
            path=path,
            kind="corrupt",
        )
    sums, digest = _measure(payload)
    expected = record["tensors"]
    damaged = [k for k in sums if expected.get(k) != sums[k]]
    damaged += [k for k in expected if k not in sums]
    if damaged:
        shown = ", ".join(damaged[:5]) + (
            f" and {len(damaged) - 5} more" if len(damaged) > 5 else ""
        )
        raise CheckpointError(
            f"{where} is damaged: the data of tensor(s) {shown} no longer match the checksums "
            "written when it was saved (a flipped bit on disk, or a bad copy). nnh did not use "
            "it. What to do: copy the file again, or use an earlier checkpoint.",
            path=path,
            kind="corrupt",
        )
    if digest != record["digest"]:
        raise CheckpointError(
            f"{where} is damaged: its non-tensor contents (names, numbers, settings) no longer "
            "match the digest written when it was saved. nnh did not use it. What to do: copy "
            "the file again, or use an earlier checkpoint.",
            path=path,
            kind="corrupt",
        )
