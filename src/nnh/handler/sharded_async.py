"""Background sharded saves under FSDP: staged at the call, written on a group of their own.

``save(path, blocking=False)`` and ``auto_save(..., async_save=True)`` under FSDP run
:func:`submit_sharded`. At the call, on every rank (the default group, as a blocking save):

1. the NaN check of every rank's shards (a non-finite state is refused before anything is
   staged), rank 0's ownership check and temporary folder (:func:`~nnh.handler.sharded_io
   .begin_sharded`);
2. staging: ``torch.distributed.checkpoint.async_save`` copies this rank's shards of the model,
   optimizer, EMA weights and open accumulation window to CPU memory, and the RNG states,
   position and (rank 0) the non-tensor payload are taken.

Then the call returns a :class:`~nnh.checkpoint.background.SaveHandle`, and in the background,
on the process's own gloo group (:func:`nnh.distributed.async_group.async_group`; DCP's
collectives on the default group deadlock against FSDP's while training goes on), in
submission order (one writer thread per handler; a save's DCP write starts only once the
save before it is committed): DCP writes the shards, every rank hashes its files, the sums
and RNG states are gathered, rank 0 writes the signed metadata and commits the folder
atomically, and every rank learns whether that succeeded. A failure fails the handle on
every rank and is raised by the next ``train``/``save``/``wait_for_saves`` call; ``train()``
returns only once every save it started is committed. At exit, pending saves finish before
the async group and then the default group are torn down.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nnh.checkpoint.background import SaveHandle
from nnh.distributed.async_group import async_group, finish_before_teardown
from nnh.handler.finite import NonFiniteStateError
from nnh.handler.sharded_io import (
    _tensor_state,
    any_rank,
    begin_sharded,
    finish_sharded,
    sharded_details,
)

if TYPE_CHECKING:  # pragma: no cover
    from nnh.handler import NNHandler

__all__ = ["MAX_IN_FLIGHT", "ShardedSaver", "submit_sharded"]

# tests only: seconds the writer waits before DCP writes a staged save
_TEST_WRITE_DELAY_ENV = "NNH_TEST_SHARDED_WRITE_DELAY"
MAX_IN_FLIGHT = 2  # staged copies held at once; a further save waits for the oldest


class _GatedStager:
    """DCP's staging (a copy to CPU memory, made at the call) whose result is released to
    DCP's writer thread only when ``release`` runs: after every earlier save is committed,
    so no two saves' collectives ever interleave on the async group."""

    should_synchronize_after_execute = False

    def __init__(self, release: Callable[[Callable[[], None]], None]) -> None:
        self._release = release

    def stage(self, state_dict: dict[str, Any]) -> Future:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        stager = DefaultStager(StagingOptions(False, False, False, False))
        try:
            staged = stager.stage(state_dict)  # the copy, now, on the caller's thread
        finally:
            stager.close()
        out: Future = Future()

        def release() -> None:  # on the writer thread, once every earlier save is done
            delay = os.environ.get(_TEST_WRITE_DELAY_ENV)
            if delay:  # tests only: the write starts late, training has changed the weights
                time.sleep(float(delay))
            out.set_result(staged)

        self._release(release)
        return out

    def synchronize_staging(self) -> None:  # pragma: no cover - staging is synchronous
        pass

    def close(self) -> None:
        pass


