"""Background saves (issue 11): snapshot at the call, write on another thread, lose nothing."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from models import MLP, classification_data
from torch import nn

from nnh import NNHandler
from nnh.checkpoint import CheckpointError, list_temp_files, load_checkpoint
from nnh.checkpoint.background import BackgroundWriter

PY = sys.executable
SRC = str(Path(__file__).resolve().parents[1] / "src")
ENV = {**os.environ, "PYTHONPATH": SRC + os.pathsep + str(Path(__file__).parent), "OMP_NUM_THREADS": "1"}


def make_handler(hidden: int = 16) -> NNHandler:
    torch.manual_seed(0)
    h = NNHandler(MLP, hidden=hidden, model_type="classification")
    h.set_optimizer(torch.optim.Adam, lr=1e-2)
    h.set_loss_fn(nn.functional.cross_entropy)
    h.set_train_loader(classification_data(256), batch_size=16, shuffle=True)
    return h


def test_background_file_holds_exactly_the_state_at_the_call(tmp_path):
    h = make_handler(hidden=256)
    h.train(1, progress_bar=False)
    weights = {k: v.clone() for k, v in h.module.state_dict().items()}
    moments = {k: v.clone() for k, v in h.optimizer.state_dict()["state"][0].items()}
    handle = h.save(str(tmp_path / "snap.pth"), blocking=False)
    h.train(2, progress_bar=False)  # training goes on while (or before) the file is written
    assert handle.result(timeout=60) == tmp_path / "snap.pth"
    saved = load_checkpoint(tmp_path / "snap.pth")
    assert saved["train_state"]["counters"]["epoch"] == 1
    for key, value in weights.items():
        assert torch.equal(saved["model_state_dict"][key], value), key
    for key, value in moments.items():
        assert torch.equal(saved["optimizer"]["state_dict"]["state"][0][key], value), key
    assert not torch.equal(h.module.state_dict()["net.0.weight"], weights["net.0.weight"])


def test_async_auto_saves_match_blocking_ones_and_rotate(tmp_path):
    files = {}
    for mode in ("sync", "async"):
        h = make_handler()
        folder = tmp_path / mode
        h.auto_save(1, save_path=str(folder), name="e{epoch}", overwrite=True, every_n_steps=5,
                    async_save=(mode == "async"))  # fmt: skip
        h.train(3, progress_bar=False)  # returns only once every write is on disk
        assert h._saves is None or h._saves.pending == 0
        files[mode] = {p.name: load_checkpoint(p) for p in folder.iterdir()}
    assert sorted(files["sync"]) == sorted(files["async"]) == sorted(["e3.pth", "eepoch.step-18ef9654.pth"])
    for name, sync in files["sync"].items():
        got = files["async"][name]
        for key in ("model_state_dict", "train_state", "history", "resume"):
            assert repr(sync[key]) == repr(got[key]), (name, key)


def test_a_newer_snapshot_supersedes_a_queued_one_for_the_same_file(tmp_path):
    release = torch.zeros(())
    started = []

    def slow_write(payload, path):
        started.append(path)
        while release.item() == 0:
            time.sleep(0.01)
        from nnh.checkpoint import save_checkpoint

        save_checkpoint(payload, path)

    writer = BackgroundWriter(write=slow_write)
    w = torch.zeros(2)
    writer.submit({"w": w}, tmp_path / "a.pth")  # starts, blocks in slow_write
    while not started:
        time.sleep(0.01)
    w += 1
    second = writer.submit({"w": w}, tmp_path / "b.pth")  # queued
    w += 1
    third = writer.submit({"w": w}, tmp_path / "b.pth")  # supersedes the queued b
    release += 1
    assert writer.wait(timeout=30) == []
    assert second.superseded and not third.superseded and second.result() == third.result()
    assert load_checkpoint(tmp_path / "a.pth")["w"].tolist() == [0.0, 0.0]
    assert load_checkpoint(tmp_path / "b.pth")["w"].tolist() == [2.0, 2.0]
    assert len(started) == 2  # the superseded snapshot was never written


def test_a_failed_background_write_is_raised_on_the_next_call_naming_the_file(tmp_path):
    h = make_handler()
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where a folder should be")
    target = blocker / "model.pth"
    handle = h.save(str(target), blocking=False)
    with pytest.raises(CheckpointError) as info:
        handle.result(timeout=30)
    assert str(target) in str(info.value)
    with pytest.raises(CheckpointError, match="not_a_folder"):
        h.train(1, progress_bar=False)  # the next call into the handler raises it
    h.train(1, progress_bar=False)  # ... once: then the handler works again
    assert len(h.train_losses) == 1


def test_pending_writes_finish_before_the_interpreter_exits(tmp_path):
    code = textwrap.dedent(
        f"""
        import torch
        from models import MLP
        from nnh import NNHandler
        h = NNHandler(MLP, hidden=1024)
        h.save({str(tmp_path / "exit.pth")!r}, blocking=False)
        # no wait: the interpreter exits right away
        """
    )
    subprocess.run([PY, "-c", code], check=True, env=ENV, timeout=120)
    assert load_checkpoint(tmp_path / "exit.pth")["model_state_dict"]["net.0.weight"].shape == (1024, 8)


RESAVER = """
import sys, torch
from torch import nn
from nnh import NNHandler
h = NNHandler(nn.Linear, in_features=2048, out_features=2048, model_type="regression")
i = 0
while True:
    with torch.no_grad():
        h.module.weight.fill_(i)
    h.save(sys.argv[1], blocking=False).result()
    print(i, flush=True)
    i += 1
