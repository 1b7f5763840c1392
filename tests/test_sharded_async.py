"""Background sharded saves under FSDP (gloo, 2 real ranks; tests/sharded_async_script.py).

One launch trains with background auto-saves (epoch and step folders), a background save
while training goes on, and a resume from a folder written in the background; the kill -9
test and the clean-exit soak have launches of their own, each under its own timeout. The
soak repeats ``NNH_SOAK`` launches (``NNH_SOAK=1``: 20; default 2).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from test_ddp import free_port
from test_sharded_checkpoint import TIMEOUT, assert_equal, env, kill_rank_one_during_save_of_k

from nnh import NNHandler
from nnh.checkpoint import list_temp_files
from nnh.checkpoint.sharded import METADATA_NAME

SCRIPT = Path(__file__).with_name("sharded_async_script.py")
pytestmark = pytest.mark.slow


def command(*args: str) -> list[str]:
    import sys

    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
            f"--master_port={free_port()}", "--master_addr=127.0.0.1", str(SCRIPT), *args]  # fmt: skip


def launch(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(command(*args), env=env(), capture_output=True, text=True,
                          timeout=TIMEOUT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "terminate called" not in proc.stderr, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("sharded_async")
    launch("train", str(out))
    return {"out": out, **torch.load(out / "train-2.pt", weights_only=False)}


def folder_state(path: Path) -> tuple[dict, NNHandler]:
    """Every tensor a folder restores (one process, no process group: DCP reads it whole)."""
    h = NNHandler.load(str(path))
    names = {id(p): n for n, p in h.module.named_parameters()}
    state = {f"model.{k}": v for k, v in h.module.state_dict().items()}
    state.update({f"optim.{names[id(p)]}.{k}": v
                  for p, st in h.optimizer.state.items() for k, v in st.items()})  # fmt: skip
    state.update({f"ema.{k}": v for k, v in h._state.ema.items()})
    return state, h


def test_background_auto_saves_during_training_commit_before_train_returns(run):
    out = run["out"]
    assert run["committed_at_return"]  # train() returned with ep2.pth committed
    assert sorted(p.name for p in out.glob("ep?.pth")) == [f"ep{i}.pth" for i in (1, 2, 3, 4)]
    steps = list(out.glob("*.step-*.pth"))
    assert len(steps) == 1 and (steps[0] / METADATA_NAME).is_file()  # the step folder
    assert list_temp_files(out) == []  # every temporary folder was committed


def test_a_background_folder_equals_a_blocking_save_of_the_same_state(run):
    a, ha = folder_state(run["out"] / "ep2.pth")  # written in the background by auto_save
    b, hb = folder_state(run["out"] / "blk2.pth")  # blocking, same state
    assert_equal(a, b)
    assert ha.train_losses == hb.train_losses and ha.val_losses == hb.val_losses
    ma = torch.load(run["out"] / "ep2.pth" / METADATA_NAME, weights_only=True)["sharded"]
    mb = torch.load(run["out"] / "blk2.pth" / METADATA_NAME, weights_only=True)["sharded"]
    for ra, rb in zip(ma["rng"], mb["rng"], strict=True):  # every rank's RNG states
        assert torch.equal(ra["global"]["torch"], rb["global"]["torch"])
    assert ma["tensors"] == mb["tensors"] and ma["world_size"] == 2


def test_training_goes_on_while_a_background_save_writes_the_state_at_the_call(run):
    assert run["bg_pending_at_return"]  # save(blocking=False) returned before the commit
    done, path = run["bg"]
    assert done and Path(path) == run["out"] / "bg.pth"
    a, _ = folder_state(run["out"] / "bg.pth")  # training changed the weights meanwhile
    b, _ = folder_state(run["out"] / "blk2.pth")
    assert_equal(a, b)


def test_a_background_folder_resumes_bitwise(run):
    assert_equal(run["loaded"]["params"], run["e2"]["params"])
    assert_equal(run["loaded"]["opt"], run["e2"]["opt"])
    for part in ("params", "ema", "opt"):
        assert_equal(run["resumed_e4"][part], run["e4"][part])
    assert run["resumed_e4"]["train_losses"] == run["e4"]["train_losses"]
    assert torch.equal(run["resumed_e4"]["rng"], run["e4"]["rng"])


def test_a_failed_background_write_is_raised_by_the_next_call_on_every_rank(run):
    errors = run["fail_errors"]
    assert len(errors) == 2
    for error in errors:  # wait_for_saves() raised on both ranks, naming the folder
        assert error is not None and error.startswith("CheckpointError")
        assert "fail.pth" in error
    assert not (run["out"] / "fail.pth").exists()


def test_a_non_finite_state_is_refused_on_every_rank_before_staging(run):
    error = run["nan_error"]
    assert error.startswith("NonFiniteStateError") and "model inp.weight" in error
    assert not (run["out"] / "nan.pth").exists()
    assert list_temp_files(run["out"], "nan.pth") == []  # nothing staged or written


def test_kill_9_during_a_background_save_keeps_the_previous_folder(tmp_path):
    kill_rank_one_during_save_of_k(command("kill", str(tmp_path)), tmp_path)


def test_clean_exit_with_a_background_save_pending_repeated(tmp_path):
    launches = 20 if os.environ.get("NNH_SOAK") == "1" else 2
    for i in range(launches):
        out = tmp_path / str(i)
        out.mkdir()
        launch("soak", str(out))  # return code 0, no "terminate called" in stderr
        assert (out / "exit.pth" / METADATA_NAME).is_file()  # finished before the teardown
        assert sorted(p.name for p in out.glob("ep?.pth")) == ["ep2.pth"]  # overwrite=True
        assert list_temp_files(out) == []
