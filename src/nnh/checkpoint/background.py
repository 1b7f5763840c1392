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
* a refused newer snapshot never costs a good queued one: when a snapshot first
  supersedes a queued one, the superseded snapshot is kept as the job's *fallback* (its
  handles still say ``superseded``). The writer checks the newest snapshot; if it is
  refused (its ``check`` raises, or its deferred copy failed), its handle fails with the
  refusal and the fallback is checked and written instead (its handles then complete with
  that write and stop saying ``superseded``). Snapshots superseded in between are dropped
  unchecked, as before; the fallback is the earliest snapshot queued for the file, so a
  divergence (a good state, then only NaN ones) keeps the good one. The checks stay on the
  writer thread, and a queued file holds at most two snapshots;
* at most ``max_queued`` files wait at once (each with at most two snapshots, see above); a
  further submission blocks until the oldest is written, so memory stays bounded when
  saves outpace the disk;
* pending writes finish before the interpreter exits (the thread pool joins at exit);
* a failed write is kept on its handle (:meth:`SaveHandle.exception`), never lost;
* ``check(snapshot)`` (optional) runs on the writer thread before the write; when it raises,
  nothing is written and the error is the handle's result.

Deferred copies (``defer``): sections of the payload that only an optimizer's ``step()``
changes in place (its moments, the EMA weights) need not be copied while the caller waits.
Their copy runs on a second thread, the *stager*, while training computes the next forward
and backward pass; :meth:`BackgroundWriter.hold` makes the optimizer's next ``step()`` wait
until that copy is complete (a step pre-hook), so the file still holds exactly the state at
the call. Each deferred tensor's version counter is compared after its copy: a tensor changed
in place by anything else in between makes that save fail (kind ``"changed_while_saving"``)
rather than write a mix of two states. On CUDA every copy is made at the call.

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
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from pathlib import Path
from typing import Any

import torch

from nnh.checkpoint.errors import CheckpointError
from nnh.checkpoint.pacing import WritePacing, thread_run_and_wait

__all__ = ["BackgroundWriter", "SaveHandle", "defer_spec", "snapshot"]

PathLike = str | os.PathLike[str]


BufferPool = dict[tuple[Any, ...], list[torch.Tensor]]
# a nested mapping of payload keys; True marks a section whose tensors may be copied later
DeferSpec = Mapping[str, "DeferSpec | bool"]


def defer_spec(*paths: tuple[str, ...]) -> DeferSpec:
    """The sections at ``paths`` (tuples of keys from the payload's top) as a spec for
    :meth:`BackgroundWriter.submit`'s ``defer``.

    Example:
        >>> defer_spec(("train_state", "ema"), ("optimizer", "state_dict", "state"))
        {'train_state': {'ema': True}, 'optimizer': {'state_dict': {'state': True}}}
        >>> defer_spec(("a", "b"), ("a",))      # a section inside a deferred one
        {'a': True}
    """
    spec: dict[str, Any] = {}
    for path in sorted(paths, key=len):  # a section inside a deferred one is deferred already
        if not path:
            raise ValueError("a deferred section needs a path of at least one key")
        node: Any = spec
        for key in path[:-1]:
            node = node.setdefault(key, {})
            if node is True:
                break
        else:
            node[path[-1]] = True
    return spec