"""


def test_kill_9_during_background_writes_never_leaves_a_partial_file(tmp_path):
    script = tmp_path / "resaver.py"
    script.write_text(RESAVER)
    target = tmp_path / "model.pth"
    rng = random.Random(1)
    for _trial in range(3):
        proc = subprocess.Popen([PY, str(script), str(target)], env=ENV, stdout=subprocess.PIPE, text=True)
        first = proc.stdout.readline()  # one complete file exists
        assert first.strip().isdigit(), first
        time.sleep(rng.uniform(0.0, 0.4))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        payload = load_checkpoint(target)  # checksums verify: never a partial file
        value = payload["model_state_dict"]["weight"][0, 0].item()
        assert value == int(value) >= 0
        assert all(p in (target, script) or p in list_temp_files(tmp_path) for p in tmp_path.iterdir())


def test_a_background_save_returns_before_its_file_is_written(tmp_path):
    """What training pays per checkpoint is the call, not the write (no timing asserted:
    CI shares its machine; benchmarks/bench_async_save.py measures the epoch overhead)."""
    import threading

    from nnh.checkpoint import save_checkpoint
    from nnh.checkpoint.background import BackgroundWriter

    gate = threading.Event()

    def held_write(payload, path):
        assert gate.wait(timeout=60)
        save_checkpoint(payload, path)

    h = make_handler(hidden=64)
    h.train(1, progress_bar=False)
    h._saves = BackgroundWriter(write=held_write)
    handle = h.save(str(tmp_path / "a.pth"), blocking=False)  # returns with the write held
    assert not handle.done() and not (tmp_path / "a.pth").exists()
    gate.set()
    assert handle.result(timeout=60).name == "a.pth"
    assert (tmp_path / "a.pth").exists()


def test_under_ddp_rank_0_writes_and_the_other_ranks_never_wait(tmp_path):
    import json
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in ENV.items()
           if not k.startswith(("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_", "SLURM_", "TORCHELASTIC"))}  # fmt: skip
    script = Path(__file__).with_name("async_ddp_script.py")
    cmd = [PY, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           "--master_addr=127.0.0.1", str(script), str(tmp_path)]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    assert (tmp_path / "rank1.json").exists()
    # rank 0's train() returned only once its writes were on disk; rank 1 had finished
    # train() before rank 0's last write went to disk (it never waited for the writes)
    assert "e2.pth" in rank0["written"]
    order = (tmp_path / "order.txt").read_text().split()
    assert order[-1] == "True", order
    assert load_checkpoint(tmp_path / "e2.pth")["train_state"]["counters"]["epoch"] == 2


def test_a_background_save_logs_saved_once_its_file_is_on_disk(tmp_path):
    log = tmp_path / "run.log"
    torch.manual_seed(0)
    h = NNHandler(MLP, hidden=16, model_type="classification",
                  logger_mode=NNHandler.LoggingMode.FILE, logger_filename=str(log))  # fmt: skip
    h.set_optimizer(torch.optim.Adam, lr=1e-2)
    h.set_loss_fn(nn.functional.cross_entropy)
    h.set_train_loader(classification_data(64), batch_size=16)
    h.train(1, progress_bar=False)
    target = tmp_path / "bg.pth"
    h.save(str(target), blocking=False)
    h.wait_for_saves()
    text = log.read_text()
    assert f"saving {target} in the background" in text
    assert f"saved {target}" in text
    assert text.index(f"saving {target} in the background") < text.index(f"saved {target}")
