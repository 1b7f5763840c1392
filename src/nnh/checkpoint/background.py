"""Background checkpoint writes: snapshot now, serialise and write on another thread.

:func:`snapshot` copies every tensor of a payload at the call (on CUDA into pinned host
memory with non-blocking copies, finished by one event), so training can go on mutating its
parameters while :class:`BackgroundWriter` writes the copy with the same atomic, durable,
checksummed :func:`nnh.checkpoint.save_checkpoint` a blocking save uses.

Rules:

* one writer thread: writes happen one at a time, in submission order;
* at most one queued write per target file: a newer snapshot for a file whose previous
  write has not started yet *supersedes* it (the older handle completes with the newer
  write and reports ``superseded``); a write already under way is never interrupted;
* at most ``max_queued`` snapshots wait at once; a further submission blocks until the
  oldest is written, so memory stays bounded when saves outpace the disk;
* pending writes finish before the interpreter exits (the thread pool joins at exit);
* a failed write is kept on its handle (:meth:`SaveHandle.exception`), never lost.

Example:
    >>> import tempfile, torch
    >>> writer = BackgroundWriter()
    >>> w = torch.ones(3)
    >>> handle = writer.submit({"w": w}, f"{tempfile.mkdtemp()}/c.pth")
    >>> _ = w.add_(1)                       # training goes on; the file holds the call's state
    >>> path = handle.result()
    >>> from nnh.checkpoint import load_checkpoint
    >>> load_checkpoint(path)["w"].tolist()
    [1.0, 1.0, 1.0]
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from nnh.checkpoint.errors import CheckpointError

__all__ = ["BackgroundWriter", "SaveHandle", "snapshot"]

PathLike = str | os.PathLike[str]


BufferPool = dict[tuple[Any, ...], list[torch.Tensor]]


class _Copier:
    """Copies the tensors of a payload, reusing the buffers of an earlier snapshot.

    Fresh buffers of tens of megabytes cost page faults (pinned ones on CUDA cost far more);
    a snapshot that has been written gives its buffers back through :meth:`buffers`.
    """

    def __init__(self, pool: BufferPool | None = None) -> None:
        self.pool: BufferPool = pool if pool is not None else {}
        self.created: list[torch.Tensor] = []
        self.event: Any = None

    def _buffer(self, t: torch.Tensor, pinned: bool) -> torch.Tensor:
        spares = self.pool.get((tuple(t.shape), t.dtype, pinned))
        if spares:
            return spares.pop()
        return torch.empty(t.shape, dtype=t.dtype, pin_memory=pinned)

    def tensor(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        if t.layout is not torch.strided or t.device.type not in ("cpu", "cuda"):
            return t.to("cpu", copy=True)
        cuda = t.device.type == "cuda"
        out = self._buffer(t, pinned=cuda)
        out.copy_(t, non_blocking=cuda)
        if cuda and self.event is None:
            self.event = torch.cuda.Event()
        self.created.append(out)
        return out

    def tree(self, obj: Any, share: frozenset[str], top: bool) -> Any:
        if isinstance(obj, torch.Tensor):
            return self.tensor(obj)
        if isinstance(obj, Mapping):
            items = {
                k: (v if top and k in share else self.tree(v, share, False)) for k, v in obj.items()
            }
            if isinstance(obj, OrderedDict):  # a state_dict: keep its type and its _metadata
                copied = OrderedDict(items)
                if hasattr(obj, "_metadata"):
                    copied._metadata = obj._metadata  # type: ignore[attr-defined]
                return copied
            return items
        if isinstance(obj, list):
            return [self.tree(v, share, False) for v in obj]
        if isinstance(obj, tuple) and not isinstance(obj, torch.Size):
            return tuple(self.tree(v, share, False) for v in obj)
        return obj

    def buffers(self) -> BufferPool:
        """The buffers this copier made, keyed for reuse."""
        pool: BufferPool = {}
        for t in self.created:
            pool.setdefault((tuple(t.shape), t.dtype, t.is_pinned()), []).append(t)
        return pool


def snapshot(
    payload: Mapping[str, Any],
    *,
    share: frozenset[str] = frozenset(),
    pool: BufferPool | None = None,
) -> dict[str, Any]:
    """A copy of ``payload`` whose tensors no later in-place update can reach.

    Top-level sections named in ``share`` are kept by reference (e.g. embedded datasets,
    which training never modifies). CUDA tensors are copied into pinned host memory with
    non-blocking copies; the copy is complete when this returns. Buffers in ``pool`` (from
    a snapshot already written) are reused.

    Example:
        >>> w = torch.zeros(2)
        >>> snap = snapshot({"w": w, "n": 3})
        >>> _ = w.add_(5); snap["w"].tolist(), snap["n"]
        ([0.0, 0.0], 3)
    """
    return _snapshot(payload, share, pool)[0]


def _snapshot(
    payload: Mapping[str, Any], share: frozenset[str], pool: BufferPool | None
) -> tuple[dict[str, Any], _Copier]:
    copier = _Copier(pool)
    copied = copier.tree(payload, share, True)
    if copier.event is not None:  # one event after all the copies on the current stream
        copier.event.record()
        copier.event.synchronize()
    return copied, copier


class SaveHandle:
    """The future of one background save.

    ``done()``, ``result(timeout=None)`` (the written path, or the write's exception
    raised), ``exception(timeout=None)``, ``path``, and ``superseded`` (True when a newer
    snapshot of the same file replaced this one before it was written; the handle then
    completes with that newer write).

    Example:
        >>> h = SaveHandle(Path("x.pth")); h._future.set_result(Path("x.pth"))
        >>> h.done(), h.result().name, h.superseded
        (True, 'x.pth', False)
    """

    def __init__(self, path: Path, future: Future | None = None) -> None:
        self.path = path
        self._future: Future = future if future is not None else Future()
        self.superseded = False

    def done(self) -> bool:
        return self._future.done()

    def result(self, timeout: float | None = None) -> Path:
        return self._future.result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        return self._future.exception(timeout)

    def __repr__(self) -> str:
        state = "done" if self.done() else "pending"
        return f"SaveHandle({str(self.path)!r}, {state}{', superseded' if self.superseded else ''})"


class _Job:
    def __init__(self, payload: dict[str, Any], path: Path, after: Callable[[Path], None] | None):
        self.payload, self.path, self.after = payload, path, after
        self.copier: _Copier | None = None
        self.future: Future = Future()
        self.started = False
        self.handles: list[SaveHandle] = []

    def handle(self) -> SaveHandle:
        """A new handle on this job; the earlier ones are now superseded."""
        for earlier in self.handles:
            earlier.superseded = True
        handle = SaveHandle(self.path, self.future)
        self.handles.append(handle)
        return handle


class BackgroundWriter:
    """One background thread that writes checkpoint snapshots (see the module docstring).

    ``write`` is the function that writes a payload to a path (by default
    :func:`nnh.checkpoint.save_checkpoint`).
    """

    def __init__(
        self, max_queued: int = 2, write: Callable[[dict[str, Any], Path], Any] | None = None
    ) -> None:
        if max_queued < 1:
            raise ValueError(f"max_queued must be >= 1, got {max_queued!r}")
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nnh-save")
        self._lock = threading.Lock()
        self._queued: dict[Path, _Job] = {}
        self._slots = threading.BoundedSemaphore(max_queued)
        self._write = write
        self._futures: list[Future] = []
        self._spare: BufferPool = {}  # the buffers of the last written snapshot

    def _run(self, job: _Job) -> None:
        with self._lock:
            if self._queued.get(job.path) is job:
                del self._queued[job.path]
            job.started = True
        self._slots.release()
        try:
            if self._write is None:
                from nnh.checkpoint import save_checkpoint

                save_checkpoint(job.payload, job.path)
            else:
                self._write(job.payload, job.path)
            if job.after is not None:
                job.after(job.path)
        except CheckpointError as err:
            job.future.set_exception(err)
        except BaseException as err:  # name the file: the error surfaces later, elsewhere
            wrapped = CheckpointError(
                f"background save of {str(job.path)!r} failed: {type(err).__name__}: {err}. "
                "The previous file under that name, if any, is untouched.",
                path=job.path,
                kind="write_failed",
            )
            wrapped.__cause__ = err
            job.future.set_exception(wrapped)
        else:
            job.future.set_result(job.path)
        finally:
            job.payload = {}
            if job.copier is not None:  # its buffers serve the next snapshot
                with self._lock:
                    self._spare = job.copier.buffers()
                job.copier = None

    def submit(
        self,
        payload: dict[str, Any],
        path: PathLike,
        *,
        after: Callable[[Path], None] | None = None,
        share: frozenset[str] = frozenset(),
    ) -> SaveHandle:
        """Snapshot ``payload`` (sections in ``share`` by reference) and queue it for ``path``.

        ``after(path)`` runs on the writer thread once the file is safely written. Blocks
        while ``max_queued`` snapshots already wait.
        """
        target = Path(path)
        with self._lock:
            spare, self._spare = self._spare, {}
        data, copier = _snapshot(payload, share, spare)
        with self._lock:
            older = self._queued.get(target)
            if older is not None and not older.started:  # supersede: write the newer state
                older.payload, older.after, older.copier = data, after, copier
                return older.handle()
        self._slots.acquire()
        job = _Job(data, target, after)
        job.copier = copier
        handle = job.handle()
        with self._lock:
            self._queued[target] = job
            self._futures = [f for f in self._futures if not f.done() or f.exception()]
            self._futures.append(job.future)
        try:
            self._pool.submit(self._run, job)
        except BaseException as err:  # e.g. submitting at interpreter exit: never hang a waiter
            with self._lock:
                self._queued.pop(target, None)
            self._slots.release()
            job.future.set_exception(err)
            raise
        return handle

    def wait(self, timeout: float | None = None) -> list[BaseException]:
        """Wait for every submitted write; return (and forget) the exceptions of failed ones."""
        with self._lock:
            futures, self._futures = self._futures, []
        return [err for f in futures if (err := f.exception(timeout)) is not None]

    def failures(self) -> list[BaseException]:
        """Return (and forget) the exceptions of writes that have already failed."""
        with self._lock:
            failed = [f for f in self._futures if f.done() and f.exception() is not None]
            self._futures = [f for f in self._futures if not f.done()]
        return [f.exception() for f in failed]

    @property
    def pending(self) -> int:
        """Writes submitted and not finished.

        Example:
            >>> BackgroundWriter().pending
            0
        """
        with self._lock:
            return sum(not f.done() for f in self._futures)
