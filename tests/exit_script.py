"""The usual end of a DDP script, for the clean-exit tests.

    python exit_script.py OUT_DIR {destroy,keep} [{local,global}]

train, predict, save, NNHandler.load, barrier and (``destroy``) the user's own
``destroy_process_group()``; the process must then exit 0 on every rank, every time. The
handlers live in a function (``local``: freed when it returns) or in module globals
(``global``: freed while the interpreter finalizes).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
import torch.distributed as dist
from models import DDPNet
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from nnh import NNHandler


def data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long())


def main() -> tuple[NNHandler, NNHandler]:
    out, mode = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    torch.manual_seed(0)
    h = NNHandler(DDPNet)
    h.set_optimizer(torch.optim.SGD, lr=0.1)
    h.set_loss_fn(nn.functional.cross_entropy)
    h.set_train_loader(data(32, 0), batch_size=8)
    h.set_val_loader(data(17, 1), batch_size=8)
    h.train(epochs=1, progress_bar=False)
    assert h.is_distributed and h.world_size == 2
    h.predict(DataLoader(data(9, 2), batch_size=4))
    path = os.path.join(out, "exit.pth")
    h.save(path)
    g = NNHandler.load(path)
    g.predict(DataLoader(data(9, 2), batch_size=4))
    dist.barrier()
    if mode == "destroy":
        dist.destroy_process_group()
    print(f"rank {h.rank} done", flush=True)
    return h, g


if __name__ == "__main__":
    if sys.argv[3:] == ["global"]:
        HANDLERS = main()
    else:
        main()
