"""Training runs for the resume tests, each in a fresh process.

    python resume_script.py MODE OUT [CKPT_OR_DIR] [--slow SECONDS]

MODE: straight | first | second | autosave | stepsave | stepsave_async | resume_step |
      resume_epoch
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
from models import MLP, BatchLog, SlowFrom, accuracy, classification_data

from nnh import NNHandler

TRAIN = dict(ema_decay=0.9, gradient_accumulation_steps=2, gradient_clipping_norm=1.0, progress_bar=False)


def build(slow: float, marker: str) -> NNHandler:
    torch.manual_seed(0)
    h = NNHandler(MLP, dropout=0.3)
    h.set_optimizer(torch.optim.AdamW, lr=1e-2, weight_decay=0.01)
    h.set_scheduler(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.7)
    h.set_loss_fn(torch.nn.functional.cross_entropy)
    h.set_train_loader(classification_data(), batch_size=16, shuffle=True)
    h.set_val_loader(classification_data(30, seed=1), batch_size=10)
    h.add_metric("acc", accuracy)
    h.add_callback(BatchLog())
    h.add_callback(SlowFrom(epoch=3, seconds=slow, marker=marker))
    return h


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode")
    ap.add_argument("out")
    ap.add_argument("ckpt", nargs="?")
    ap.add_argument("--slow", type=float, default=0.0)
    ap.add_argument("--marker", default="")
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.mode == "straight":
        h = build(a.slow, a.marker)
        h.train(4, **TRAIN)
    elif a.mode == "first":
        h = build(a.slow, a.marker)
        h.train(2, **TRAIN)
        h.save(a.ckpt)
    elif a.mode == "second":
        h = NNHandler.load(a.ckpt)
        h.train(2, **TRAIN)
    elif a.mode == "autosave":
        h = build(a.slow, a.marker)
        h.auto_save(1, save_path=a.ckpt, name="ep{epoch}")
        h.train(4, **TRAIN)
    elif a.mode == "stepsave":
        h = build(a.slow, a.marker)
        h.auto_save(None, save_path=a.ckpt, name="run", every_n_steps=1)
        h.train(4, **TRAIN)
    elif a.mode == "stepsave_async":
        h = build(a.slow, a.marker)
        h.auto_save(None, save_path=a.ckpt, name="run", every_n_steps=1, async_save=True)
        h.train(4, **TRAIN)
    elif a.mode == "resume_step":
        h = NNHandler.load(a.ckpt)
        assert h.remaining_epochs >= 1
        h.resume_training()
    elif a.mode == "resume_epoch":  # an epoch checkpoint written inside train(4)
        h = NNHandler.load(a.ckpt)
        assert h.remaining_epochs == 4 - h.state.epoch, h.remaining_epochs
        h.resume_training()
    else:
        raise SystemExit(f"unknown mode {a.mode}")
    h.save(a.out)


if __name__ == "__main__":
    main()
