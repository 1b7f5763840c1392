"""Save safety: a failed write gives its space back at once, only finite states are written
(hyper-parameters, accumulated gradients and the loss scaler included), a refused newer
snapshot never costs the queued good one, and the ownership check and the rename are one
atomic step with respect to other nnh writers."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
import threading
import warnings
from pathlib import Path

import attrs
import pytest
import torch
from models import MLP, classification_data
from tensordict import TensorDict
from torch import nn

from nnh import NNHandler
from nnh.checkpoint import CheckpointError, list_temp_files, load_checkpoint, save_checkpoint
from nnh.checkpoint.background import BackgroundWriter
from nnh.checkpoint.ownership import read_run_id
from nnh.handler.saving import NonFiniteStateError, submit_checkpoint, write_step_checkpoint

PY = sys.executable
SRC = str(Path(__file__).resolve().parents[1] / "src")
ENV = {**os.environ, "PYTHONPATH": SRC + os.pathsep + str(Path(__file__).parent), "OMP_NUM_THREADS": "1"}


def linear(size: int) -> NNHandler:
    return NNHandler(nn.Linear, in_features=size, out_features=size, model_type="regression")


def open_deleted_files(folder: Path) -> list[str]:
    """Files under ``folder`` this process still holds open although they were removed."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(folder)) and target.endswith("(deleted)"):
            found.append(target)
    return found


# ----------------------------------------------------------------- 1. a failed write's space


def test_a_full_disk_error_gives_the_space_back_at_once(tiny_disk):
    path = tiny_disk / "model.pth"
    with pytest.raises(CheckpointError, match="no space left on device") as info:
        linear(1024).save(str(path))  # 4 MiB: does not fit
    assert info.value.kind == "disk_full"
    # the error (and its traceback) is still alive: the space must be free all the same
    assert open_deleted_files(tiny_disk) == []
    assert list(tiny_disk.iterdir()) == []
    linear(300).save(str(path))  # 360 KiB: fits once the failed write is gone
    assert [p.name for p in tiny_disk.iterdir()] == ["model.pth"]
    del info


def test_a_full_disk_error_of_a_background_save_gives_the_space_back_at_once(tiny_disk):
    path = tiny_disk / "model.pth"
    big = linear(1024)
    handle = big.save(str(path), blocking=False)
    err = handle.exception(timeout=60)  # kept on the handle until the next call raises it
    assert isinstance(err, CheckpointError) and err.kind == "disk_full", err
    assert open_deleted_files(tiny_disk) == []
    assert list_temp_files(tiny_disk) == [] and list(tiny_disk.iterdir()) == []
    small = linear(300)
    assert small.save(str(path), blocking=False).result(timeout=60) == path
    with pytest.raises(CheckpointError, match="no space left on device"):
        big.wait_for_saves()
    assert [p.name for p in tiny_disk.iterdir()] == ["model.pth"]


