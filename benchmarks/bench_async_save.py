"""Background checkpointing: how much of a blocking save's cost does training still pay?

Trains one epoch of a 4.7M-parameter MLP (512-1400-1400-1400-10, Adam: 56 MB of state per
checkpoint), batch 64, one torch thread, three ways in interleaved rounds:

* ``none``  : no checkpoints
* ``sync``  : ``auto_save(every_n_steps=4)``: a durable step checkpoint every 4 steps
* ``async`` : the same with ``async_save=True`` (snapshot at the step, written on a
              background thread; ``train()`` returns once every write is on disk). Saves
              are paced (``nnh.checkpoint.pacing``): written inline while no core is free
* ``unpaced``: ``async`` with pacing off (every save in the background, as before pacing)

and reports the median epoch times and the overhead ratios
``(async - none) / (sync - none)`` (median over rounds; the same for ``unpaced``). The goal is
<= 0.35 on an idle machine, and <= 1 (never worse than blocking) with every core busy.

glibc's malloc hands freed memory back to the kernel and faults it in again: on this
project's virtual machine a training step then re-faults 30-50 MB (up to 12k page faults,
which made a 31 ms step take 45-55 ms, varying with the heap's layout, hence with anything
else the process allocates). That noise was larger than the effect measured here, so the
benchmark re-runs itself with ``GLIBC_TUNABLES`` that keep freed memory in the process (as
jemalloc or tcmalloc do), for all three modes alike. ``--system-malloc`` measures without.

``--hog N`` runs N busy-looping processes for the whole measurement (a machine whose other
cores are taken by other jobs, as on a shared CI runner).

    python benchmarks/bench_async_save.py [--rounds 5] [--dir DIR] [--quiet] [--system-malloc]
                                          [--hog N]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from nnh import NNHandler
from nnh.checkpoint.background import BackgroundWriter


class WideMLP(nn.Module):
    def __init__(self, d_in: int = 512, hidden: int = 1400, n_classes: int = 10):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d_in, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, n_classes),
        )  # fmt: skip

    def forward(self, x):
        return self.net(x)


def epoch_time(mode: str, folder: Path, data: TensorDataset) -> float:
    torch.manual_seed(0)
    h = NNHandler(WideMLP, model_type="classification")
    h.set_optimizer(torch.optim.Adam, lr=1e-4)
    h.set_loss_fn(nn.functional.cross_entropy)
    h.set_train_loader(data, batch_size=64, shuffle=True)
    if mode == "unpaced":
        h._saves = BackgroundWriter()  # no pacing: every save on the writer thread
    if mode != "none":
        h.auto_save(None, save_path=str(folder / mode), name="run", every_n_steps=4,
                    async_save=(mode in ("async", "unpaced")))  # fmt: skip
    start = time.perf_counter()
    h.train(1, progress_bar=False)
    elapsed = time.perf_counter() - start
    pacing = h._saves.pacing if mode == "async" and h._saves is not None else None
    if pacing is not None:
        INLINE.append(pacing.inline_writes)
    return elapsed


INLINE: list[int] = []  # inline saves per paced epoch


def _spin() -> None:  # a CPU hog: another job's busy core
    while True:
        pass


def start_hogs(n: int) -> list[multiprocessing.Process]:
    """``n`` busy-looping daemon processes (stopped by :func:`stop_hogs`)."""
    hogs = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(n)]
    for hog in hogs:
        hog.start()
    return hogs


def stop_hogs(hogs: list[multiprocessing.Process]) -> None:
    for hog in hogs:
        hog.kill()
        hog.join()


_KEEP_FREED_MEMORY = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--system-malloc", action="store_true", help="glibc's defaults")
    parser.add_argument("--hog", type=int, default=0, help="busy-looping processes to run")
    args = parser.parse_args()
    if not args.system_malloc and "GLIBC_TUNABLES" not in os.environ and sys.platform == "linux":
        env = {**os.environ, "GLIBC_TUNABLES": _KEEP_FREED_MEMORY}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    torch.set_num_threads(1)
    # WideMLP lives in this script: its checkpoints load from here only, as nnh warns
    warnings.filterwarnings("ignore", message=".*defined in the script being run")
    params = sum(p.numel() for p in WideMLP().parameters())
    gen = torch.Generator().manual_seed(0)
    n = 64 * args.steps
    data = TensorDataset(
        torch.randn(n, 512, generator=gen), torch.randint(0, 10, (n,), generator=gen)
    )
    folder = Path(tempfile.mkdtemp(prefix="nnh-bench-async-", dir=args.dir))
    modes = ["none", "sync", "async", "unpaced"]
    times: dict[str, list[float]] = {m: [] for m in modes}
    hogs = start_hogs(args.hog)
    try:
        epoch_time("async", folder, data)  # warm-up
        for r in range(args.rounds):
            for mode in modes[r % 4 :] + modes[: r % 4]:
                times[mode].append(epoch_time(mode, folder, data))
    finally:
        stop_hogs(hogs)
        shutil.rmtree(folder, ignore_errors=True)

    def overhead(mode: str) -> list[float]:
        return [
            (a - n0) / (s - n0)
            for n0, s, a in zip(times["none"], times["sync"], times[mode])
            if s > n0
        ]

    ratios, unpaced = overhead("async"), overhead("unpaced")
    if not args.quiet:
        malloc = os.environ.get("GLIBC_TUNABLES", "glibc defaults")
        print(f"{params / 1e6:.2f}M parameters, {args.steps} steps, checkpoint every 4 steps")
        print(f"malloc: {malloc}; {args.hog} CPU hog(s) on {os.cpu_count()} cores")
        for mode in modes:
            print(
                f"{mode:>6}: median {statistics.median(times[mode]):.3f} s  {[round(t, 3) for t in times[mode]]}"
            )
        print(f"per-round overhead ratios: {[round(x, 3) for x in ratios]}")
        print(f"inline saves per paced epoch (of {args.steps // 4}): {INLINE[1:]}")
    print(f"async/sync overhead ratio {statistics.median(ratios):.3f}")
    print(f"unpaced async/sync overhead ratio {statistics.median(unpaced):.3f}")


if __name__ == "__main__":
    main()
