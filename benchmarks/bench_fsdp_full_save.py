"""``save(path, full=True)`` under FSDP: time and memory of one file gathered from 2 ranks.

    python -m torch.distributed.run --nproc_per_node=2 benchmarks/bench_fsdp_full_save.py

CPU, gloo, the ~4M-parameter MLP of benchmarks/bench_fsdp.py with Adam (weights + 2 moments).
Rank 0 prints the median time of ``save(full=True)`` (gather + checks + write) against an
ordinary ``save`` of a state of the same size by one unsharded process (write only), and the
largest single tensor the gather holds at once (by construction: one tensor is all-gathered,
copied to the CPU and dropped before the next) against the whole state's bytes.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
import torch.distributed as dist
from bench_fsdp import Block, Net, data
from torch import nn

from nnh import NNHandler

REPEATS = 3


def handler(distributed: bool) -> NNHandler:
    kwargs = {"strategy": "fsdp", "fsdp": {"wrap_classes": [Block]}} if distributed else {}
    h = NNHandler(Net, seed=0, model_type="regression", use_distributed=distributed, **kwargs)
    h.set_optimizer(torch.optim.Adam, lr=1e-3)
    h.set_loss_fn(nn.functional.mse_loss)
    h.set_train_loader(data(), batch_size=256)
    return h


def main() -> None:
    torch.set_num_threads(1)
    h = handler(True)
    h.train(epochs=1, progress_bar=False)
    rank = dist.get_rank()
    folder = tempfile.mkdtemp() if rank == 0 else None
    box = [folder]
    dist.broadcast_object_list(box)
    path = os.path.join(box[0], "full.pth")
    times = []
    for _ in range(REPEATS):
        dist.barrier()
        start = time.perf_counter()
        h.save(path, full=True)
        times.append(time.perf_counter() - start)
    if rank == 0:
        one = handler(False)  # one unsharded process holding a state of the same size
        one.train(epochs=1, progress_bar=False)
        one_times = []
        for _ in range(REPEATS):
            start = time.perf_counter()
            one.save(os.path.join(box[0], "one.pth"))
            one_times.append(time.perf_counter() - start)
        full, single = statistics.median(times), statistics.median(one_times)
        state = sum(p.numel() * 3 * 4 for p in one.module.parameters())  # weights + Adam moments
        largest = max(p.numel() * 4 for p in one.module.parameters())
        print(f"save(full=True), 2 ranks: {full:.3f} s; ordinary save, 1 process: {single:.3f} s "
              f"({full / single:.2f}x)")  # fmt: skip
        print(f"largest tensor gathered at once: {largest / 2**20:.2f} MiB of a "
              f"{state / 2**20:.1f} MiB state (weights + Adam moments)")  # fmt: skip
    dist.barrier()


if __name__ == "__main__":
    main()
