"""Which files nnh may delete or replace: only checkpoints it wrote for the same run.

Paths stored in a checkpoint (``auto_saver.last_saved``, a ``ModelCheckpoint``'s
``best_path``) are data, not authority: a crafted file can point them at anything. Every
handler therefore carries a random *run id* of its own (:class:`RunId`), also when it was
loaded from a file, and writes it into each checkpoint it saves. A file's claim of an id
proves nothing by itself: only a file that is the user's own (its MAC verifies,
:mod:`nnh.checkpoint.signing`) hands its run id and that run's ancestors to the loaded
handler as its *lineage*, so that resuming your own run may still replace and prune that
run's earlier files, while two processes loaded from the same file (each with its own id)
never replace each other's. Before nnh removes a file it wrote earlier,
:func:`remove_owned` checks that the file

1. lies inside the folder the saver is configured to write to,
2. is a regular file (not a symbolic link, a folder or a device), and
3. is an nnh checkpoint carrying this run's id or one of its lineage;

otherwise it is left alone. :func:`may_replace` applies the same ownership test before an
automatic save writes over an existing file. Reading the run id maps the file instead of
reading its tensors, so the check costs milliseconds even for large checkpoints.

Example:
    >>> import tempfile, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> precious = folder / "notes.txt"; _ = precious.write_text("mine")
    >>> remove_owned(precious, folder=folder, run_id=new_run_id())
    False
    >>> precious.exists()
    True
"""

from __future__ import annotations

import os
import stat
import uuid
from collections.abc import Mapping
from pathlib import Path

import torch

from nnh.checkpoint.format import FORMAT_KEY

__all__ = [
    "RUN_KEY",
    "RunId",
    "folder_may_receive",
    "may_replace",
    "new_run_id",
    "read_run_id",
    "remove_owned",
]

PathLike = str | os.PathLike[str]
RUN_KEY = "run"


class RunId(str):
    """A run id (the string written into files) with the ids it may act for: itself and
    its ``lineage`` (the runs of the user's own file it was loaded from, and theirs).

    Example:
        >>> rid = RunId("b" * 32, lineage=["a" * 32])
        >>> sorted(owner_ids(rid)) == ["a" * 32, "b" * 32], str(rid) == "b" * 32
        (True, True)
    """

    lineage: frozenset[str]

    def __new__(cls, value: str, lineage: object = ()) -> RunId:
        obj = super().__new__(cls, value)
        obj.lineage = frozenset(x for x in lineage if isinstance(x, str) and x)  # type: ignore[attr-defined]
        return obj

    def __reduce__(self) -> tuple:  # pickles (and copies) as itself, never as a plain str
        return (RunId, (str(self), tuple(self.lineage)))


def owner_ids(run_id: str | RunId) -> frozenset[str]:
    """The ids whose files ``run_id`` may replace or delete: itself and its lineage.

    Example:
        >>> owner_ids("abc")
        frozenset({'abc'})
    """
    return frozenset({str(run_id)}) | getattr(run_id, "lineage", frozenset())


def new_run_id() -> str:
    """A fresh random run id (32 hex digits).

    Example:
        >>> len(new_run_id()), new_run_id() != new_run_id()
        (32, True)
    """
    return uuid.uuid4().hex


def _regular_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(path.lstat().st_mode)
    except OSError:
        return False


def _metadata_of(path: Path) -> Path:
    """A sharded checkpoint folder (a real folder, not a link) stands for its metadata file."""
    from nnh.checkpoint.sharded import METADATA_NAME

    try:
        is_folder = stat.S_ISDIR(path.lstat().st_mode)
    except OSError:
        return path
    return path / METADATA_NAME if is_folder else path