def test_a_file_size_limit_error_closes_and_removes_the_temporary_file(tmp_path):
    code = textwrap.dedent(
        f"""
        import os, resource
        from pathlib import Path
        from torch import nn
        from nnh import NNHandler
        from nnh.checkpoint import CheckpointError
        from test_save_safety import open_deleted_files
        folder = Path({str(tmp_path)!r})
        resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        for blocking in (True, False):
            h = NNHandler(nn.Linear, in_features=1024, out_features=1024, model_type="regression")
            try:
                if blocking:
                    h.save(str(folder / "model.pth"))
                    err = None
                else:
                    err = h.save(str(folder / "model.pth"), blocking=False).exception(timeout=60)
            except CheckpointError as caught:
                err = caught
            print(err.kind, sorted(os.listdir(folder)), open_deleted_files(folder))
        """
    )
    out = subprocess.run([PY, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert out.stdout.splitlines() == ["file_too_large [] []"] * 2, out.stdout + out.stderr


# ----------------------------------------------------------------- 2. finite everywhere


def trained(tmp_path: Path) -> NNHandler:
    torch.manual_seed(0)
    h = NNHandler(MLP, model_type="classification")
    h.set_optimizer(torch.optim.Adam, lr=1e-2)
    h.set_loss_fn(nn.functional.cross_entropy)
    h.set_train_loader(classification_data(64), batch_size=16, shuffle=False)
    h.train(1, progress_bar=False)
    return h


@pytest.mark.parametrize("blocking", [True, False])
@pytest.mark.parametrize(
    ("key", "value"),
    [("lr", float("nan")), ("betas", (0.9, float("nan"))), ("eps", float("inf")),
     ("weight_decay", float("-inf"))],
)  # fmt: skip
def test_a_non_finite_hyper_parameter_refuses_the_save(tmp_path, key, value, blocking):
    h = trained(tmp_path)
    path = tmp_path / "run.pth"
    h.save(str(path))
    before = path.read_bytes()
    h.optimizer.param_groups[0][key] = value
    if blocking:
        with pytest.raises(NonFiniteStateError, match=f"optimizer {key}") as info:
            h.save(str(path))
    else:
        err = h.save(str(path), blocking=False).exception(timeout=60)
        assert isinstance(err, NonFiniteStateError) and f"optimizer {key}" in str(err)
        with pytest.raises(NonFiniteStateError) as info:
            h.wait_for_saves()
    assert info.value.kind == "non_finite" and str(path) in str(info.value)
    assert path.read_bytes() == before


def test_a_tensor_learning_rate_is_checked_too(tmp_path):
    h = trained(tmp_path)
    h.optimizer.param_groups[0]["lr"] = torch.tensor(float("nan"))
    with pytest.raises(NonFiniteStateError, match="optimizer lr"):
        h.save(str(tmp_path / "run.pth"))


@pytest.mark.parametrize("background", [False, True])
def test_a_step_checkpoint_with_non_finite_accumulated_gradients_is_not_written(
    tmp_path, background
):
    torch.manual_seed(0)
    h = NNHandler(MLP, model_type="classification")
    h.set_optimizer(torch.optim.SGD, lr=1e-2)
    h.set_loss_fn(nn.functional.cross_entropy)
    h.set_train_loader(classification_data(64), batch_size=16, shuffle=False)
    h.auto_save(None, save_path=str(tmp_path), name="run", every_n_steps=1, async_save=background)
    calls = []

    def poison_second_batch(grad):
        calls.append(1)
        return grad * float("nan") if len(calls) == 2 else grad

    next(h.module.parameters()).register_hook(poison_second_batch)
    # one window of 4 micro-batches: the loss stays finite, the gradients go NaN at batch 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with contextlib.suppress(FloatingPointError):
            h.train(1, gradient_accumulation_steps=4, progress_bar=False)
    step_file = h.auto_saver.step_path()
    saved = load_checkpoint(step_file)
    assert saved["resume"]["batch_offset"] == 1  # the only state with finite gradients
    assert torch.isfinite(torch.stack([g.sum() for g in saved["train_state"]["grads"].values()])).all()
    assert any("accumulated gradient of" in str(w.message) for w in caught), [str(w.message) for w in caught]


@pytest.mark.parametrize("background", [False, True])
def test_a_non_finite_loss_scale_refuses_a_step_checkpoint(tmp_path, background):
    h = trained(tmp_path)
    path = tmp_path / "step.pth"
    h.save(str(path))
    before = path.read_bytes()
    scaler = TensorDict({"scale": torch.tensor(float("inf")), "growth_tracker": torch.zeros((), dtype=torch.int32)}, batch_size=[])
    h._state = attrs.evolve(h._state, scaler=scaler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        write_step_checkpoint(h, str(path), resume={"epoch": 1}, background=background)
        h.wait_for_saves()
    assert any("loss scaler scale" in str(w.message) for w in caught)
    assert path.read_bytes() == before


# ----------------------------------------------------------------- 3. a refused newer snapshot


@pytest.fixture
def gated_writer():
    """A background writer whose writes wait for ``gate`` (set it to let them go)."""
    gate, started = threading.Event(), []

    def gated_write(payload, path):
        started.append(path)
        assert gate.wait(timeout=60)
        save_checkpoint(payload, path)

    writer = BackgroundWriter(write=gated_write)
    yield writer, gate, started
    gate.set()
    writer.wait(timeout=60)


def wait_until(condition) -> None:
    for _ in range(6000):
        if condition():
            return
        threading.Event().wait(0.01)
    raise AssertionError("condition never became true")


@pytest.mark.parametrize("refused", [1, 2])
def test_a_refused_newer_snapshot_does_not_cost_the_queued_good_one(tmp_path, gated_writer, refused):
    writer, gate, started = gated_writer
    h = trained(tmp_path)
    h._saves = writer
    h.save(str(tmp_path / "other.pth"), blocking=False)  # the writer is busy with this one
    wait_until(lambda: started)
    good = h.save(str(tmp_path / "run.pth"), blocking=False)  # queued
    h.optimizer.param_groups[0]["lr"] = float("nan")
    bad = [h.save(str(tmp_path / "run.pth"), blocking=False) for _ in range(refused)]
    assert good.superseded and not good.done()
    gate.set()
    for handle in bad:  # the NaN snapshot is refused ...
        assert isinstance(handle.exception(timeout=60), NonFiniteStateError)
    assert good.result(timeout=60) == tmp_path / "run.pth"  # ... and the good one written
    assert not good.superseded
    saved = load_checkpoint(tmp_path / "run.pth")
    assert saved["optimizer"]["state_dict"]["param_groups"][0]["lr"] == 1e-2
    with pytest.raises(NonFiniteStateError, match="optimizer lr"):
        h.wait_for_saves()
    h.wait_for_saves()  # reported once
    assert started == [tmp_path / "other.pth", tmp_path / "run.pth"]


def test_a_good_newer_snapshot_still_supersedes_the_queued_one(tmp_path, gated_writer):
    writer, gate, started = gated_writer
    h = trained(tmp_path)
    h._saves = writer
    h.save(str(tmp_path / "other.pth"), blocking=False)
    wait_until(lambda: started)
    first = h.save(str(tmp_path / "run.pth"), blocking=False)
    h.optimizer.param_groups[0]["lr"] = 0.5
    second = h.save(str(tmp_path / "run.pth"), blocking=False)
    gate.set()
    assert first.superseded and first.result(timeout=60) == second.result(timeout=60)
    h.wait_for_saves()
    assert load_checkpoint(tmp_path / "run.pth")["optimizer"]["state_dict"]["param_groups"][0]["lr"] == 0.5
    assert len(started) == 2  # the superseded snapshot was never written


def test_a_failed_write_of_the_newer_snapshot_is_reported_once(tmp_path, gated_writer):
    writer, gate, started = gated_writer
    writer.submit({"w": torch.ones(1)}, tmp_path / "other.pth")
    wait_until(lambda: started)
    target = tmp_path / "a_file" / "x.pth"
    (tmp_path / "a_file").write_text("a file where a folder should be")
    first = writer.submit({"w": torch.ones(1)}, target)
    second = writer.submit({"w": torch.ones(1)}, target)
    gate.set()
    assert first.exception(timeout=60) is second.exception(timeout=60) is not None
    assert len(writer.wait(timeout=60)) == 1


# ----------------------------------------------------------------- 4. ownership at the rename


@pytest.mark.parametrize("trial", range(4))
def test_two_runs_saving_to_one_name_never_replace_each_other(tmp_path, monkeypatch, trial):
    monkeypatch.chdir(tmp_path)  # a folder under the working folder: guarded saves may write
    gate, started = threading.Event(), []

    def gated_write(payload, path):
        started.append(path)
        assert gate.wait(timeout=60)
        save_checkpoint(payload, path)

    runs = [linear(64), linear(64)]
    outcomes = []
    for index, h in enumerate(runs):  # each writer busy: both guarded saves pass the call's check
        h._saves = BackgroundWriter(write=gated_write)
        h.save(f"busy-{index}.pth", blocking=False)
        wait_until(lambda index=index: len(started) > index)
    for h in runs:
        outcomes.append(submit_checkpoint(h, "run.pth", guard_replace=True))
    gate.set()
    errors = [handle.exception(timeout=60) for handle in outcomes]
    winners = [h for h, err in zip(runs, errors, strict=True) if err is None]
    losers = [err for err in errors if err is not None]
    assert len(winners) == 1 and len(losers) == 1, errors
    assert losers[0].kind == "not_owned" and "run.pth" in str(losers[0])
    assert read_run_id(tmp_path / "run.pth") == winners[0]._run_id
    assert list_temp_files(tmp_path) == [] and list(tmp_path.glob(".*.lock")) == []
    with pytest.raises(CheckpointError, match="not written by this run"):
        for h in runs:
            h.wait_for_saves()


RACER = """
import sys, os, time
from pathlib import Path
from torch import nn
from nnh import NNHandler
from nnh.checkpoint import CheckpointError
from nnh.handler.saving import write_checkpoint, submit_checkpoint
me, other, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
h = NNHandler(nn.Linear, in_features=256, out_features=256, model_type="regression")
print("run", h._run_id, flush=True)

def barrier(name):
    Path(f"ready-{name}-{me}").touch()
    while not Path(f"ready-{name}-{other}").exists():
        time.sleep(0.001)

def save(name, background):
    try:
        if background:
            err = submit_checkpoint(h, name, guard_replace=True).exception(timeout=60)
            if err is not None:
                raise err
        else:
            write_checkpoint(h, name, guard_replace=True)
        print("ok", name, flush=True)
    except CheckpointError as err:
        print(err.kind, name, flush=True)

for i in range(rounds):
    barrier(i)
    save(f"r{i}.pth", background=i % 2 == 1)
barrier("same")
for j in range(rounds):
    save("same.pth", background=j % 2 == 1)
"""


def test_two_processes_saving_to_one_name_never_replace_each_other(tmp_path):
    script = tmp_path / "racer.py"
    script.write_text(RACER)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    rounds = 12
    procs = [
        subprocess.Popen([PY, str(script), me, other, str(rounds)], cwd=folder, env=ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for me, other in (("a", "b"), ("b", "a"))
    ]  # fmt: skip
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    runs, wins = [], []
    for out, _ in outs:
        lines = [line.split() for line in out.splitlines()]
        runs.append(lines[0][1])
        wins.append({name for kind, name in lines[1:] if kind == "ok"})
        assert {kind for kind, _ in lines[1:]} <= {"ok", "not_owned"}, out
    for name in [f"r{i}.pth" for i in range(rounds)] + ["same.pth"]:
        owners = [run for run, won in zip(runs, wins, strict=True) if name in won]
        assert len(owners) == 1, (name, owners)  # the other process never replaced it
        assert read_run_id(folder / name) == owners[0]
    assert list_temp_files(folder) == [] and list(folder.glob(".*.lock")) == []
