"""Background saves under DDP (run by torchrun from test_async_save.py).

    python -m torch.distributed.run --nproc_per_node=2 async_ddp_script.py FOLDER

Rank 0's writer is slowed down (each file takes >= 2 s); every rank records how long its
``train()`` took. Rank 0 waits for its writes before ``train()`` returns; the other ranks
never wait for them.
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
    time.sleep(2.0)
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
    start = time.perf_counter()
    h.train(2, progress_bar=False)
    took = time.perf_counter() - start
    with open(os.path.join(folder, f"rank{h.rank}.json"), "w") as f:
        json.dump({"train_s": took, "written": sorted(os.listdir(folder))}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