def read_run_id(path: PathLike) -> str | None:
    """The run id stored in the nnh checkpoint at ``path``; ``None`` for anything else.

    Never raises: a missing, foreign, damaged or unsafe file simply has no run id.

    Example:
        >>> import tempfile
        >>> from nnh.checkpoint import save_checkpoint
        >>> p = save_checkpoint({"run": {"id": "abc"}}, f"{tempfile.mkdtemp()}/c.pth")
        >>> read_run_id(p), read_run_id(f"{p}.missing")
        ('abc', None)
    """
    file = _metadata_of(Path(path))
    if not _regular_file(file):
        return None
    try:
        payload = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    if not isinstance(payload, Mapping) or FORMAT_KEY not in payload:
        return None
    run = payload.get(RUN_KEY)
    run_id = run.get("id") if isinstance(run, Mapping) else None
    return run_id if isinstance(run_id, str) and run_id else None


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve(strict=True).relative_to(folder.resolve(strict=True))
    except (OSError, ValueError):
        return False
    return True


def owned(path: PathLike, *, folder: PathLike, run_id: str) -> bool:
    """Whether ``path`` is an nnh checkpoint of run ``run_id`` inside ``folder``.

    Example:
        >>> import tempfile
        >>> from nnh.checkpoint import save_checkpoint
        >>> d = tempfile.mkdtemp()
        >>> p = save_checkpoint({"run": {"id": "r1"}}, f"{d}/c.pth")
        >>> owned(p, folder=d, run_id="r1"), owned(p, folder=d, run_id="r2")
        (True, False)
    """
    file = Path(path)
    return (
        bool(run_id)
        and _regular_file(_metadata_of(file))
        and _inside(file, Path(folder))
        and read_run_id(file) in owner_ids(run_id)
    )


def remove_owned(path: PathLike, *, folder: PathLike, run_id: str) -> bool:
    """Delete ``path`` if :func:`owned` says nnh wrote it for this run; return whether it did.

    Example:
        >>> import tempfile
        >>> from nnh.checkpoint import save_checkpoint
        >>> d = tempfile.mkdtemp()
        >>> p = save_checkpoint({"run": {"id": "r1"}}, f"{d}/c.pth")
        >>> remove_owned(p, folder=d, run_id="r2"), remove_owned(p, folder=d, run_id="r1")
        (False, True)
    """
    if not owned(path, folder=folder, run_id=run_id):
        return False
    try:
        if _metadata_of(Path(path)) != Path(path):  # a sharded checkpoint folder
            import shutil

            shutil.rmtree(path)
            return True
        Path(path).unlink()
    except FileNotFoundError:
        return False
    return True


def may_replace(path: PathLike, *, run_id: str) -> bool:
    """Whether an automatic save may write ``path``: it is free, or this run's checkpoint.

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> may_replace(d / "new.pth", run_id="r1")
        True
        >>> _ = (d / "notes.pth").write_text("not a checkpoint")
        >>> may_replace(d / "notes.pth", run_id="r1")
        False
    """
    file = Path(path)
    if not os.path.lexists(file):
        return True
    return _regular_file(file) and read_run_id(file) in owner_ids(run_id)


def folder_may_receive(folder: PathLike, *, run_id: str) -> bool:
    """Whether a save folder named by a checkpoint file may receive this run's files.

    True for a relative folder that stays under the working folder (no ``..``), and for a
    folder that already holds a checkpoint of run ``run_id`` (the run's own folder, e.g.
    when resuming from ``/scratch/me/ckpt/e5.pth``); False otherwise, so that a file from a
    stranger cannot make nnh write into ``~/.config`` or a ``site-packages`` folder.

    Example:
        >>> folder_may_receive("checkpoints/run1", run_id="r1")
        True
        >>> folder_may_receive("../elsewhere", run_id="r1"), folder_may_receive("/etc", run_id="r1")
        (False, False)
    """
    path = Path(folder)
    if not path.is_absolute() and ".." not in path.parts:
        return True
    try:
        entries = [e for e in path.iterdir() if e.suffix == ".pth"]
    except OSError:
        return False
    ids = owner_ids(run_id)
    return any(read_run_id(e) in ids for e in entries[:1000])
