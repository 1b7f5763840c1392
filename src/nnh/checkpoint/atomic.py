"""Atomic, durable file writes.

Every write goes to a freshly created (``O_EXCL``) temporary file in the destination folder,
is fsynced, then renamed onto the final name with :func:`os.replace` (atomic on POSIX and Windows),
and finally the folder itself is fsynced so that the rename survives a power cut. A reader
therefore sees either the previous complete file or the new complete file under the final
name, never a partial one, even if the writer is killed with ``kill -9`` at any moment.
``durable=False`` skips the two fsyncs: still atomic against a killed process, not against
a power cut.

``before_replace`` (:func:`atomic_save`) makes the check and the rename one atomic step with
respect to other nnh writers: an exclusive advisory lock (``fcntl.flock``) on a lock file
next to the target, ``.{final name}.lock``, is held across ``before_replace(final)`` and the
rename, so two writers (threads or processes) that check before replacing never replace each
other's file between one's check and its rename. The holder removes the lock file before
releasing it, and a writer that got the lock checks that the file it locked is still the one
under that name (else it locks the new one), so no lock file is left behind. Where ``fcntl`` is missing (Windows) the check runs
without the lock.

Temporary files are named ``.{final name}.tmp-{host}-{pid}-{token}``. A writer that is
killed mid-write leaves its temporary file behind (the final name is untouched);
:func:`cleanup_stale_temps` removes those whose writer is gone.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import socket
import stat
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from nnh.checkpoint.errors import CheckpointError
from nnh.checkpoint.torch_file import write_torch_file

__all__ = [
    "atomic_save",
    "atomic_write_bytes",
    "atomic_write_text",
    "claim_temp_file",
    "cleanup_stale_temps",
    "list_temp_files",
    "replace_previous",
]

PathLike = str | os.PathLike[str]

_TEMP_RE = re.compile(
    r"^\.(?P<name>.*)\.tmp-(?P<host>[A-Za-z0-9_]*)-(?P<pid>\d+)-(?P<token>[0-9a-f]{8})$"
)
_MAX_NAME_IN_TEMP = 120


def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:32]


def _temp_name(final: Path) -> str:
    return (
        f".{final.name[:_MAX_NAME_IN_TEMP]}.tmp-{_host_tag()}-{os.getpid()}-{secrets.token_hex(4)}"
    )


def _prepare_destination(final: Path) -> None:
    if final.is_dir():
        raise CheckpointError(
            f"cannot write {str(final)!r}: it is a folder. What to do: give a file name "
            "inside it, e.g. 'model.pth'.",
            path=final,
            kind="not_a_file",
        )
    final.parent.mkdir(parents=True, exist_ok=True)


def claim_temp_file(final: Path) -> tuple[Path, int]:
    """Create a new, uniquely named empty file next to ``final``; return it and an open fd.

    Its mode is ``0o666`` less the umask, as for ``open()`` (``tempfile.mkstemp`` would
    give 0600), so the file renamed over ``final`` has the permissions users expect.

    Example:
        >>> import tempfile
        >>> tmp, fd = claim_temp_file(Path(tempfile.mkdtemp()) / "x.csv"); os.close(fd)
        >>> tmp.exists()
        True
    """
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_CLOEXEC", 0)
    for _ in range(16):
        tmp = final.parent / _temp_name(final)
        try:
            return tmp, os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a unique temporary file next to {str(final)!r}")


def _fsync_folder(folder: Path) -> None:
    if os.name != "posix":  # Windows cannot open a folder for fsync
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems (network mounts) refuse fsync on folders
        pass
    finally:
        os.close(fd)


_LOW_SPACE = 8 * 2**20


def _write_failure(final: Path, written: int, err: BaseException) -> CheckpointError | None:
    """Explain a failed write when the cause is the disk or a size limit (else ``None``).

    ``written`` is the size the temporary file had reached. torch's writer reports a full
    disk as ``RuntimeError: [enforce fail at inline_container.cc] unexpected pos``, without
    the path or the cause; the file system tells the truth.
    """
    code = getattr(err, "errno", None)
    try:
        info = os.statvfs(final.parent)
        free = info.f_bavail * info.f_frsize
    except (OSError, AttributeError):
        free = None
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        limit = None if limit == resource.RLIM_INFINITY else limit
    except (ImportError, OSError, ValueError):
        limit = None
    keep = "The previous file under that name, if any, is untouched."
    if code in (errno.ENOSPC, errno.EDQUOT) or (free is not None and free < _LOW_SPACE):
        return CheckpointError(
            f"cannot write checkpoint {str(final)!r}: no space left on device ({written} bytes "
            f"written when it failed; {free if free is not None else 'unknown'} bytes free in "
            f"{str(final.parent)!r}). {keep} What to do: free disk space, or save to another "
            "disk.",
            path=final,
            kind="disk_full",
        )
    if code == errno.EFBIG or (limit is not None and written >= limit - 2**20):
        return CheckpointError(
            f"cannot write checkpoint {str(final)!r}: it exceeds the file-size limit "
            f"({limit if limit is not None else 'of the file system'} bytes; {written} bytes "
            f"written when it failed). {keep} What to do: raise the limit (ulimit -f) or save "
            "to a file system that allows larger files.",
            path=final,
            kind="file_too_large",
        )
    return None


# Replacing a large file frees its blocks inside os.replace (about 75 ms for 400 MB on ext4
# with discard), on the saver's critical path. Above this size the old file is first given a
# second, hidden name; os.replace then only renames, and the old blocks are freed by a
# background thread once the new file is in place.
_RETIRE_ABOVE = 16 * 2**20
_retired_files = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nnh-unlink")


def _large_regular_file(info: os.stat_result) -> bool:
    return stat.S_ISREG(info.st_mode) and info.st_size >= _RETIRE_ABOVE


def _retire(final: Path) -> Path | None:
    """Give ``final`` a hidden temp-style second name if it is a large regular file."""
    try:
        info = final.lstat()
    except OSError:
        return None
    if not _large_regular_file(info) or info.st_nlink != 1:
        return None
    for _ in range(4):
        link = final.parent / _temp_name(final)
        try:
            os.link(final, link)
            return link
        except FileExistsError:
            continue
        except OSError:  # no hard links here (FAT, some network file systems)
            return None
    return None


def _release_cached_pages(final: Path) -> None:
    """Drop the page cache of the large file about to be replaced (its data stays on disk).

    The new file needs as much page cache as the old one holds, and the old one's pages are
    useless once it is replaced. Handing them back first lets the write reuse memory that was
    just freed. On virtual machines that return free guest memory to the host, fresh memory
    costs a host fault per page: a 400 MB save measured 0.07 s with the old pages dropped
    first and up to 0.9 s without. ``torch.save`` over an existing file gets the same effect
    by truncating it first, which an atomic write cannot do. Only clean, unmapped pages are
    dropped (dirty ones, from a ``durable=False`` save, are only queued for write-back); the
    file's contents never change, and any failure is ignored.
    """
    advise = getattr(os, "posix_fadvise", None)
    if advise is None:
        return
    try:  # never open anything but a regular file (opening a device can have effects)
        info = final.lstat()
    except OSError:
        return
    if not _large_regular_file(info):
        return
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(final, flags)
    except OSError:
        return
    try:
        if _large_regular_file(os.fstat(fd)):  # still the file looked at
            advise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass
    finally:
        os.close(fd)


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def _size(fd: int) -> int:
    try:
        return os.fstat(fd).st_size
    except OSError:
        return 0


def _release_failed_write(err: BaseException, fd: int) -> int:
    """Give back the space of a failed write at once; return the size it had reached.

    A writer that opened the file by name (torch's C++ writer does) keeps it open for as
    long as its object lives, and the exception's traceback keeps that object alive: an
    unlinked file stays on the disk until then, so after a full-disk error the next, smaller
    save would fail too. The failed write's frames are cleared (their writer objects close
    their files now), and the file is truncated through ``fd``, which frees its blocks
    whoever else may still hold it open.
    """
    traceback.clear_frames(err.__traceback__)
    written = _size(fd)
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
    return written


@contextlib.contextmanager
def _replace_lock(final: Path) -> Iterator[None]:
    """Hold the exclusive lock on ``final``'s lock file (see the module docstring)."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks
        yield
        return
    lock = final.parent / f".{final.name[:_MAX_NAME_IN_TEMP]}.lock"
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    while True:
        fd = os.open(lock, flags, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:  # the holder before us may have removed the file: then lock the new one
                held = os.path.samestat(os.fstat(fd), os.lstat(lock))
            except FileNotFoundError:
                held = False
        except BaseException:
            os.close(fd)
            raise
        if held:
            break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):  # removed while held: waiters see it and retry
            lock.unlink()
        os.close(fd)  # releases the lock


