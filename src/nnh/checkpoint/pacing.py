"""Background or inline: write a checkpoint on the writer thread only when a core is free.

A background write overlaps the checkpoint's serialisation, checksums and ``fsync`` with
training, which pays off only when the writer has a core of its own. When every core is busy
(other jobs on a shared machine, or training's own threads), the writer thread takes its CPU
time from training instead, on top of the snapshot copy a blocking save does not need. On this
project's 2-core machine with the other core busy, background step checkpoints cost training
1.75x what blocking ones did (``benchmarks/bench_async_save.py --hog 1``).

:class:`WritePacing` decides, save by save, from two things Linux reports for free:

* **while writing in the background**: how long the writer thread waited for a CPU (the
  run-queue delay in ``/proc/thread-self/schedstat``) against the time it ran. A writer that
  waited for a core more than ``contended`` times its running time was taking CPU from
  somebody: the next saves are written inline (on the caller's thread, with no snapshot copy,
  exactly as a blocking save);
* **while writing inline**: how many cores stood idle since the previous save (the idle time
  in ``/proc/stat`` of the CPUs this process may run on). When at least ``spare_cores`` were
  free, the next save goes to the background again.

Where ``/proc`` does not report these (not Linux), every write goes to the background, as
before. ``NNH_SAVE_PACING=off`` turns pacing off (always background).

Example:
    >>> pacing = WritePacing(read_idle=lambda: None)
    >>> pacing.background()                  # the first save: background
    True
    >>> pacing.record_write(run_ns=100, wait_ns=90)   # the writer waited for a core
    >>> pacing.background()
    False
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping

__all__ = ["WritePacing", "idle_core_seconds", "pacing_from_env", "thread_run_and_wait"]


def thread_run_and_wait() -> tuple[int, int] | None:
    """The calling thread's time on a CPU and time waiting for one (ns), or None where the
    kernel does not report them.

    Example:
        >>> stats = thread_run_and_wait()
        >>> stats is None or (stats[0] >= 0 and stats[1] >= 0)
        True
    """
    try:
        with open("/proc/thread-self/schedstat", encoding="ascii") as f:
            fields = f.read().split()
        return int(fields[0]), int(fields[1])
    except (OSError, ValueError, IndexError):
        return None


def _cpus() -> set[int] | None:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def idle_core_seconds() -> tuple[float, float] | None:
    """(idle, total) CPU time in clock ticks, summed over the CPUs this process may run on,
    or None where ``/proc/stat`` is not readable. Two readings give the number of idle
    cores over the interval: ``len(cpus) * d_idle / d_total``.

    Example:
        >>> r = idle_core_seconds()
        >>> r is None or 0 <= r[0] <= r[1]
        True
    """
    cpus = _cpus()
    try:
        with open("/proc/stat", encoding="ascii") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    idle = total = 0.0
    seen = 0
    for line in lines:
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or name == "cpu":
            continue
        try:
            index = int(name[3:])
            ticks = [float(v) for v in rest.split()]
        except ValueError:
            continue
        if cpus is not None and index not in cpus:
            continue
        seen += 1
        idle += ticks[3] + (ticks[4] if len(ticks) > 4 else 0.0)  # idle + iowait
        total += sum(ticks[:8])  # user..steal; guest time is already in user
    return (idle, total) if seen else None


class WritePacing:
    """Per-save choice between a background and an inline write (module docstring).

    ``contended``: a background write whose run-queue wait exceeded this multiple of its
    running time switches the next saves to inline. ``spare_cores``: idle cores (averaged
    since the previous save) needed to go back to the background. ``read_idle``: the
    :func:`idle_core_seconds` reading (replaceable for tests). Thread-safe: the writer
    thread records, the training thread asks.

    Example:
        >>> ticks = iter([(0.0, 0.0), (10.0, 200.0), (170.0, 400.0)])
        >>> pacing = WritePacing(read_idle=lambda: next(ticks), cores=2)
        >>> pacing.record_write(run_ns=10, wait_ns=50)   # contended: inline from now on
        >>> pacing.background()                           # 0.1 of 2 cores were idle
        False
        >>> pacing.background()                           # 1.6 cores idle: background again
        True
    """

    def __init__(
        self,
        contended: float = 0.5,
        spare_cores: float = 0.75,
        read_idle: Callable[[], tuple[float, float] | None] = idle_core_seconds,
        cores: int | None = None,
    ) -> None:
        if not contended > 0 or not spare_cores > 0:
            raise ValueError(
                f"contended and spare_cores must be > 0, got {contended!r}, {spare_cores!r}"
            )
        self.contended = float(contended)
        self.spare_cores = float(spare_cores)
        self._read_idle = read_idle
        cpus = _cpus()
        self._cores = cores if cores is not None else (len(cpus) if cpus else os.cpu_count() or 1)
        self._lock = threading.Lock()
        self._inline = False
        self._mark: tuple[float, float] | None = None  # /proc/stat at the previous inline save
        self.inline_writes = 0  # counters, for benchmarks and tests
        self.background_writes = 0

    def background(self) -> bool:
        """Whether the save being submitted now goes to the background writer."""
        with self._lock:
            if not self._inline:
                self.background_writes += 1
                return True
            now, mark = self._read_idle(), self._mark
            self._mark = now
            if now is not None and mark is not None and now[1] > mark[1]:
                idle_cores = self._cores * (now[0] - mark[0]) / (now[1] - mark[1])
                if idle_cores >= self.spare_cores:
                    self._inline = False
                    self.background_writes += 1
                    return True
            self.inline_writes += 1
            return False

    def record_write(self, run_ns: int, wait_ns: int) -> None:
        """A background write ran ``run_ns`` on a CPU and waited ``wait_ns`` for one."""
        with self._lock:
            if run_ns > 0 and wait_ns > self.contended * run_ns:
                self._inline = True
                self._mark = self._read_idle()

    @property
    def inline(self) -> bool:
        """True while saves are written inline.

        Example:
            >>> WritePacing(read_idle=lambda: None).inline
            False
        """
        return self._inline


def pacing_from_env(env: Mapping[str, str] = os.environ) -> WritePacing | None:
    """A :class:`WritePacing` for this machine, or None (always background) when the kernel
    does not report run-queue waits or ``NNH_SAVE_PACING`` is ``off``/``0``/``false``.

    Example:
        >>> pacing_from_env({"NNH_SAVE_PACING": "off"}) is None
        True
    """
    if env.get("NNH_SAVE_PACING", "").strip().lower() in ("off", "0", "false", "no"):
        return None
    if thread_run_and_wait() is None or idle_core_seconds() is None:
        return None
    return WritePacing()
