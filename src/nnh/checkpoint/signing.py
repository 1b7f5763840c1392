"""Recognising your own checkpoints: a per-user key and a MAC over the sealed digest.

A checkpoint from a stranger may only *select* things from nnh's registry
(:mod:`nnh.checkpoint.registry`); your own classes and functions (a custom callback, loss,
metric, sampler) are restored only when you vouch for them. The easiest way to vouch is to
have written the file yourself: every file nnh saves carries an HMAC-SHA256, computed with a
secret key of the user who saved it, over its sealed digest (the sha256 of every name,
number, string, tensor dtype and shape, and the tensors' checksums). On load the MAC is
recomputed with *your* key: a file you (or a teammate sharing your key) wrote is recognised
as yours and restores everything; a file whose MAC is missing or does not match is foreign
and restores the registry only. An attacker who edits one of your files cannot recompute
the MAC without the key.

The key is 32 random bytes, created on first use at ``$NNH_KEY_FILE`` if that is set,
otherwise ``$XDG_CONFIG_HOME/nnh/signing.key`` (default ``~/.config/nnh/signing.key``),
with permissions 0600 in a 0700 folder. A key file that others may write or read
(group/other write, or other read) is not used. To share a team key, copy the file to
each machine and point ``NNH_KEY_FILE`` at it. Where no key can be created (a read-only home,
say) nnh warns once and every file is treated as foreign.

What the MAC covers: every non-tensor value of the file exactly, and each tensor through its
64-bit checksum (see :mod:`nnh.checkpoint.integrity`), which guards against accidents, not a
determined forger of tensor *values*. Tensors are data only: a forged weight cannot name
code or a path.

Example:
    >>> record = {"algorithm": "sum64-v1", "tensors": {"'w'": 3}, "digest": "ab" * 32}
    >>> record["mac"] = mac_for(record)
    >>> is_own(record)
    True
    >>> record["digest"] = "cd" * 32          # anything edited: no longer yours
    >>> is_own(record)
    False
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import stat
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nnh.warn import warn as nnh_warn

__all__ = ["KEY_ENV", "is_own", "key_path", "mac_for", "sign_record", "user_key"]

KEY_ENV = "NNH_KEY_FILE"
_DOMAIN = b"nnh-checkpoint-mac-v1\x00"
_lock = threading.Lock()
_cache: dict[str, bytes | None] = {}
_warned: set[str] = set()


def key_path() -> Path:
    """Where this user's signing key lives (``$NNH_KEY_FILE`` or the config folder).

    Example:
        >>> key_path().name.endswith(".key")
        True
    """
    explicit = os.environ.get(KEY_ENV)
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "nnh" / "signing.key"


def _warn_once(path: Path, message: str) -> None:
    if str(path) not in _warned:
        _warned.add(str(path))
        nnh_warn(message)


def _read_key(path: Path) -> bytes | None:
    info = path.lstat()
    if not stat.S_ISREG(info.st_mode):
        _warn_once(path, f"nnh signing key {str(path)!r} is not a regular file; not used")
        return None
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH | stat.S_IROTH):
        _warn_once(
            path,
            f"nnh signing key {str(path)!r} may be read or written by other users (mode "
            f"{stat.S_IMODE(info.st_mode):o}); it is not used, so every checkpoint counts as "
            f"foreign. What to do: chmod 600 {path}",
        )
        return None
    text = path.read_text(encoding="ascii", errors="replace").strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) < 16:
        _warn_once(path, f"nnh signing key {str(path)!r} is not a hex key of 16+ bytes; not used")
        return None
    return key


def _create_key(path: Path) -> bytes | None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = secrets.token_bytes(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process created it meanwhile
        return _read_key(path)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(key.hex() + "\n")
        f.flush()
        os.fsync(f.fileno())
    return key


def user_key() -> bytes | None:
    """This user's signing key, created on first use; ``None`` when none can be had.

    Example:
        >>> key = user_key()
        >>> len(key), oct(key_path().stat().st_mode & 0o777)
        (32, '0o600')
    """
    path = key_path()
    with _lock:
        if str(path) in _cache:
            return _cache[str(path)]
        try:
            key = _read_key(path) if os.path.lexists(path) else _create_key(path)
        except OSError as err:
            _warn_once(
                path,
                f"nnh cannot read or create its signing key at {str(path)!r} ({err.strerror or err}); "
                "checkpoints are saved unsigned and every checkpoint loads as foreign (your own "
                f"classes only with trusted=[...]). What to do: set {KEY_ENV} to a writable path.",
            )
            key = None
        _cache[str(path)] = key
        return key


def _message(record: Mapping[str, Any]) -> bytes:
    tensors = record.get("tensors") or {}
    sums = json.dumps(sorted((str(k), int(v)) for k, v in tensors.items()))
    return _DOMAIN + str(record.get("digest")).encode() + b"\x00" + sums.encode()


def mac_for(record: Mapping[str, Any], key: bytes | None = None) -> str | None:
    """The hex HMAC-SHA256 of an integrity record (digest + tensor checksums), or ``None``
    when no key is available.

    Example:
        >>> mac_for({"digest": "00", "tensors": {}}, key=b"k" * 32)[:16]
        '7ca0691bfd7d2888'
    """
    key = user_key() if key is None else key
    if key is None:
        return None
    return hmac.new(key, _message(record), hashlib.sha256).hexdigest()


def sign_record(record: dict[str, Any]) -> dict[str, Any]:
    """Add ``"mac"`` to an integrity record (in place, and returned); unchanged without a key.

    Example:
        >>> "mac" in sign_record({"digest": "00", "tensors": {}})
        True
    """
    mac = mac_for(record)
    if mac is not None:
        record["mac"] = mac
    return record


def is_own(record: Any) -> bool:
    """Whether an integrity record carries a valid MAC under this user's key.

    Never raises: a missing, malformed or foreign MAC is simply ``False``.

    Example:
        >>> is_own({"digest": "00", "tensors": {}, "mac": "00" * 32}), is_own(None)
        (False, False)
    """
    if not isinstance(record, Mapping):
        return False
    mac = record.get("mac")
    tensors = record.get("tensors")
    if not isinstance(mac, str) or not isinstance(tensors, Mapping):
        return False
    try:
        expected = mac_for(record)
    except (TypeError, ValueError, OverflowError):
        return False
    return expected is not None and hmac.compare_digest(expected, mac)
