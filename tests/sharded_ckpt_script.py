"""Sharded checkpoint runs for tests/test_sharded_checkpoint.py (torchrun, gloo).

    python sharded_ckpt_script.py MODE OUT_DIR

MODE ``train`` (2 ranks): trains 2 epochs (AdamW, EMA; a step checkpoint folder every 3
batches), saves the epoch folder ``e2.pth``, trains 2 more (the reference continuation).
MODE ``resume`` (any number of ranks): loads ``e2.pth`` and trains 2 epochs; with 2 ranks
also finishes the run from the step folder (``resume_training``). MODE ``kill``: saves
``k.pth``, then saves it again with each rank sleeping after its shards (the test kills one
with ``kill -9`` meanwhile). Rank 0 writes ``{MODE}-{world}.pt`` with the gathered results.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
import torch.distributed as dist
from fsdp_script import Block, Net, accuracy, data
from torch import nn

from nnh import NNHandler

N_TRAIN, N_VAL, GLOBAL_BATCH, EVERY = 96, 24, 24, 3
TRAIN = {"progress_bar": False, "ema_decay": 0.9}


def build() -> NNHandler:
    h = NNHandler(Net, seed=0, strategy="fsdp", fsdp={"wrap_classes": [Block]})
    h.set_optimizer(torch.optim.AdamW, lr=1e-2)
    h.set_loss_fn(nn.functional.cross_entropy)
    set_loaders(h)
    h.add_metric("acc", accuracy)
    return h


def set_loaders(h: NNHandler) -> None:
    """The same global batch on any number of ranks (shuffle off: the sampler interleaves)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    h.set_train_loader(data(N_TRAIN, 0), batch_size=GLOBAL_BATCH // world, shuffle=False)
    h.set_val_loader(data(N_VAL, 1), batch_size=GLOBAL_BATCH // world)


def full(tensors: dict) -> dict:
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in tensors.items()}  # fmt: skip


def snapshot(h: NNHandler) -> dict:
    state = h._state
    opt = {}
    for name, p in h.module.named_parameters():
        for key, value in h.optimizer.state.get(p, {}).items():
            opt[f"{name}.{key}"] = (
                (value.full_tensor() if hasattr(value, "full_tensor") else value).detach().clone()
            )
    return {
        "params": full(h.module.state_dict()),
        "ema": None if state is None or state.ema is None else full(dict(state.ema.items())),
        "opt": opt,
        "train_losses": list(h.train_losses),
        "val_losses": list(h.val_losses),
        "rng": torch.get_rng_state(),
        "step": None if state is None else state.step,
    }


def before_the_killed_save(out: str) -> NNHandler:
    """The kill -9 tests' run up to the save that gets killed: a complete folder ``k.pth``
    (its weights in ``kill-2.pt``), one more epoch, each rank's pid in ``pid-<rank>``, and
    a long delay inside every later shard write."""
    h = build()
    h.train(epochs=1, **TRAIN)
    h.save(os.path.join(out, "k.pth"))
    weights = snapshot(h)  # a collective: every rank takes part
    if dist.get_rank() == 0:
        torch.save({"k": weights}, os.path.join(out, "kill-2.pt"))
    h.train(epochs=1, **TRAIN)
    with open(os.path.join(out, f"pid-{dist.get_rank()}"), "w") as f:
        f.write(str(os.getpid()))
    os.environ["NNH_TEST_SHARDED_SAVE_DELAY"] = "120"
    return h


def main() -> None:
    mode, out = sys.argv[1], sys.argv[2]
    result: dict = {}
    if mode == "train":
        h = build()
        # epoch folders that replace each other, and a step folder every EVERY batches
        h.auto_save(1, save_path=out, name="ep{epoch}", every_n_steps=EVERY, overwrite=True)
        h.train(epochs=2, **TRAIN)
        result["e2"] = snapshot(h)
        h.save(os.path.join(out, "e2.pth"))
        handle = h.save(os.path.join(out, "bg.pth"), blocking=False)  # written in the background
        written = str(handle.result())
        result["bg"] = (handle.done(), written)
        h.train(epochs=2, **TRAIN)
        result["e4"] = snapshot(h)
        result["step_path"] = str(h.auto_saver.step_path())
        # a NaN state is refused on every rank before anything is written
        with torch.no_grad():
            p = next(h.module.parameters())
            if dist.get_rank() == 1:
                p.to_local().view(-1)[0] = float("nan")
        try:
            h.save(os.path.join(out, "nan.pth"))
        except Exception as err:
            result["nan_error"] = f"{type(err).__name__}: {err}"
    elif mode == "resume":
        h = NNHandler.load(os.path.join(out, "e2.pth"))
        result["loaded"] = snapshot(h)
        result["sharded"] = getattr(h.module, "_nnh_fsdp", False)
        world = dist.get_world_size() if dist.is_initialized() else 1
        set_loaders(h)
        if world != 2:  # the step folder belongs to the 2-rank resume now (a sibling run)
            h.auto_save(None)
        h.train(epochs=2, **TRAIN)
        result["e4"] = snapshot(h)
        if world == 2:
            ddp = NNHandler.load(os.path.join(out, "e2.pth"), strategy="ddp")  # FSDP -> DDP
            result["ddp_loaded"] = snapshot(ddp)
            result["ddp_wrapped"] = type(ddp._model).__name__
            ddp.auto_save(None)
            ddp.train(epochs=2, **TRAIN)
            result["ddp_e4"] = snapshot(ddp)
            step = NNHandler.load(sys.argv[3])
            result["step_resume"] = step._resume is not None
            step.resume_training()
            result["step_e4"] = snapshot(step)
    elif mode == "kill":
        h = before_the_killed_save(out)
        h.save(os.path.join(out, "k.pth"))  # killed meanwhile
        return
    world = dist.get_world_size() if dist.is_initialized() else 1
    if not dist.is_initialized() or dist.get_rank() == 0:
        torch.save(result, os.path.join(out, f"{mode}-{world}.pt"))


if __name__ == "__main__":
    main()
