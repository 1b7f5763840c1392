"""An ensemble trained under DDP (launched by torchrun from test_ensemble_ddp.py).

    python ensemble_ddp_script.py OUT_DIR

Rank 0 writes OUT_DIR/result.pt and OUT_DIR/ens.pth.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
from ensemble_models import EnsMLP
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from nnh import NNHandler

N_TRAIN, N_VAL, BATCH, MEMBERS = 96, 101, 8, 3


def data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long())


def accuracy(out, y):
    return (out.argmax(-1) == y).float().mean()


def build(batch: int) -> NNHandler:
    torch.manual_seed(0)
    h = NNHandler(EnsMLP, ensemble_size=MEMBERS, d_in=5, hidden=8)
    h.set_optimizer(torch.optim.SGD, lr=0.1, momentum=0.9)
    h.set_loss_fn(nn.functional.cross_entropy)
    h.set_train_loader(data(N_TRAIN, 0), batch_size=batch, shuffle=False)
    h.set_val_loader(data(N_VAL, 1), batch_size=25)
    h.add_metric("acc", accuracy)
    return h


def run(h: NNHandler) -> dict:
    h.train(epochs=2, progress_bar=False, gradient_clipping_norm=0.5)
    preds = h.predict(DataLoader(data(N_VAL, 1), batch_size=32))
    return {
        "params": {k: v.detach().clone() for k, v in h.module.state_dict().items()},
        "train_losses": h.train_losses,
        "members": h.member_history.state_dict() if h.member_history is not None else None,
        "predictions": None if preds is None else torch.cat(preds, dim=1),
    }


def main() -> None:
    torch.set_num_threads(1)
    out = sys.argv[1]
    h = build(BATCH)
    result = run(h)
    assert h.is_distributed and h.world_size == 2
    h.save(os.path.join(out, "ens.pth"))
    if h.rank == 0:
        torch.save(result, os.path.join(out, "result.pt"))
    else:
        assert result["predictions"] is None


if __name__ == "__main__":
    main()
