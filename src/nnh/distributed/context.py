"""Process-group plumbing for the shell: detection, set-up and the few collectives it uses.

``DistContext`` is the only object the handler talks to about processes. In a single
process every collective is a no-op, so the handler's code has no ``if distributed``
branches beyond choosing this context.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import re
import time
from collections.abc import Mapping
from typing import Any

import attrs
import torch
import torch.distributed as dist

__all__ = [
    "DEFAULT_DIST_TIMEOUT_S",
    "DistContext",
    "DistributedEnv",
    "detect_env",
    "first_slurm_host",
    "setup_distributed",
]

DEFAULT_PORT = 29500
DEFAULT_DIST_TIMEOUT_S = 1800.0  # PyTorch's own default for gloo and NCCL: 30 minutes


@attrs.frozen
class DistributedEnv:
    """Rank layout read from the environment (torchrun or Slurm)."""

    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    source: str


def first_slurm_host(nodelist: str) -> str:
    """The first host of a Slurm node list, bracket ranges included.

    Example:
        >>> first_slurm_host("gpu[003-005,010],cpu01")
        'gpu003'
        >>> first_slurm_host("node7")
        'node7'
    """
    nodelist = nodelist.strip()
    match = re.match(r"^([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if not match:
        raise ValueError(f"cannot read the Slurm node list {nodelist!r}")
    prefix, ranges = match.group(1), match.group(2)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def is_timeout(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that gave up waiting for the other ranks.

    Example:
        >>> is_timeout(RuntimeError("[gloo] Timed out waiting 5000ms for recv operation"))
        True
        >>> is_timeout(ValueError("bad loss"))
        False
    """
    text = str(exc).lower()
    backend = isinstance(exc, getattr(dist, "DistError", ()))
    return isinstance(exc, RuntimeError) and (
        "timed out" in text or (backend and "timeout" in text)
    )


def check_timeout(timeout_s: Any) -> float:
    """``timeout_s`` as a float of seconds, or a clear error naming ``dist_timeout``.

    Example:
        >>> check_timeout(30)
        30.0
        >>> check_timeout("30")
        Traceback (most recent call last):
        ...
        TypeError: dist_timeout must be a number of seconds > 0 (e.g. dist_timeout=600), got '30' (str)
    """
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
        raise TypeError(
            "dist_timeout must be a number of seconds > 0 (e.g. dist_timeout=600), got "
            f"{timeout_s!r} ({type(timeout_s).__name__})"
        )
    return float(timeout_s)


def detect_env(environ: Mapping[str, str] | None = None) -> DistributedEnv | None:
    """The distributed layout from torchrun variables or Slurm's, or ``None`` when absent.

    Example:
        >>> detect_env({"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"}).rank
        1
        >>> detect_env({}) is None
        True
    """
    env = os.environ if environ is None else environ
    if all(k in env for k in ("RANK", "WORLD_SIZE")):
        return DistributedEnv(
            rank=int(env["RANK"]),
            local_rank=int(env.get("LOCAL_RANK", env["RANK"])),
            world_size=int(env["WORLD_SIZE"]),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", DEFAULT_PORT)),
            source="torchrun",
        )
    if all(k in env for k in ("SLURM_PROCID", "SLURM_NTASKS")):
        addr = env.get("MASTER_ADDR")
        if not addr:
            nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
            addr = first_slurm_host(nodelist)
        return DistributedEnv(
            rank=int(env["SLURM_PROCID"]),
            local_rank=int(env.get("SLURM_LOCALID", "0")),
            world_size=int(env["SLURM_NTASKS"]),
            master_addr=addr,
            master_port=int(env.get("MASTER_PORT", DEFAULT_PORT)),
            source="slurm",
        )
    return None


class DistContext:
    """Rank, world size and collectives; a no-op context for a single process.

    Example:
        >>> ctx = DistContext.single()
        >>> ctx.is_main, ctx.world_size, ctx.enabled
        (True, 1, False)
    """

    def __init__(
        self,
        rank: int = 0,
        local_rank: int = 0,
        world_size: int = 1,
        enabled: bool = False,
        timeout_s: float = DEFAULT_DIST_TIMEOUT_S,
    ):
        self.rank, self.local_rank, self.world_size, self.enabled = (
            rank,
            local_rank,
            world_size,
            enabled,
        )
        self.timeout_s = timeout_s

    @classmethod
    def single(cls) -> DistContext:
        return cls()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place; returns ``tensor``."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def any_true(self, flag: bool, device: torch.device) -> bool:
        """Whether ``flag`` holds on any rank (every rank gets the same answer)."""
        if not self.enabled:
            return bool(flag)
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    _FAILURE_KEY = "nnh/failure"

    def fail(self, exc: BaseException) -> BaseException:
        """Called on a rank whose training raised: tell the other ranks and return the error
        to raise. A rank whose collective broke because a peer failed gets that peer's error.

        The failing rank posts its error to the process group's store and tears the group
        down, so peers blocked in a collective fail at once instead of waiting for a timeout.
        """
        if not self.enabled or not dist.is_initialized():
            return exc
        if is_timeout(exc):
            exc = RuntimeError(
                f"rank {self.rank} waited longer than dist_timeout={self.timeout_s:g} s for the "
                "other ranks in a collective: a rank is stuck (a loss, model or data worker that "
                "never returns) or died. Fix the stuck code, or pass a larger "
                f"NNHandler(dist_timeout=...) if a step legitimately takes longer ({exc})"
            )
        store = None
        try:
            store = dist.distributed_c10d._get_default_store()
            if store.check([self._FAILURE_KEY]):
                message = store.get(self._FAILURE_KEY).decode()
                if not message.startswith(f"rank {self.rank} "):
                    return RuntimeError(f"training stopped on every rank because {message}")
            store.set(self._FAILURE_KEY, f"rank {self.rank} raised {type(exc).__name__}: {exc}")
        except Exception:  # the store's host may be the rank that died
            pass
        with contextlib.suppress(Exception):  # already torn down
            dist.destroy_process_group()
        self.enabled = False
        return exc

    def gather_objects(self, obj: Any, dst: int = 0) -> list[Any] | None:
        """Objects of every rank on ``dst`` (``None`` elsewhere)."""
        if not self.enabled:
            return [obj]
        out: list[Any] | None = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(obj, out, dst=dst)
        return out