class _Copier:
    """Copies the tensors of a payload, reusing the buffers of an earlier snapshot.

    Fresh buffers of tens of megabytes cost page faults (pinned ones on CUDA cost far more);
    a snapshot that has been written gives its buffers back through :meth:`buffers`.
    """

    def __init__(self, pool: BufferPool | None = None) -> None:
        self.pool: BufferPool = pool if pool is not None else {}
        self.created: list[torch.Tensor] = []
        self.event: Any = None
        # deferred copies: (source, destination, the source's version at the call, where)
        self.late: list[tuple[torch.Tensor, torch.Tensor, int, str]] = []

    def _buffer(self, t: torch.Tensor, pinned: bool) -> torch.Tensor:
        spares = self.pool.get((tuple(t.shape), t.dtype, pinned))
        if spares:
            return spares.pop()
        return torch.empty(t.shape, dtype=t.dtype, pin_memory=pinned)

    def tensor(self, t: torch.Tensor, late_as: str | None = None) -> torch.Tensor:
        t = t.detach()
        if t.layout is not torch.strided or t.device.type not in ("cpu", "cuda"):
            return t.to("cpu", copy=True)
        cuda = t.device.type == "cuda"
        out = self._buffer(t, pinned=cuda)
        version = _version(t) if late_as is not None and not cuda else None
        if version is not None:
            self.late.append((t, out, version, late_as))  # type: ignore[arg-type]
            self.created.append(out)
            return out
        out.copy_(t, non_blocking=cuda)
        if cuda and self.event is None:
            self.event = torch.cuda.Event()
        self.created.append(out)
        return out

    def tree(
        self,
        obj: Any,
        share: frozenset[str],
        top: bool,
        defer: DeferSpec | bool | None = None,
        where: str = "",
    ) -> Any:
        """Copy ``obj``; ``defer`` is the part of the defer spec at this node (True: defer
        every tensor below), ``where`` names the node for error messages."""
        if isinstance(obj, torch.Tensor):
            return self.tensor(obj, where if defer is True else None)
        if isinstance(obj, Mapping):
            items = {
                k: (
                    v
                    if top and k in share
                    else self.tree(
                        v,
                        share,
                        False,
                        defer if defer is True or not defer else defer.get(k),
                        f"{where}/{k}" if defer else where,
                    )
                )
                for k, v in obj.items()
            }
            if isinstance(obj, OrderedDict):  # a state_dict: keep its type and its _metadata
                copied = OrderedDict(items)
                if hasattr(obj, "_metadata"):
                    copied._metadata = obj._metadata  # type: ignore[attr-defined]
                return copied
            return items
        late = True if defer is True else None
        if isinstance(obj, list):
            return [self.tree(v, share, False, late, where) for v in obj]
        if isinstance(obj, tuple) and not isinstance(obj, torch.Size):
            return tuple(self.tree(v, share, False, late, where) for v in obj)
        return obj

    def finish(self, path: Path) -> None:
        """Make the deferred copies; raise when a source changed since the call."""
        late, self.late = self.late, []
        if not late:
            return
        torch._foreach_copy_([d for _, d, _, _ in late], [s for s, _, _, _ in late])
        changed = [where for s, _, v, where in late if s._version != v]
        if changed:
            shown = ", ".join(changed[:3]) + (
                f" and {len(changed) - 3} more" if len(changed) > 3 else ""
            )
            raise CheckpointError(
                f"background save of {str(path)!r} was not written: {shown} changed in place "
                "before its copy was complete. Only the optimizer's step() is expected to "
                "change them, and it waits for the copy. The previous file under that name is "
                "untouched. What to do: change optimizer state or EMA weights between train() "
                "calls, or save with async_save=False.",
                path=path,
                kind="changed_while_saving",
            )

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


def _version(t: torch.Tensor) -> int | None:
    try:
        return int(t._version)
    except RuntimeError:  # an inference tensor has no version counter: copy it now
        return None


def _snapshot(
    payload: Mapping[str, Any],
    share: frozenset[str],
    pool: BufferPool | None,
    defer: DeferSpec | None = None,
) -> tuple[dict[str, Any], _Copier]:
    copier = _Copier(pool)
    copied = copier.tree(payload, share, True, defer or None)
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
        self.inline = False  # written on the caller's thread (see WritePacing)

    def done(self) -> bool:
        return self._future.done()

    def result(self, timeout: float | None = None) -> Path:
        return self._future.result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        return self._future.exception(timeout)

    def __repr__(self) -> str:
        state = "done" if self.done() else "pending"
        return f"SaveHandle({str(self.path)!r}, {state}{', superseded' if self.superseded else ''})"


