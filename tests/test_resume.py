"""Exact resume in NEW processes, bitwise on CPU: save/load, AutoSaver, and a mid-epoch
checkpoint of a run killed with ``kill -9``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nnh.checkpoint import load_checkpoint

SCRIPT = Path(__file__).with_name("resume_script.py")
COMPARED = ("model_state_dict", "optimizer", "scheduler", "train_state", "history")


def run(*args: str, timeout: float = 120) -> None:
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(SCRIPT), *args], check=True, timeout=timeout, env=env)


def start(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(SCRIPT), *args], env=env)


def assert_bitwise_equal(a, b, where="") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
        for k in a:
            assert_bitwise_equal(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bitwise_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} != {b!r}"


def compare_runs(path_a: Path, path_b: Path) -> None:
    a, b = load_checkpoint(path_a), load_checkpoint(path_b)
    for key in COMPARED:
        assert_bitwise_equal(a[key], b[key], key)
    assert_bitwise_equal(a["callbacks"][0], b["callbacks"][0], "BatchLog")  # the batch order
    # torch's generator drives shuffling and dropout; Python's `random` is unseeded in these
    # processes (so it differs between any two of them) and unused.
    assert_bitwise_equal(a["rng"]["torch"], b["rng"]["torch"], "rng/torch")
    assert a["train_state"]["counters"]["epoch"] == 4
    assert len(a["callbacks"][0]["state"]["sums"]) == 4 * 8  # every batch of 4 epochs seen once


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight") / "final.pth"
    run("straight", str(out))
    return out


def test_train_save_load_in_new_process_train_is_bitwise_equal(straight, tmp_path):
    ckpt, out = tmp_path / "half.pth", tmp_path / "final.pth"
    run("first", str(tmp_path / "unused.pth"), str(ckpt))
    run("second", str(out), str(ckpt))
    compare_runs(straight, out)


def _reached(marker: Path, *, epoch: int, batch: int) -> bool:
    """Whether the run's marker says it is in ``epoch`` at batch ``batch`` or later."""
    try:
        at_epoch, at_batch = map(int, marker.read_text().split())
    except (FileNotFoundError, ValueError):
        return False
    return at_epoch == epoch and at_batch >= batch


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, "the run ended before the test could kill it"
        assert time.monotonic() < deadline, "timed out waiting for the run"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def test_interrupted_run_resumes_from_autosaver_epoch_checkpoint(straight, tmp_path):
    marker = tmp_path / "marker"
    proc = start("autosave", str(tmp_path / "never.pth"), str(tmp_path), "--slow", "0.2", "--marker", str(marker))
    _kill_when(proc, lambda: marker.exists())  # epoch 3 is under way: ep2.pth is complete
    assert (tmp_path / "ep2.pth").exists() and not (tmp_path / "ep4.pth").exists()
    out = tmp_path / "final.pth"
    run("second", str(out), str(tmp_path / "ep2.pth"))
    compare_runs(straight, out)


def test_resume_training_from_an_epoch_checkpoint_of_a_longer_call_is_bitwise(straight, tmp_path):
    """ep2.pth was written after epoch 2 of train(4): a new process loads it, sees 2 epochs
    remaining and resume_training() finishes the call with its options, bitwise."""
    run("autosave", str(tmp_path / "full.pth"), str(tmp_path))
    out = tmp_path / "final.pth"
    run("resume_epoch", str(out), str(tmp_path / "ep2.pth"))
    compare_runs(straight, out)


def test_kill_9_mid_epoch_resumes_bitwise_from_step_checkpoint(straight, tmp_path):
    marker = tmp_path / "marker"
    proc = start("stepsave", str(tmp_path / "never.pth"), str(tmp_path), "--slow", "0.2", "--marker", str(marker))

    _kill_when(proc, lambda: _reached(marker, epoch=3, batch=2))
    (step_ckpt,) = tmp_path.glob("run.step-*.pth")  # one recovery file for the run
    resume = load_checkpoint(step_ckpt)["resume"]
    assert resume["epoch"] == 3 and 0 < resume["batch_offset"] < 8  # really mid-epoch
    out = tmp_path / "final.pth"
    run("resume_step", str(out), str(step_ckpt))
    compare_runs(straight, out)


def test_kill_9_mid_epoch_resumes_bitwise_from_background_step_checkpoint(straight, tmp_path):
    """Step checkpoints written in the background (async_save=True): whatever step file is on
    disk when the run is killed resumes bitwise."""
    marker = tmp_path / "marker"
    proc = start(
        "stepsave_async", str(tmp_path / "never.pth"), str(tmp_path), "--slow", "0.2", "--marker", str(marker)
    )

    _kill_when(proc, lambda: _reached(marker, epoch=3, batch=3))
    (step_ckpt,) = tmp_path.glob("run.step-*.pth")
    resume = load_checkpoint(step_ckpt)["resume"]
    assert resume["epoch"] == 3 and 0 < resume["batch_offset"] < 8
    out = tmp_path / "final.pth"
    run("resume_step", str(out), str(step_ckpt))
    compare_runs(straight, out)
