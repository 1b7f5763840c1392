"""Distributed runs for the DDP tests (launched by torchrun, or with Slurm variables).

    python ddp_script.py CASE OUT_DIR [--ckpt PATH]

Every rank runs the same code; rank 0 writes OUT_DIR/result.pt. Failure cases exit non-zero
on every rank (and must not hang).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
from models import DDPNet as Net
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

from nnh import Callback, NNHandler

N_TRAIN, N_VAL, BATCH = 96, 1001, 8
HANG_TIMEOUT_S = 4.0


def data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long())


def accuracy(out, y):
    return (out.argmax(1) == y).float().mean()


def rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


class FailOnRank(Callback):
    def __init__(self, where: str = "", on_rank: int = 1):
        super().__init__()
        self.where, self.on_rank = where, on_rank

    def on_epoch_end(self, epoch, logs=None):
        if self.where == "callback" and rank() == self.on_rank:
            raise ValueError(f"callback failure on rank {self.on_rank}")


class StopOnRankZero(Callback):
    all_ranks = False  # runs on rank 0 only: the decision must reach the other ranks

    def on_epoch_end(self, epoch, logs=None):
        if epoch == 2:
            self.handler.stop_training = True


class UnevenSampler(Sampler):
    """Rank 0 gets 5 batches, rank 1 gets 3: different loader lengths."""

    def __init__(self, n: int):
        self.n = n

    def __iter__(self):
        r = rank()
        idx = list(range(0, 40)) if r == 0 else list(range(40, 64))
        return iter(idx)

    def __len__(self):
        return 40 if rank() == 0 else 24


def build(case: str, batch: int = BATCH) -> NNHandler:
    torch.manual_seed(0)
    h = NNHandler(Net, dist_timeout=HANG_TIMEOUT_S) if case == "hang" else NNHandler(Net)
    h.set_optimizer(torch.optim.SGD, lr=0.0 if case == "pad_train" else 0.1, momentum=0.9)

    def loss(out, y):
        if case == "loss" and rank() == 1:
            raise ValueError("loss failure on rank 1")
        if case == "hang" and rank() == 1:  # a rank that never returns
            with open(os.environ["NNH_HANG_MARK"], "w") as f:
                f.write(str(time.time()))
            while True:
                time.sleep(1)
        value = nn.functional.cross_entropy(out, y)
        if case == "nan" and rank() == 1:
            value = value * float("nan")
        return value

    h.set_loss_fn(loss if case in ("loss", "nan", "hang") else nn.functional.cross_entropy)
    if case == "uneven":
        h.set_train_loader(data(64, 0), batch_size=batch, sampler=UnevenSampler(64))
    elif case == "pad_train":  # 97 samples on 2 ranks: rank 1 has 48 real + 1 padded duplicate
        h.set_train_loader(data(97, 0), batch_size=batch, shuffle=False)
    else:
        h.set_train_loader(data(N_TRAIN, 0), batch_size=batch, shuffle=False)
    # batch 64: rank 1's 501 samples are 7 x 64 + 53, its padded duplicate shares that last
    # batch with 52 real samples, so the partial-batch trimming is exercised
    h.set_val_loader(data(N_VAL, 1), batch_size=64)

    def metric(out, y):
        if case == "metric" and rank() == 1:
            raise ValueError("metric failure on rank 1")
        return accuracy(out, y)

    h.add_metric("acc", metric)
    if case == "torchmetrics":  # a stateful metric: synced by torchmetrics, padding excluded
        from torchmetrics.classification import MulticlassF1Score

        h.add_metric("f1", MulticlassF1Score(num_classes=3, average="macro"))
    h.add_callback(FailOnRank("callback" if case == "callback" else ""))
    if case == "early_stop":
        h.add_callback(StopOnRankZero())
    return h


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("case")
    ap.add_argument("out")
    ap.add_argument("--ckpt", default=None)
    ap.add_argument("--batch", type=int, default=BATCH)
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.case == "load":
        h = NNHandler.load(a.ckpt)
        h.train(epochs=1, progress_bar=False)
    else:
        h = build(a.case, a.batch)
        if a.case == "save":
            h.auto_save(1, save_path=os.path.join(a.out, "not_a_dir.txt"), name="x")
            with open(os.path.join(a.out, "not_a_dir.txt"), "w") as f:
                f.write("a file where a folder should be")
        h.train(epochs=3, progress_bar=False)
    assert h.is_distributed and h.world_size == 2, (h.is_distributed, h.world_size)
    preds = h.predict(DataLoader(data(N_VAL, 1), batch_size=64))
    if a.case == "none":  # evaluate(): every rank gets the same, padding-free numbers
        torch.save({"val_loader": h.evaluate(apply_ema=False), "dataset": h.evaluate(data(N_VAL, 1))},
                   os.path.join(a.out, f"evaluate_{h.rank}.pt"))
    if a.case != "load":
        h.save(os.path.join(a.out, "ddp.pth"))
    if h.rank == 0:
        torch.save({
            "params": {k: v.detach().clone() for k, v in h.module.state_dict().items()},
            "train_losses": h.train_losses, "val_losses": h.val_losses,
            "val_acc": h.val_metrics_history.get("acc"), "train_acc": h.train_metrics_history.get("acc"),
            "predictions": torch.cat(preds), "n_batches": len(preds),
            "logger_none_elsewhere": True,
            "val_f1": h.val_metrics_history.get("f1"),
        }, os.path.join(a.out, "result.pt"))
    else:
        assert preds is None and h.history is None and h.logger is None


if __name__ == "__main__":
    main()