def _atomic_write(
    path: PathLike,
    write: Callable[[Path, int], None],
    durable: bool,
    before_replace: Callable[[Path], None] | None = None,
) -> Path:
    """Claim a temp file, let ``write(tmp_path, fd)`` fill it, fsync, rename, fsync the folder.

    The fd of the claimed file stays open throughout, so the fsync covers whatever was
    written to the file, by this fd or by name. On failure the temporary file is emptied,
    closed and removed before the error propagates (:func:`_release_failed_write`).
    """
    final = Path(path)
    _prepare_destination(final)
    _release_cached_pages(final)
    tmp, fd = claim_temp_file(final)
    retired: Path | None = None
    written: int | None = None
    try:
        try:
            write(tmp, fd)
            if durable:
                os.fsync(fd)
        except BaseException as err:
            written = _release_failed_write(err, fd)
            raise
        finally:
            os.close(fd)
        if before_replace is None:
            retired = _retire(final)
            os.replace(tmp, final)
        else:
            with _replace_lock(final):
                before_replace(final)
                retired = _retire(final)
                os.replace(tmp, final)
    except BaseException as err:
        if written is None:  # the rename failed: the file is complete
            with contextlib.suppress(OSError):
                written = tmp.stat().st_size
        explained = _write_failure(final, written or 0, err) if isinstance(err, Exception) else None
        with contextlib.suppress(OSError):
            tmp.unlink()
        if retired is not None:  # the rename failed: the old file keeps its only name
            _unlink_quietly(retired)
        if explained is not None:
            raise explained from err
        raise
    if durable:
        _fsync_folder(final.parent)
    if retired is not None:  # the old file's blocks are freed off the critical path
        _retired_files.submit(_unlink_quietly, retired)
    return final


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def atomic_save(
    obj: Any,
    path: PathLike,
    *,
    durable: bool = True,
    crc32: bool = True,
    before_replace: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``obj`` with :func:`torch.save` so that ``path`` is never seen half-written.

    The bytes go to a temporary file in the same folder, which is flushed, fsynced and
    renamed onto ``path``; then the folder is fsynced. Parent folders are created. If
    anything fails (including ``KeyboardInterrupt``) the temporary file is removed and an
    existing file at ``path`` is left untouched. ``durable=False`` skips both fsyncs: the
    write stays atomic against a crashed process but not against a power cut.
    ``crc32=False`` skips the zip CRC-32 of every record, for payloads that carry their own
    checksums (see :mod:`nnh.checkpoint.torch_file`). ``before_replace(path)``, when given,
    runs once the file is written, under an exclusive lock on ``path`` that other writers
    passing ``before_replace`` also take, just before the rename: when it raises, nothing
    is replaced and the temporary file is removed (see the module docstring).

    Returns the final path.

    Example:
        >>> import tempfile, torch
        >>> folder = tempfile.mkdtemp()
        >>> p = atomic_save({"w": torch.ones(2)}, f"{folder}/sub/model.pth")
        >>> torch.load(p, weights_only=True)["w"].tolist()
        [1.0, 1.0]
        >>> def refuse(final):
        ...     raise CheckpointError(f"{final.name} is taken", kind="not_owned")
        >>> try:
        ...     atomic_save({"w": torch.zeros(2)}, p, before_replace=refuse)
        ... except CheckpointError as err:
        ...     print(err, torch.load(p, weights_only=True)["w"].tolist())
        model.pth is taken [1.0, 1.0]
    """
    # torch.save by file name (its C++ writer), not through a Python file object: measured
    # steadier on ext4, where closing the written file also starts its write-back early.
    return _atomic_write(
        path, lambda tmp, _fd: write_torch_file(obj, tmp, crc32=crc32), durable, before_replace
    )


def atomic_write_bytes(data: bytes, path: PathLike, *, durable: bool = True) -> Path:
    """Atomically replace ``path`` with ``data`` (same guarantees as :func:`atomic_save`).

    Example:
        >>> import tempfile
        >>> p = atomic_write_bytes(b"abc", f"{tempfile.mkdtemp()}/x.bin")
        >>> p.read_bytes()
        b'abc'
    """
    return _atomic_write(path, lambda _tmp, fd: _write_all(fd, data), durable)


def atomic_write_text(
    text: str, path: PathLike, *, encoding: str = "utf-8", durable: bool = True
) -> Path:
    """Atomically replace ``path`` with ``text`` encoded as ``encoding`` (e.g. a CSV log).

    Example:
        >>> import tempfile
        >>> p = atomic_write_text("epoch,loss\\n0,1.5\\n", f"{tempfile.mkdtemp()}/log.csv")
        >>> p.read_text().splitlines()[1]
        '0,1.5'
    """
    return atomic_write_bytes(text.encode(encoding), path, durable=durable)


def replace_previous(new_path: PathLike, old_path: PathLike | None) -> bool:
    """Delete ``old_path`` now that ``new_path`` is safely written; return whether it was deleted.

    Nothing is deleted when ``old_path`` is ``None``, does not exist, or is the same file as
    ``new_path`` (saving twice under one name must not delete the only copy). Refuses to
    delete anything while ``new_path`` does not exist.

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (d / "old.pth").write_bytes(b"1"); _ = (d / "new.pth").write_bytes(b"2")
        >>> replace_previous(d / "new.pth", d / "old.pth"), (d / "old.pth").exists()
        (True, False)
        >>> replace_previous(d / "new.pth", d / "new.pth")
        False
    """
    new, old = Path(new_path), None if old_path is None else Path(old_path)
    if not new.is_file():
        raise CheckpointError(
            f"will not delete the previous checkpoint {os.fspath(old_path)!r} because the new "
            f"one {str(new)!r} does not exist. What to do: save the new checkpoint first.",
            path=new,
            kind="missing",
        )
    if old is None or not old.exists():
        return False
    if os.path.samefile(new, old):
        return False
    old.unlink()
    return True


def list_temp_files(folder: PathLike, name: str | None = None) -> list[Path]:
    """List the atomic-write temporary files in ``folder`` (optionally only those for ``name``).

    Example:
        >>> import tempfile
        >>> list_temp_files(tempfile.mkdtemp())
        []
    """
    root = Path(folder)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _TEMP_RE.match(entry.name)
        if match and (name is None or match["name"] == name[:_MAX_NAME_IN_TEMP]):
            found.append(entry)
    return sorted(found)


def _pid_alive(pid: int) -> bool:
    if os.name != "posix":
        return True  # cannot tell cheaply: treat as alive, rely on age
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: exists but belongs to someone else
        return True
    return True


def _is_stale(entry: Path, now: float, max_age_s: float) -> bool:
    match = _TEMP_RE.match(entry.name)
    if match is None:
        return False
    try:
        age = now - entry.stat().st_mtime
    except FileNotFoundError:
        return False
    if age > max_age_s:
        return True
    pid = int(match["pid"])
    same_host = match["host"] == _host_tag()
    return same_host and pid != os.getpid() and not _pid_alive(pid)


def cleanup_stale_temps(
    folder: PathLike, name: str | None = None, *, max_age_s: float = 3600.0
) -> list[Path]:
    """Remove temporary files left in ``folder`` by writers that were killed mid-write.

    A temporary file is stale when the process that wrote it (same host, recorded pid) no
    longer exists, or when it is older than ``max_age_s`` seconds whoever wrote it (the only
    rule for files written from other hosts on a shared file system). Files of live writers,
    including this process, are kept. Returns the removed paths.

    Example:
        >>> import tempfile
        >>> cleanup_stale_temps(tempfile.mkdtemp())
        []
    """
    now = time.time()
    removed = []
    for entry in list_temp_files(folder, name):
        if _is_stale(entry, now, max_age_s):
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
                removed.append(entry)
    return removed
