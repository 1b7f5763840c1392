"""Background saves inside train(): deferred copies, the step barrier, the change tripwire,
and the finite check on the writer thread."""

from __future__ import annotations

import threading
import time
import warnings

import pytest
import torch
from test_async_save import make_handler
from torch import nn

from nnh.callbacks import Callback
from nnh.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from nnh.checkpoint import background as bg
from nnh.checkpoint.background import BackgroundWriter, defer_spec
from nnh.handler.saving import NonFiniteStateError


@pytest.fixture
def slow_stager(monkeypatch):
    """Deferred copies start only after 0.3 s: long after training's next step would have
    changed the state, unless that step waits for them."""
    finish = bg._Copier.finish

    def late_finish(self, path):
        time.sleep(0.3)
        finish(self, path)

    monkeypatch.setattr(bg._Copier, "finish", late_finish)


def test_deferred_copies_are_made_later_and_the_optimizer_step_waits_for_them(tmp_path, slow_stager):
    w = nn.Parameter(torch.zeros(3))
    opt = torch.optim.Adam([w], lr=0.1)
    w.grad = torch.ones(3)
    opt.step()
    moment, weight = opt.state[w]["exp_avg"].clone(), w.detach().clone()
    writer = BackgroundWriter()
    assert writer.hold(opt)
    payload = {"model": {"w": w}, "optimizer": {"state": opt.state_dict()["state"]}}
    handle = writer.submit(payload, tmp_path / "c.pth", defer=defer_spec(("optimizer", "state")))
    assert writer._staging is not None and not writer._staging.done()  # copy still to come
    start = time.perf_counter()
    opt.step()  # waits for the copy, then changes the moments in place
    assert time.perf_counter() - start >= 0.2
    assert not torch.equal(opt.state[w]["exp_avg"], moment)
    saved = load_checkpoint(handle.result(timeout=30))
    assert torch.equal(saved["optimizer"]["state"][0]["exp_avg"], moment)
    assert torch.equal(saved["model"]["w"], weight)


def test_a_deferred_tensor_changed_by_anything_else_fails_the_save_and_keeps_the_old_file(
    tmp_path, slow_stager
):
    target = tmp_path / "c.pth"
    save_checkpoint({"ema": {"w": torch.zeros(2)}}, target)
    before = target.read_bytes()
    ema = torch.zeros(2)
    writer = BackgroundWriter()
    handle = writer.submit({"ema": {"w": ema}}, target, defer=defer_spec(("ema",)))
    ema.add_(1)  # not through an optimizer step: nothing waits for the copy
    with pytest.raises(CheckpointError) as info:
        handle.result(timeout=30)
    assert info.value.kind == "changed_while_saving"
    assert "/ema/w" in str(info.value) and str(target) in str(info.value)
    assert target.read_bytes() == before
    errors = writer.wait(timeout=30)  # also reported to the next call into the handler
    assert [e.kind for e in errors] == ["changed_while_saving"]


def test_async_step_checkpoints_hold_exactly_the_state_at_the_step(tmp_path, slow_stager):
    """Every step checkpoint's copies of the Adam moments and EMA weights are deferred and
    made 0.3 s late; the optimizer's next step waits, so each file equals a blocking one."""
    files = {}
    for mode in ("sync", "async"):
        h = make_handler()
        folder = tmp_path / mode
        h.auto_save(None, save_path=str(folder), name="run", every_n_steps=5,
                    async_save=(mode == "async"))  # fmt: skip
        h.train(1, progress_bar=False, ema_decay=0.9)
        files[mode] = load_checkpoint(next(folder.iterdir()))
        if mode == "async":  # the moments and EMA weights were copied by the stager
            assert h._saves._stager is not None
    sync, got = files["sync"], files["async"]
    assert sync["resume"]["batch_offset"] == 15
    for key in ("model_state_dict", "optimizer", "train_state", "resume"):
        assert repr(sync[key]) == repr(got[key]), key


def test_an_explicit_background_save_of_a_non_finite_state_fails_on_its_handle_and_next_call(
    tmp_path,
):
    h = make_handler()
    h.train(1, progress_bar=False)
    target = tmp_path / "m.pth"
    h.save(str(target))
    before = target.read_bytes()
    with torch.no_grad():
        h.module.net[0].bias[0] = float("nan")
    handle = h.save(str(target), blocking=False)  # the check runs on the writer thread
    with pytest.raises(NonFiniteStateError, match=r"model net\.0\.bias"):
        handle.result(timeout=30)
    assert target.read_bytes() == before
    with pytest.raises(NonFiniteStateError):
        h.save(str(tmp_path / "other.pth"))  # the next call raises it (and refuses its own)


def test_an_async_step_checkpoint_of_a_non_finite_state_warns_and_training_goes_on(tmp_path):
    h = make_handler()
    h.auto_save(None, save_path=str(tmp_path), name="run", every_n_steps=4, async_save=True)
    h.train(1, progress_bar=False)
    step_file = next(tmp_path.iterdir())
    before = step_file.read_bytes()

    class Poison(Callback):
        def on_train_batch_end(self, index, logs):
            if index == 1:  # before every step checkpoint of this epoch
                with torch.no_grad():
                    h.optimizer.state[h.module.net[0].weight]["exp_avg_sq"].fill_(float("inf"))

    h.add_callback(Poison())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        h.train(1, progress_bar=False)  # no error: the writer warned, the old file stayed
    messages = [str(w.message) for w in caught if "not finite" in str(w.message)]
    assert messages and "optimizer exp_avg_sq of net.0.weight" in messages[0]
    assert step_file.read_bytes() == before
    assert len(h.train_losses) == 2


def test_hold_registers_one_hook_per_optimizer_and_refuses_optimizers_without_hooks():
    w = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([w], lr=0.1)
    writer = BackgroundWriter()
    assert writer.hold(opt) and writer.hold(opt)
    assert len(opt._optimizer_step_pre_hooks) == 1

    class Plain:  # not a torch optimizer: its step cannot be made to wait
        def step(self):
            pass

    assert writer.hold(Plain()) is False


def test_a_stalled_copy_never_blocks_a_step_without_deferred_copies(tmp_path):
    """The pre-hook costs nothing when no copy is under way."""
    w = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([w], lr=0.1)
    writer = BackgroundWriter()
    writer.hold(opt)
    writer.submit({"w": w}, tmp_path / "a.pth").result(timeout=30)
    w.grad = torch.ones(1)
    done = threading.Event()
    threading.Thread(target=lambda: (opt.step(), done.set())).start()
    assert done.wait(5)
