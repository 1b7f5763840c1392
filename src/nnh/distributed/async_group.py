"""The process group of background sharded saves: one gloo group per process, torn down in order.

A background sharded save runs DCP's collectives (planning, the shard-sum gather, the
commit flag) on a writer thread while training runs FSDP's collectives on the main thread.
On one group the two streams interleave differently on each rank: a deadlock. So background
saves use a gloo group of their own, created once per process (every rank calls
:func:`async_group` at the same point: the first background save) and torn down at exit in
this order, before nnh destroys the default group (:func:`nnh.distributed.context
.before_teardown`): every pending background save is finished, then this group is destroyed,
gloo's workers drained, and its last reference dropped. A group left to the interpreter's
finalization aborts the process now and then ("terminate called without an active
exception": see :class:`nnh.distributed.context._Teardown` for the mechanism).
"""

from __future__ import annotations

import contextlib
import datetime
import threading
from collections.abc import Callable
from typing import Any

import torch.distributed as dist

from nnh.distributed.context import _drain_workers, before_teardown

__all__ = ["async_group", "finish_before_teardown", "teardown_async_group"]


class _Holder:
    group: Any = None
    finishers: list[Callable[[], None]] = []
    lock = threading.Lock()


def async_group(timeout_s: float) -> Any:
    """This process's gloo group for background saves, created at the first call (a
    collective: every rank of the default group must call it at the same point).

    Example:
        >>> import torch.distributed as dist
        >>> dist.is_initialized()   # created only inside a process group
        False
    """
    if not dist.is_initialized():
        raise RuntimeError("async_group(): no default process group is initialised")
    with _Holder.lock:
        if _Holder.group is None:
            _Holder.group = dist.new_group(
                backend="gloo", timeout=datetime.timedelta(seconds=timeout_s)
            )
            before_teardown(teardown_async_group)
        return _Holder.group


def finish_before_teardown(fn: Callable[[], None]) -> None:
    """Run ``fn()`` (finish pending saves) at exit before the async group is destroyed.

    Example:
        >>> finish_before_teardown(print); _Holder.finishers.remove(print)
    """
    if fn not in _Holder.finishers:
        _Holder.finishers.append(fn)


def teardown_async_group() -> None:
    """Finish every pending background save, then destroy the async group (at exit; also
    safe to call earlier: the next background save creates a new group).

    Example:
        >>> teardown_async_group()   # no group: nothing to do
    """
    for fn in list(_Holder.finishers):
        with contextlib.suppress(Exception):
            fn()
    group = _Holder.group
    if group is None:
        return
    _drain_workers()
    if dist.is_initialized():
        with contextlib.suppress(Exception):  # already gone with the default group
            dist.destroy_process_group(group)
        _drain_workers()
    _Holder.group = None  # the last reference, dropped while gloo's workers are idle
    del group
    _drain_workers()