class ShardedSaver:
    """One handler's background sharded saves, written in order on one thread.

    Example:
        >>> saver = ShardedSaver()
        >>> saver.pending, saver.wait(), saver.failures()
        (0, [], [])
    """

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nnh-sharded-save")
        self._lock = threading.Lock()
        self._handles: list[SaveHandle] = []
        _SAVERS.add(self)

    @property
    def pending(self) -> int:
        with self._lock:
            return sum(not h.done() for h in self._handles)

    def submit(
        self,
        handler: NNHandler,
        path: str,
        *,
        resume: dict[str, Any] | None,
        include_datasets: bool,
        guard_replace: bool,
        after: Callable[[Path], None] | None,
        warn_if_refused: bool,
    ) -> SaveHandle:
        """Check and stage now (every rank), write in the background; see the module."""
        import torch.distributed.checkpoint as dcp

        h = handler
        group = async_group(h._dist.timeout_s)  # collective: every rank, first save only
        self._bound_in_flight()
        handle = SaveHandle(Path(path))
        try:
            name = begin_sharded(h, path, resume=resume, guard_replace=guard_replace)
        except NonFiniteStateError as err:
            if not warn_if_refused:
                raise
            h._warn(str(err))  # reported now; the handle says why, nothing to raise later
            handle._future.set_exception(err)
            return handle
        tensors = _tensor_state(h)
        details = sharded_details(h, tensors, resume=resume, include_datasets=include_datasets)
        response = dcp.async_save(
            tensors,
            storage_writer=dcp.FileSystemWriter(name),
            process_group=group,
            async_stager=_GatedStager(self._executor.submit),
        )
        upload: Future = response.upload_completion

        def finish() -> None:  # on the writer thread, in submission order
            error: BaseException | None = None
            try:
                upload.result()
            except BaseException as err:
                error = err
            try:
                if any_rank(error is not None, group):  # every rank stops together
                    raise error or RuntimeError(f"saving {path} failed on another rank")
                finish_sharded(h, name, path, details, guard_replace=guard_replace,
                               group=group)  # fmt: skip
                if after is not None and h._dist.is_main:
                    after(Path(path))
            except BaseException as err:
                handle._future.set_exception(_failed(path, err))
                return
            handle._future.set_result(Path(path))

        self._executor.submit(finish)
        with self._lock:
            self._handles.append(handle)
        h._log(f"saving {path} in the background")
        return handle

    def _bound_in_flight(self) -> None:
        with self._lock:
            waiting = [h for h in self._handles if not h.done()]
        for old in waiting[: max(0, len(waiting) - MAX_IN_FLIGHT + 1)]:
            old._future.exception()  # wait; its error stays on its handle for failures()

    def wait(self, timeout: float | None = None) -> list[BaseException]:
        """Wait for every submitted save; return (and forget) the errors of failed ones."""
        with self._lock:
            handles, self._handles = self._handles, []
        return [err for h in handles if (err := h.exception(timeout)) is not None]

    def failures(self) -> list[BaseException]:
        """Return (and forget) the errors of saves that have already failed."""
        with self._lock:
            done = [h for h in self._handles if h.done()]
            self._handles = [h for h in self._handles if not h.done()]
        return [err for h in done if (err := h.exception()) is not None]


def _failed(path: str, err: BaseException) -> BaseException:
    from nnh.checkpoint import CheckpointError

    if isinstance(err, CheckpointError):
        return err
    wrapped = CheckpointError(
        f"background save of the sharded checkpoint {path!r} failed: {type(err).__name__}: "
        f"{err}. The previous folder under that name, if any, is untouched.",
        path=path,
        kind="write_failed",
    )
    wrapped.__cause__ = err
    return wrapped


_SAVERS: weakref.WeakSet[ShardedSaver] = weakref.WeakSet()


def _finish_all() -> None:
    for saver in list(_SAVERS):
        saver.wait()


finish_before_teardown(_finish_all)


def submit_sharded(
    handler: NNHandler,
    path: str,
    *,
    resume: dict[str, Any] | None = None,
    include_datasets: bool = True,
    guard_replace: bool = False,
    after: Callable[[Path], None] | None = None,
    warn_if_refused: bool = False,
) -> SaveHandle:
    """Start a background sharded save of ``handler`` (every rank calls it; see the module).

    Example:
        >>> from torch import nn
        >>> from nnh import NNHandler
        >>> h = NNHandler(nn.Linear, in_features=2, out_features=1)
        >>> try:
        ...     submit_sharded(h, "x.pth")
        ... except ValueError as err:
        ...     print(str(err)[:51])
        submit_sharded: the handler's module is not sharded
    """
    from nnh.handler.sharded_io import is_sharded

    if not is_sharded(handler):
        raise ValueError(
            "submit_sharded: the handler's module is not sharded (strategy='fsdp' under "
            f"several ranks is); got a {type(handler.module).__name__}"
        )
    saver = handler.__dict__.get("_sharded_saves")
    if saver is None:
        saver = handler._sharded_saves = ShardedSaver()
    return saver.submit(handler, path, resume=resume, include_datasets=include_datasets,
                        guard_replace=guard_replace, after=after,
                        warn_if_refused=warn_if_refused)  # fmt: skip
