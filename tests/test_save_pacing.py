"""Background saves on a busy machine (issue 21): while the writer thread has no core of its
own, automatic saves inside train() are written inline, as blocking ones, and go back to the
background once cores are idle again (nnh.checkpoint.pacing). The cost itself is measured by
``benchmarks/bench_async_save.py --hog N``, never asserted here."""

from __future__ import annotations

import multiprocessing
import os
import threading

import pytest
import torch
from models import MLP, classification_data
from torch import nn

from nnh import NNHandler
from nnh.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from nnh.checkpoint.background import BackgroundWriter
from nnh.checkpoint.pacing import WritePacing, idle_core_seconds, thread_run_and_wait


class Ticks:
    """A fake /proc/stat reading: ``idle_cores`` idle since the previous reading."""

    def __init__(self, cores: int) -> None:
        self.cores, self.idle, self.total, self.idle_cores = cores, 0.0, 0.0, 0.0

    def __call__(self) -> tuple[float, float]:
        self.idle += 100.0 * self.idle_cores
        self.total += 100.0 * self.cores
        return self.idle, self.total


def forced_inline() -> WritePacing:
    pacing = WritePacing(read_idle=Ticks(2), cores=2)
    pacing.record_write(run_ns=1_000, wait_ns=5_000)
    return pacing


@pytest.mark.parametrize(
    ("run_ns", "wait_ns", "inline"),
    [(1000, 0, False), (1000, 400, False), (1000, 600, True), (1000, 5000, True), (0, 10, False)],
)
def test_a_writer_that_waited_for_a_core_switches_saves_inline(run_ns, wait_ns, inline):
    pacing = WritePacing(read_idle=Ticks(2), cores=2)
    assert pacing.background()  # the first save always tries the background
    pacing.record_write(run_ns=run_ns, wait_ns=wait_ns)
    assert pacing.inline is inline
    assert pacing.background() is not inline


def test_inline_saves_go_back_to_the_background_once_cores_are_idle():
    ticks = Ticks(2)
    pacing = WritePacing(read_idle=ticks, cores=2, spare_cores=0.75)
    pacing.record_write(run_ns=1_000, wait_ns=5_000)
    decisions = []
    for idle in (0.0, 0.5, 0.7, 1.0):  # idle cores between consecutive saves
        ticks.idle_cores = idle
        decisions.append(pacing.background())
    assert decisions == [False, False, False, True]
    assert (pacing.inline_writes, pacing.background_writes) == (3, 1)


def test_without_idle_readings_a_contended_writer_stays_inline():
    pacing = WritePacing(read_idle=lambda: None, cores=2)
    pacing.record_write(run_ns=1_000, wait_ns=5_000)
    assert pacing.background() is False  # contended: inline (no idle reading to go back)


def test_bad_thresholds_are_named():
    with pytest.raises(ValueError, match="contended and spare_cores"):
        WritePacing(contended=0)
    with pytest.raises(ValueError, match="contended and spare_cores"):
        WritePacing(spare_cores=float("nan"))


def test_an_inline_save_is_written_at_the_call_after_every_earlier_one(tmp_path):
    """The earlier background write of the same file is still held when the inline one is
    submitted: the inline write waits for it, so the newer state is the one left on disk."""
    gate = threading.Event()
    started = threading.Event()

    def held_write(payload, path):
        started.set()
        assert gate.wait(timeout=60)
        save_checkpoint(payload, path)

    writer = BackgroundWriter(write=held_write, pacing=WritePacing(read_idle=Ticks(2), cores=2))
    target = tmp_path / "c.pth"
    first = writer.submit({"w": torch.zeros(2)}, target, paced=True)
    assert not first.inline and started.wait(timeout=60)
    writer.pacing.record_write(run_ns=1_000, wait_ns=5_000)  # as a contended write would
    threading.Timer(0.2, gate.set).start()
    second = writer.submit({"w": torch.ones(2)}, target, paced=True)
    assert second.inline and second.done() and first.done()
    assert load_checkpoint(target)["w"].tolist() == [1.0, 1.0]
    assert writer.wait(timeout=60) == []


