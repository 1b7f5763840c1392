"""Background saves under DDP (run by torchrun from test_async_save.py).

    python -m torch.distributed.run --nproc_per_node=2 async_ddp_script.py FOLDER

Rank 0's writer is slowed down (each file takes >= 2 s). Rank 1 leaves a marker when its
``train()`` returns; each slow write records whether the marker was there. Rank 0's
``train()`` returns only once its writes are on disk; rank 1 never waits for them, so the
last write finds rank 1 done. An ordering is checked, never a duration.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
import torch.distributed as dist
from models import MLP, classification_data

from nnh import NNHandler
from nnh.checkpoint import save_checkpoint
from nnh.checkpoint.background import BackgroundWriter


def slow_write(payload, path):
    """A slow disk: each write takes >= 2 s; it records whether rank 1 had already finished
    ``train()`` when the write went to disk (an ordering, not a duration)."""
    time.sleep(2.0)
    folder = os.path.dirname(path)
    with open(os.path.join(folder, "order.txt"), "a") as f:
        f.write(f"{os.path.basename(path)} {os.path.exists(os.path.join(folder, 'rank1_done'))}\n")
    save_checkpoint(payload, path)


def main() -> None:
    folder = sys.argv[1]
    torch.manual_seed(0)
    h = NNHandler(MLP, model_type="classification")
    h.set_optimizer(torch.optim.Adam, lr=1e-2)
    h.set_loss_fn(torch.nn.functional.cross_entropy)
    h.set_train_loader(classification_data(128), batch_size=16, shuffle=True)
    h._saves = BackgroundWriter(write=slow_write)  # a slow disk on every rank that writes
    h.auto_save(1, save_path=folder, name="e{epoch}", every_n_steps=2, async_save=True)
    h.train(2, progress_bar=False)
    written = sorted(os.listdir(folder))
    if h.rank == 1:
        with open(os.path.join(folder, "rank1_done"), "w") as f:
            f.write("done")
    with open(os.path.join(folder, f"rank{h.rank}.json"), "w") as f:
        json.dump({"written": written}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
