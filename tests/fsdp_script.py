"""FSDP2 runs for tests/test_fsdp.py (launched by torchrun on gloo, 2 ranks).

    python fsdp_script.py OUT_DIR

Rank 0 writes OUT_DIR/result.pt with the gathered weights, losses, metrics and predictions
of several configurations (one launch shares the process start-up among many assertions).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from nnh import NNHandler

N_TRAIN, N_VAL, BATCH = 96, 37, 8
CONFIGS = {
    "plain": {},
    "accum_clip_ema": {"gradient_accumulation_steps": 3, "gradient_clipping_norm": 0.05,
                       "ema_decay": 0.9},
}  # fmt: skip


class Net(nn.Module):
    """Blocks of 2 Linear layers: ``wrap_classes=[Block]`` shards each as a unit."""

    def __init__(self, d: int = 5):
        super().__init__()
        self.inp = nn.Linear(d, 32)
        self.blocks = nn.Sequential(Block(32), Block(32))
        self.out = nn.Linear(32, 3)

    def forward(self, x):
        return self.out(self.blocks(torch.tanh(self.inp(x))))


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.a, self.b = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        return x + torch.tanh(self.b(torch.tanh(self.a(x))))


def data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long())


def accuracy(out, y):
    return (out.argmax(1) == y).float().mean()


def build(strategy: str | None, batch: int, fsdp: dict | None = None) -> NNHandler:
    kwargs = {} if strategy is None else {"strategy": strategy, "fsdp": fsdp}
    h = NNHandler(Net, seed=0, use_distributed=strategy is not None, **kwargs)
    h.set_optimizer(torch.optim.SGD, lr=0.1, momentum=0.9)  # SGD: clipping shows (Adam rescales)
    h.set_loss_fn(nn.functional.cross_entropy)
    h.set_train_loader(data(N_TRAIN, 0), batch_size=batch, shuffle=False)
    h.set_val_loader(data(N_VAL, 1), batch_size=batch)
    h.add_metric("acc", accuracy)
    return h


def full_state(h: NNHandler) -> dict:
    out = {}
    for k, v in h.module.state_dict().items():
        out[k] = (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
    return out


def run(strategy: str | None, batch: int, config: dict, fsdp: dict | None = None) -> dict:
    h = build(strategy, batch, fsdp)
    init = full_state(h)
    h.train(epochs=2, progress_bar=False, **config)
    preds = h.predict(DataLoader(data(N_VAL, 1), batch_size=16))
    ev = h.evaluate()
    return {"init": init, "params": full_state(h), "train_losses": h.train_losses,
            "val_losses": h.val_losses, "val_acc": h.val_metrics_history["acc"],
            "predictions": None if preds is None else torch.cat(preds), "evaluate": ev}  # fmt: skip


def main() -> None:
    out_dir = sys.argv[1]
    results = {}
    for name, config in CONFIGS.items():
        results[name] = run("fsdp", BATCH, config, {"wrap_classes": [Block]})
    results["bf16"] = run("fsdp", BATCH, {}, {"wrap_classes": [Block], "param_dtype": "bf16"})
    results["auto_wrap"] = run("fsdp", BATCH, {}, {"min_params": 500})
    h = build("fsdp", BATCH, {"wrap_classes": [Block]})
    results["is_sharded"] = type(h.module).__name__.startswith("FSDP")
    results["local_numel"] = sum(p.to_local().numel() for p in h.module.parameters())
    evals = [None, None]
    torch.distributed.all_gather_object(evals, results["plain"]["evaluate"])
    results["rank_eval"] = evals
    if torch.distributed.get_rank() == 0:
        torch.save(results, os.path.join(out_dir, "result.pt"))


if __name__ == "__main__":
    main()