Check = Callable[[dict[str, Any]], None]


def _write_failed(path: Path, err: BaseException) -> CheckpointError:
    """``err`` (not a :class:`CheckpointError`) as one that names the file."""
    wrapped = CheckpointError(
        f"background save of {str(path)!r} failed: {type(err).__name__}: {err}. "
        "The previous file under that name, if any, is untouched.",
        path=path,
        kind="write_failed",
    )
    wrapped.__cause__ = err
    return wrapped


class _Job:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.payload: dict[str, Any] = {}
        self.after: Callable[[Path], None] | None = None
        self.check: Check | None = None
        self.on_refused: Callable[[CheckpointError], None] | None = None
        self.write: Callable[[dict[str, Any], Path], Any] | None = None
        self.copier: _Copier | None = None
        self.staged: Future | None = None  # the deferred copies, made by the stager
        self.future: Future = Future()
        self.started = False
        self.refusal_reported = False
        self.handles: list[SaveHandle] = []
        self.fallback: _Job | None = None  # the first superseded snapshot, if still queued

    def load(
        self, payload: dict[str, Any], copier: _Copier | None, staged: Future | None, **options: Any
    ) -> None:
        """Take a (newer) snapshot and its options."""
        self.payload, self.copier, self.staged = payload, copier, staged
        self.after, self.check, self.on_refused = (
            options["after"],
            options["check"],
            options["on_refused"],
        )
        self.write = options.get("write")

    def supersede(
        self, payload: dict[str, Any], copier: _Copier, staged: Future | None, **options: Any
    ) -> SaveHandle:
        """Take a newer snapshot; the first one superseded stays as the fallback (with its
        handles and future), later ones are dropped (their handles follow the newer one)."""
        if self.fallback is None:
            kept = self.fallback = _Job(self.path)
            kept.load(self.payload, self.copier, self.staged, after=self.after,  # type: ignore[arg-type]
                      check=self.check, on_refused=self.on_refused, write=self.write)  # fmt: skip
            kept.future, kept.handles = self.future, self.handles
            for earlier in kept.handles:
                earlier.superseded = True
            self.future, self.handles = Future(), []
        self.load(payload, copier, staged, **options)
        return self.handle()

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
    :func:`nnh.checkpoint.save_checkpoint`). ``pacing`` (a :class:`WritePacing`): saves
    submitted with ``paced=True`` are written inline on the caller's thread while the
    machine has no core to spare for the writer (:mod:`nnh.checkpoint.pacing`).
    """

    def __init__(
        self,
        max_queued: int = 2,
        write: Callable[[dict[str, Any], Path], Any] | None = None,
        pacing: WritePacing | None = None,
    ) -> None:
        if max_queued < 1:
            raise ValueError(f"max_queued must be >= 1, got {max_queued!r}")
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nnh-save")
        self._lock = threading.Lock()
        self._queued: dict[Path, _Job] = {}
        self._slots = threading.BoundedSemaphore(max_queued)
        self._write = write
        self._jobs: list[_Job] = []
        self._spare: BufferPool = {}  # the buffers of the last written snapshot
        self._stager: ThreadPoolExecutor | None = None
        self._staging: Future | None = None  # the latest deferred copy
        self._held: weakref.WeakSet[Any] = weakref.WeakSet()  # optimizers with our pre-hook
        self.pacing = pacing

    def _run(self, job: _Job) -> None:
        with self._lock:
            if self._queued.get(job.path) is job:
                del self._queued[job.path]
            job.started = True
            fallback, job.fallback = job.fallback, None
        self._slots.release()
        before = thread_run_and_wait() if self.pacing is not None else None
        refused = self._attempt(job)
        if before is not None and self.pacing is not None:
            after = thread_run_and_wait()
            if after is not None:
                self.pacing.record_write(after[0] - before[0], after[1] - before[1])
        if fallback is None:
            return
        if refused:  # the newest snapshot was bad: write the one it superseded
            for handle in fallback.handles:
                handle.superseded = False
            self._attempt(fallback)
            return
        err = job.future.exception()  # the fallback's handles complete with the newer write
        if err is None:
            fallback.future.set_result(job.path)
        else:
            fallback.refusal_reported = True  # reported once, by the newer job
            fallback.future.set_exception(err)
        fallback.payload, fallback.copier = {}, None

    def _attempt(self, job: _Job) -> bool:
        """Check and write ``job``'s snapshot; set its future. True when the snapshot itself
        was refused (its check raised or its deferred copy failed), not its write."""
        refused = False
        try:
            refused = True
            if job.staged is not None:
                job.staged.result()  # the deferred copies, or their error
            if job.check is not None:
                try:
                    job.check(job.payload)
                except CheckpointError as err:
                    if job.on_refused is not None:
                        job.on_refused(err)
                        job.refusal_reported = True
                    raise
            refused = False
            write = job.write or self._write
            if write is None:
                from nnh.checkpoint import save_checkpoint

                save_checkpoint(job.payload, job.path)
            else:
                write(job.payload, job.path)
            if job.after is not None:
                job.after(job.path)
        except CheckpointError as err:
            job.future.set_exception(err)
        except BaseException as err:  # name the file: the error surfaces later, elsewhere
            job.future.set_exception(_write_failed(job.path, err))
        else:
            job.future.set_result(job.path)
        finally:
            job.payload = {}
            if job.copier is not None:  # its buffers serve the next snapshot
                with self._lock:
                    self._spare = job.copier.buffers()
                job.copier = None
        return refused

    def submit(
        self,
        payload: dict[str, Any],
        path: PathLike,
        *,
        after: Callable[[Path], None] | None = None,
        share: frozenset[str] = frozenset(),
        defer: DeferSpec | None = None,
        check: Check | None = None,
        on_refused: Callable[[CheckpointError], None] | None = None,
        write: Callable[[dict[str, Any], Path], Any] | None = None,
        paced: bool = False,
    ) -> SaveHandle:
        """Snapshot ``payload`` (sections in ``share`` by reference) and queue it for ``path``.

        ``after(path)`` runs on the writer thread once the file is safely written. Blocks
        while ``max_queued`` snapshots already wait. ``defer`` (see :func:`defer_spec`) names
        sections whose copy the stager makes after the call returns: only for state that
        nothing changes before :meth:`wait_staged` (use :meth:`hold`). ``check(snapshot)``
        runs on the writer thread before the write; a :class:`CheckpointError` it raises
        stops the write and is the handle's result, and is also passed to ``on_refused``
        when given (that error is then not reported again by :meth:`wait`/:meth:`failures`).
        ``write(snapshot, path)``, when given, writes this snapshot instead of the writer's
        ``write`` function (e.g. one that checks ownership at the rename). ``paced``: when the
        writer's ``pacing`` says no core is free, the save is written now, on the caller's
        thread, after every earlier submission (no snapshot copy; the returned handle is
        done and has ``inline`` set).

        Example:
            >>> import tempfile
            >>> def positive(snap):
            ...     if snap["w"].min() < 0:
            ...         raise CheckpointError("negative", kind="refused")
            >>> writer = BackgroundWriter()
            >>> handle = writer.submit({"w": torch.ones(2)}, f"{tempfile.mkdtemp()}/w.pth",
            ...                        check=positive)
            >>> handle.result().name
            'w.pth'
        """
        target = Path(path)
        options = {"after": after, "check": check, "on_refused": on_refused, "write": write}
        if paced and self.pacing is not None and not self.pacing.background():
            return self._write_inline(payload, target, options)
        with self._lock:
            spare, self._spare = self._spare, {}
        data, copier = _snapshot(payload, share, spare, defer)
        staged = None
        if copier.late:
            if self._stager is None:
                self._stager = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nnh-stage")
            staged = self._staging = self._stager.submit(copier.finish, target)
        with self._lock:
            older = self._queued.get(target)
            if older is not None and not older.started:  # supersede: write the newer state
                first = older.fallback is None
                handle = older.supersede(data, copier, staged, **options)
                if first:  # the superseded snapshot's outcome is now tracked on its own
                    self._jobs.append(older.fallback)  # type: ignore[arg-type]
                return handle
        self._slots.acquire()
        job = _Job(target)
        job.load(data, copier, staged, **options)
        handle = job.handle()
        with self._lock:
            self._queued[target] = job
            self._jobs = [j for j in self._jobs if not j.future.done() or j.future.exception()]
            self._jobs.append(job)
        try:
            self._pool.submit(self._run, job)
        except BaseException as err:  # e.g. submitting at interpreter exit: never hang a waiter
            with self._lock:
                self._queued.pop(target, None)
            self._slots.release()
            job.future.set_exception(err)
            raise
        return handle

    def _write_inline(
        self, payload: dict[str, Any], target: Path, options: dict[str, Any]
    ) -> SaveHandle:
        """Write ``payload`` now, on this thread, once every earlier submission is written
        (so files still change in submission order); no copy: nothing runs in between."""
        self.wait_staged()
        with self._lock:
            earlier = [j.future for j in self._jobs]
        futures_wait(earlier)
        job = _Job(target)
        job.load(payload, None, None, **options)
        job.started = True
        handle = job.handle()
        handle.inline = True
        with self._lock:
            self._jobs = [j for j in self._jobs if not j.future.done() or j.future.exception()]
            self._jobs.append(job)
        self._attempt(job)
        return handle

    def hold(self, optimizer: Any) -> bool:
        """Make every ``optimizer.step()`` first wait for the deferred copies (a step
        pre-hook, registered once per optimizer; free when no copy is under way). False
        when ``optimizer`` takes no step pre-hooks: then nothing may be deferred.

        Example:
            >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
            >>> writer = BackgroundWriter(); writer.hold(opt), writer.hold(opt)
            (True, True)
        """
        if optimizer in self._held:
            return True
        register = getattr(optimizer, "register_step_pre_hook", None)
        if register is None:
            return False
        this = weakref.ref(self)  # the hook must not keep the writer alive

        def wait_for_copies(*_: Any) -> None:
            writer = this()
            if writer is not None and writer._staging is not None:
                writer.wait_staged()

        register(wait_for_copies)
        self._held.add(optimizer)
        return True

    def wait_staged(self) -> None:
        """Wait until the deferred copies of every submitted snapshot are made (their
        errors go to their saves' handles)."""
        staging = self._staging
        if staging is not None:
            futures_wait([staging])
            if self._staging is staging:
                self._staging = None

    def wait(self, timeout: float | None = None) -> list[BaseException]:
        """Wait for every submitted write; return (and forget) the exceptions of failed ones."""
        with self._lock:
            jobs, self._jobs = self._jobs, []
        return [
            err
            for j in jobs
            if (err := j.future.exception(timeout)) is not None and not j.refusal_reported
        ]

    def failures(self) -> list[BaseException]:
        """Return (and forget) the exceptions of writes that have already failed."""
        with self._lock:
            failed = [j for j in self._jobs if j.future.done() and j.future.exception() is not None]
            self._jobs = [j for j in self._jobs if not j.future.done()]
        return [j.future.exception() for j in failed if not j.refusal_reported]

    @property
    def pending(self) -> int:
        """Writes submitted and not finished.

        Example:
            >>> BackgroundWriter().pending
            0
        """
        with self._lock:
            return sum(not j.future.done() for j in self._jobs)