def test_an_unpaced_submission_always_goes_to_the_background(tmp_path):
    writer = BackgroundWriter(pacing=forced_inline())
    handle = writer.submit({"w": torch.ones(1)}, tmp_path / "c.pth")  # an explicit save
    assert not handle.inline
    assert handle.result(timeout=60) == tmp_path / "c.pth"


def test_an_inline_save_keeps_the_checks_and_reports_a_refusal(tmp_path):
    def finite(snapshot):
        if not torch.isfinite(snapshot["w"]).all():
            raise CheckpointError("non-finite w", kind="non_finite")

    writer = BackgroundWriter(pacing=forced_inline())
    handle = writer.submit({"w": torch.tensor([float("nan")])}, tmp_path / "c.pth", check=finite,
                           paced=True)  # fmt: skip
    assert handle.inline and isinstance(handle.exception(), CheckpointError)
    assert not (tmp_path / "c.pth").exists()
    assert [type(e) for e in writer.wait(timeout=10)] == [CheckpointError]


def test_async_auto_saves_under_pacing_equal_blocking_ones(tmp_path):
    """train() with async_save=True while the writer has no free core: the step files are
    written inline, hold the same state as blocking saves, and only background saves log
    'in the background'."""
    files = {}
    for mode in ("sync", "paced"):
        torch.manual_seed(0)
        log = tmp_path / f"{mode}.log"
        h = NNHandler(MLP, hidden=16, model_type="classification",
                      logger_mode=NNHandler.LoggingMode.FILE, logger_filename=str(log))  # fmt: skip
        h.set_optimizer(torch.optim.Adam, lr=1e-2)
        h.set_loss_fn(nn.functional.cross_entropy)
        h.set_train_loader(classification_data(256), batch_size=16, shuffle=True)
        if mode == "paced":
            h._saves = BackgroundWriter(pacing=forced_inline())
        h.auto_save(1, save_path=str(tmp_path / mode), name="e{epoch}", overwrite=True,
                    every_n_steps=5, async_save=(mode == "paced"))  # fmt: skip
        h.train(2, progress_bar=False)
        files[mode] = load_checkpoint(tmp_path / mode / "e2.pth")
        if mode == "paced":
            assert h._saves.pacing.inline_writes >= 3
            assert "in the background" not in log.read_text()
    for key, value in files["sync"]["model_state_dict"].items():
        assert torch.equal(files["paced"]["model_state_dict"][key], value), key


def _spin() -> None:
    while True:
        pass


def test_a_writer_competing_with_busy_cores_is_seen_waiting():
    """Real contention: twice as many busy loops as this process has cores. The writer's own
    run-queue wait (from the kernel) switches the next save inline."""
    if thread_run_and_wait() is None or idle_core_seconds() is None:
        pytest.fail("this Linux kernel reports no schedstat; pacing cannot work here")
    cores = len(os.sched_getaffinity(0))
    ctx = multiprocessing.get_context("fork")
    hogs = [ctx.Process(target=_spin, daemon=True) for _ in range(2 * cores)]
    for hog in hogs:
        hog.start()
    try:
        pacing = WritePacing()
        writer = BackgroundWriter(write=lambda payload, path: _busy(0.3), pacing=pacing)
        writer.submit({"w": torch.ones(1)}, "unused.pth", paced=True).result(timeout=120)
    finally:
        for hog in hogs:
            hog.kill()
            hog.join()
    assert pacing.inline


def _busy(cpu_seconds: float) -> None:
    """Spend ``cpu_seconds`` of this thread's CPU time (a write's serialisation)."""
    import time

    end = time.thread_time() + cpu_seconds
    while time.thread_time() < end:
        pass