_EXITED_KEY = "nnh/exited"
_EXIT_WAIT_S = 10.0
_DRAIN_S = 0.05


class _Teardown:
    """Holds the default process group until :func:`_teardown_at_exit` ends it safely.

    Root cause of the intermittent abort at exit: gloo's worker threads free a finished
    collective's work object *after* ``wait()`` returned. When that work still owns tensors
    that Python created (``gather_object`` in ``predict``, the flag of ``any_true``, or
    earlier works kept alive by a later ``barrier``'s references to them), freeing them
    takes the GIL. Two ways that goes wrong:

    * the group's C++ destructor runs on the main thread, with the GIL held, when the last
      Python reference goes (a handler's DDP model freed after the user's
      ``destroy_process_group()``); it joins the worker that waits for the GIL: a hang;
    * the worker asks for the GIL while the interpreter finalizes; Python ends such a
      thread with ``pthread_exit``, which unwinds through the noexcept destructor and
      calls ``std::terminate``: "terminate called without an active exception", SIGABRT.

    So nnh keeps one reference to the group (the handler's DDP model never holds the last
    one) and, at exit, before finalization, releases the GIL so the workers finish freeing,
    then tears down and drops the reference while the workers are idle.
    """

    group: Any = None
    created_by_nnh = False
    registered = False
    # run first at exit, newest first, while the default group is still up (e.g. finishing
    # background sharded saves and destroying their process group: nnh.distributed.async_group)
    before: list[Any] = []


def before_teardown(fn: Any) -> None:
    """Run ``fn()`` at exit before nnh tears the default process group down (once per ``fn``).

    Example:
        >>> before_teardown(print); before_teardown(print); _Teardown.before.count(print)
        1
        >>> _Teardown.before.remove(print)
    """
    if fn not in _Teardown.before:
        _Teardown.before.append(fn)


def _drain_workers() -> None:
    """Release the GIL for a moment so gloo's workers finish freeing finished works."""
    for _ in range(5):
        time.sleep(_DRAIN_S / 5)


def _hold_group(created_by_nnh: bool) -> None:
    if _Teardown.group is not None and _Teardown.group is not dist.group.WORLD:
        _drain_workers()  # a new group replaces one the user destroyed: free the old safely
    _Teardown.group = dist.group.WORLD
    _Teardown.created_by_nnh = _Teardown.created_by_nnh or created_by_nnh
    if not _Teardown.registered:
        atexit.register(_teardown_at_exit)
        _Teardown.registered = True


def _teardown_at_exit() -> None:
    """End the process group cleanly before the interpreter finalizes (see :class:`_Teardown`).

    Without torchrun (Slurm, plain env://) rank 0's process hosts the rendezvous store, so
    every rank reports its teardown to the store and rank 0 waits (bounded) for all.
    """
    for fn in reversed(_Teardown.before):  # pending saves, then their own group, first
        with contextlib.suppress(Exception):
            fn()
    _drain_workers()
    if _Teardown.created_by_nnh and dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):
            store = dist.distributed_c10d._get_default_store()
            rank, world = dist.get_rank(), dist.get_world_size()
            dist.destroy_process_group()
            _drain_workers()
            store.add(_EXITED_KEY, 1)
            deadline = time.monotonic() + _EXIT_WAIT_S
            while rank == 0 and store.add(_EXITED_KEY, 0) < world and time.monotonic() < deadline:
                time.sleep(0.01)
    _Teardown.group = None  # the last reference when the user destroyed the group: workers idle


def setup_distributed(
    use_distributed: bool | None,
    device_hint: torch.device | str,
    timeout_s: float = DEFAULT_DIST_TIMEOUT_S,
) -> tuple[DistContext, torch.device]:
    """Decide on DDP and initialise the process group; returns the context and the device.

    ``True`` requires a distributed environment (clear error otherwise), ``False`` ignores
    it, ``None`` detects it. A world of one is not DDP. ``timeout_s`` bounds every
    collective: a rank that waits longer for the others fails, and with it every rank.
    """
    timeout_s = check_timeout(timeout_s)
    device = torch.device(device_hint)
    if use_distributed is False:
        return DistContext.single(), device
    env = detect_env()
    if env is None:
        if use_distributed:
            raise RuntimeError(
                "use_distributed=True but no distributed environment was found: launch with "
                "`torchrun --nproc_per_node=N script.py` (sets RANK, LOCAL_RANK, WORLD_SIZE) or "
                "under Slurm `srun` (SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS)"
            )
        return DistContext.single(), device
    if env.world_size <= 1 and not dist.is_initialized():
        return DistContext.single(), device
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this PyTorch build")
    use_cuda = torch.cuda.is_available() and device.type != "cpu"
    if use_cuda:
        device = torch.device("cuda", env.local_rank % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", env.master_addr)
        os.environ.setdefault("MASTER_PORT", str(env.master_port))
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            rank=env.rank,
            world_size=env.world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        _hold_group(created_by_nnh=True)
    else:
        _hold_group(created_by_nnh=False)
    context = DistContext(
        dist.get_rank(), env.local_rank, dist.get_world_size(), enabled=True, timeout_s=timeout_s
    )
    return context, device
