"""Background sharded saves for tests/test_sharded_async.py (torchrun, gloo, 2 ranks).

    python -m torch.distributed.run --nproc_per_node=2 sharded_async_script.py MODE OUT_DIR

MODE ``train``: trains 2 epochs with background auto-saves (``async_save=True``: an epoch
folder each epoch, a step folder every 3 batches), saves ``blk2.pth`` blocking (the same
state as ``ep2.pth``), starts a background ``save("bg.pth", blocking=False)`` and trains 2
more epochs at once (the reference continuation, ``e4``); then loads ``ep2.pth`` (written
in the background) and trains 2 epochs (``resumed_e4``), makes a background write fail, and
tries a background save of a NaN state. MODE ``soak``: two epochs with background
auto-saves replacing each other (``overwrite=True``), then a background save left pending
at exit (the teardown finishes it). MODE ``kill``: saves ``k.pth``, then saves it again in the background with each rank
sleeping after its shards (the test kills one with ``kill -9`` meanwhile). Rank 0 writes
``{MODE}-2.pt`` with the gathered results.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
import torch.distributed as dist
from sharded_ckpt_script import TRAIN, before_the_killed_save, build, set_loaders, snapshot

from nnh import NNHandler
from nnh.checkpoint import list_temp_files

EVERY = 3


def main() -> None:
    mode, out = sys.argv[1], sys.argv[2]
    result: dict = {}
    if mode == "train":
        # each write starts late (training has moved on; train() must wait for its saves), and
        # later on rank 1: the ranks' save collectives fall at different points of training's
        h = build()
        os.environ["NNH_TEST_SHARDED_WRITE_DELAY"] = str(1 + 0.4 * dist.get_rank())
        h.auto_save(1, save_path=out, name="ep{epoch}", every_n_steps=EVERY, async_save=True)
        h.train(epochs=2, **TRAIN)  # returns once every folder it started is committed
        result["e2"] = snapshot(h)
        result["committed_at_return"] = os.path.isdir(os.path.join(out, "ep2.pth"))
        h.save(os.path.join(out, "blk2.pth"))
        handle = h.save(os.path.join(out, "bg.pth"), blocking=False)
        result["bg_pending_at_return"] = not handle.done()
        h.train(epochs=2, **TRAIN)  # training goes on while bg.pth is written
        del os.environ["NNH_TEST_SHARDED_WRITE_DELAY"]
        result["bg"] = (handle.done(), str(handle.result()))
        result["e4"] = snapshot(h)
        g = NNHandler.load(os.path.join(out, "ep2.pth"))  # a folder written in the background
        result["loaded"] = snapshot(g)
        set_loaders(g)
        g.auto_save(None)
        g.train(epochs=2, **TRAIN)
        result["resumed_e4"] = snapshot(g)
        # a write that fails in the background (rank 0's temporary folder replaced by a file
        # before DCP writes): raised by the next call on every rank, the target never appears
        os.environ["NNH_TEST_SHARDED_WRITE_DELAY"] = "1"
        g.save(os.path.join(out, "fail.pth"), blocking=False)
        if dist.get_rank() == 0:
            (tmp,) = list_temp_files(out, "fail.pth")
            shutil.rmtree(tmp)
            Path(tmp).write_text("not a folder")
        try:
            g.wait_for_saves()
            mine = None
        except Exception as err:
            mine = f"{type(err).__name__}: {err}"
        del os.environ["NNH_TEST_SHARDED_WRITE_DELAY"]
        if dist.get_rank() == 0:
            Path(tmp).unlink()  # the planted file
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        result["fail_errors"] = everyone
        with torch.no_grad():  # a NaN on rank 1 only: refused on both before staging
            if dist.get_rank() == 1:
                next(g.module.parameters()).to_local().view(-1)[0] = float("nan")
        try:
            g.save(os.path.join(out, "nan.pth"), blocking=False)
        except Exception as err:
            result["nan_error"] = f"{type(err).__name__}: {err}"
    elif mode == "soak":
        h = build()
        h.auto_save(
            1, save_path=out, name="ep{epoch}", every_n_steps=EVERY, async_save=True, overwrite=True
        )  # ep1.pth goes once ep2.pth is committed
        h.train(epochs=2, **TRAIN)
        h.save(os.path.join(out, "exit.pth"), blocking=False)  # pending at exit
        return
    elif mode == "kill":
        h = before_the_killed_save(out)
        h.save(os.path.join(out, "k.pth"), blocking=False)  # killed meanwhile
        h.train(epochs=1, **TRAIN)
        h.wait_for_saves()
        return
    if dist.get_rank() == 0:
        torch.save(result, os.path.join(out, f"{mode}-2.pt"))


if __name__ == "__main__":
    main()
