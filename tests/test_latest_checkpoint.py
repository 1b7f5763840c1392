"""nnh.checkpoint.latest: the newest loadable checkpoint of a folder, for crash-and-resume."""

from __future__ import annotations

import os
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

import nnh.checkpoint
from nnh import NNHandler
from nnh.checkpoint import list_temp_files

SRC = str(Path(__file__).resolve().parents[1] / "src")


def trained(folder: Path) -> NNHandler:
    torch.manual_seed(0)
    h = NNHandler(MLP, model_type="classification")
    h.set_optimizer(torch.optim.SGD, lr=0.1)
    h.set_loss_fn(nn.functional.cross_entropy)
    h.set_train_loader(classification_data(64), batch_size=16)
    h.auto_save(1, save_path=str(folder), name="run_{epoch:02d}", every_n_steps=3)
    h.train(2, progress_bar=False)
    return h


def test_the_newest_verified_file_is_found_and_resumes(tmp_path):
    h = trained(tmp_path)
    files = sorted(p.name for p in tmp_path.glob("*.pth"))
    assert any(".step-" in f for f in files) and "run_02.pth" in files, files
    newest = max(tmp_path.glob("*.pth"), key=lambda p: p.stat().st_mtime_ns)
    found = nnh.checkpoint.latest(tmp_path)
    assert found == str(newest)
    again = NNHandler.load(found)
    assert again.train_losses == h.train_losses[: len(again.train_losses)]
    assert nnh.checkpoint.latest(tmp_path, name="nothing_like_it") is None
    assert nnh.checkpoint.latest(tmp_path, name="run_01") == str(tmp_path / "run_01.pth")
    assert nnh.checkpoint.latest(tmp_path, name="*.step-*").endswith(".pth")
    assert ".step-" in nnh.checkpoint.latest(tmp_path, name="*.step-*")


def test_a_corrupt_or_empty_newest_file_is_skipped(tmp_path):
    trained(tmp_path)
    good = nnh.checkpoint.latest(tmp_path)
    time.sleep(0.02)
    bad = tmp_path / "run_99.pth"
    data = bytearray(Path(good).read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the newest file
    bad.write_bytes(bytes(data))
    (tmp_path / "run_98.pth").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    assert nnh.checkpoint.latest(tmp_path) == good
    assert nnh.checkpoint.latest(tmp_path / "missing") is None
    with pytest.raises(TypeError, match="name"):
        nnh.checkpoint.latest(tmp_path, name=3)


def test_a_write_killed_mid_way_is_never_the_answer(tmp_path):
    """kill -9 while a big checkpoint is being written: its temporary file is left, and the
    answer is still the last complete file."""
    first = tmp_path / "a.pth"
    nnh.checkpoint.save_checkpoint({"w": torch.zeros(3)}, first)
    script = tmp_path / "writer.py"
    script.write_text(textwrap.dedent(f"""
        import torch
        from nnh.checkpoint import save_checkpoint
        print("go", flush=True)
        while True:
            save_checkpoint({{"w": torch.randn(4_000_000)}}, {str(tmp_path / "b.pth")!r})
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": SRC})  # fmt: skip
    assert proc.stdout.readline().strip() == b"go"
    deadline = time.monotonic() + 120
    while not list_temp_files(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.001)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    answer = nnh.checkpoint.latest(tmp_path)
    assert answer in (str(first), str(tmp_path / "b.pth"))
    assert all(Path(answer) != t for t in list_temp_files(tmp_path))
    nnh.checkpoint.load_checkpoint(answer)  # whatever it is, it loads
