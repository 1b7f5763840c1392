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

__all__ = ["DistContext", "DistributedEnv", "detect_env", "first_slurm_host", "setup_distributed"]

DEFAULT_PORT = 29500


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
        self, rank: int = 0, local_rank: int = 0, world_size: int = 1, enabled: bool = False
    ):
        self.rank, self.local_rank, self.world_size, self.enabled = (
            rank,
            local_rank,
            world_size,
            enabled,
        )

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


def _destroy_at_exit() -> None:
    """Tear down the group nnh created, so the process exits cleanly (best effort).

    Without torchrun (Slurm, plain env://) rank 0's process hosts the rendezvous store; if it
    exited first, the other ranks' teardown would talk to a vanished store and abort. So
    every rank reports to the store after its teardown, and rank 0 waits (bounded) for all.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    with contextlib.suppress(Exception):
        store = dist.distributed_c10d._get_default_store()
        rank, world = dist.get_rank(), dist.get_world_size()
        dist.destroy_process_group()
        store.add(_EXITED_KEY, 1)
        deadline = time.monotonic() + _EXIT_WAIT_S
        while rank == 0 and store.add(_EXITED_KEY, 0) < world and time.monotonic() < deadline:
            time.sleep(0.01)


def setup_distributed(
    use_distributed: bool | None, device_hint: torch.device | str, timeout_s: float = 1800.0
) -> tuple[DistContext, torch.device]:
    """Decide on DDP and initialise the process group; returns the context and the device.

    ``True`` requires a distributed environment (clear error otherwise), ``False`` ignores
    it, ``None`` detects it. A world of one is not DDP.
    """
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
        atexit.register(_destroy_at_exit)
    return DistContext(dist.get_rank(), env.local_rank, dist.get_world_size(), enabled=True), device
