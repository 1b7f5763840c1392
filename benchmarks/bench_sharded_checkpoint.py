"""nnh's sharded checkpoint save vs a plain ``torch.distributed.checkpoint.save`` of the
same state.

    python -m torch.distributed.run --nproc_per_node=2 benchmarks/bench_sharded_checkpoint.py [FOLDER]

CPU, gloo, 2 ranks, the ~4M-parameter MLP of benchmarks/bench_fsdp.py (each block one FSDP
unit), Adam state and EMA weights present. Each repeat times, with a barrier before and
after: ``handler.save(folder)`` (NaN check on every rank, DCP save of model + optimizer +
EMA, the gathered per-rank RNG states, the signed nnh metadata file with the SHA-256 of
every shard, the atomic commit; the datasets are left out, ``include_datasets=False``, as
they are not part of the DCP state) and ``dcp.save`` of the same tensors to a fresh folder
(nothing else). Rank 0 prints the medians and their ratio (goal <= 1.2). Then the
background save: the time until ``handler.save(folder, blocking=False)`` returns (the NaN
check, the temporary folder and the staging copy to CPU; the write, hashing and commit go on
in the background, finished with ``wait_for_saves()`` outside the timing) against the
blocking save's time (goal <= 0.35). All write to FOLDER (default: a temporary folder; give
one on the disk you care about).
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from bench_fsdp import Block, Net, data
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

from nnh import NNHandler

REPEATS = 11


def main() -> None:
    h = NNHandler(Net, seed=0, model_type="regression", strategy="fsdp",
                  fsdp={"wrap_classes": [Block]})  # fmt: skip
    h.set_optimizer(torch.optim.Adam, lr=1e-4)
    h.set_loss_fn(nn.functional.mse_loss)
    h.set_train_loader(data(), batch_size=64, shuffle=False)
    h.train(epochs=1, progress_bar=False, save_on_last_epoch=False, ema_decay=0.99)
    root = sys.argv[1] if len(sys.argv) > 1 else None
    base = dist_str(tempfile.mkdtemp(dir=root) if dist.get_rank() == 0 else None)
    nnh_times, dcp_times, bg_times = [], [], []
    for i in range(REPEATS):
        dist.barrier()
        t = time.perf_counter()
        h.save(os.path.join(base, f"nnh-{i}.pth"), include_datasets=False)
        dist.barrier()
        nnh_times.append(time.perf_counter() - t)
        state = {"model": get_model_state_dict(h.module),
                 "optim": get_optimizer_state_dict(h.module, h.optimizer),
                 "ema": dict(h._state.ema.items())}  # fmt: skip
        dist.barrier()
        t = time.perf_counter()
        dcp.save(state, checkpoint_id=os.path.join(base, f"dcp-{i}"))
        dist.barrier()
        dcp_times.append(time.perf_counter() - t)
        dist.barrier()
        t = time.perf_counter()
        h.save(os.path.join(base, f"bg-{i}.pth"), include_datasets=False, blocking=False)
        took = torch.tensor([time.perf_counter() - t])
        dist.all_reduce(took, op=dist.ReduceOp.MAX)  # the slower rank's return
        bg_times.append(took.item())
        h.wait_for_saves()
        dist.barrier()
    if dist.get_rank() == 0:
        a, b = statistics.median(nnh_times), statistics.median(dcp_times)
        size = sum(
            f.stat().st_size for f in __import__("pathlib").Path(base, "nnh-0.pth").iterdir()
        )
        print(
            f"state on disk: {size / 2**20:.1f} MiB in {len(os.listdir(os.path.join(base, 'nnh-0.pth')))} files"
        )
        print(f"nnh sharded save: {a * 1e3:.0f} ms (median of {REPEATS})")
        print(f"plain dcp.save:   {b * 1e3:.0f} ms")
        print(f"ratio: {a / b:.2f}x (goal <= 1.2)")
        c = statistics.median(bg_times)
        print(f"background save, until the call returns: {c * 1e3:.0f} ms (slower rank)")
        print(f"ratio to the blocking save: {c / a:.2f}x (goal <= 0.35)")
        shutil.rmtree(base, ignore_errors=True)
    dist.barrier()


def dist_str(value: str | None) -> str:
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


if __name__ == "__main__":
    main()
