"""NNHandler(..., ensemble_size=E): members train as if alone, outputs, histories,
checkpoints and exact resume."""

from __future__ import annotations

import pytest
import torch
from ensemble_models import EnsMLP
from torch import nn
from torch.utils.data import TensorDataset

from nnh import NNHandler
from nnh.callbacks import Callback
from nnh.checkpoint import CheckpointError, load_checkpoint

E = 3


def data(n=96, d_in=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, d_in, generator=g), torch.randint(0, 3, (n,), generator=g))


def accuracy(out, y):
    return (out.argmax(-1) == y).float().mean()


def configure(h, opt=(torch.optim.Adam, {"lr": 1e-2}), scheduler=None):
    h.set_optimizer(opt[0], **opt[1])
    if scheduler is not None:
        h.set_scheduler(scheduler[0], **scheduler[1])
    h.set_loss_fn(nn.functional.cross_entropy)
    h.add_metric("acc", accuracy)
    h.set_train_loader(data(), batch_size=16, shuffle=True)
    h.set_val_loader(data(48, seed=1), batch_size=16)


def solo_run(initial, train_kwargs, opt, scheduler=None, **model_kwargs):
    solo = NNHandler(EnsMLP, **model_kwargs)
    solo.module.load_state_dict(initial)
    configure(solo, opt, scheduler)
    solo.train(progress_bar=False, seed=7, **train_kwargs)
    return solo


def assert_members_match_solo(h, initial, train_kwargs, opt, scheduler=None, **model_kwargs):
    for i in range(E):
        solo = solo_run(initial[i], train_kwargs, opt, scheduler, **model_kwargs)
        inside = h.member(i).state_dict()
        for k, v in solo.module.state_dict().items():
            torch.testing.assert_close(inside[k], v, atol=1e-5, rtol=0, msg=f"member {i} {k}")
        if solo.state.ema is not None:
            for k, v in solo.state.ema.items():
                torch.testing.assert_close(h.state.ema[k][i], v, atol=1e-5, rtol=0)
        assert h.member_history.member(i).train_losses == pytest.approx(solo.train_losses, abs=1e-5)
        assert h.member_history.member(i).val_metrics["acc"] == pytest.approx(
            solo.val_metrics_history["acc"], abs=1e-6
        )


def test_goal_each_member_equals_training_it_alone_adam_3_epochs():
    torch.manual_seed(0)
    h = NNHandler(EnsMLP, ensemble_size=E)
    initial = [h.member(i).state_dict() for i in range(E)]
    assert not torch.equal(initial[0]["net.0.weight"], initial[1]["net.0.weight"])
    opt = (torch.optim.Adam, {"lr": 1e-2})
    configure(h, opt)
    h.train(epochs=3, progress_bar=False, seed=7)
    assert_members_match_solo(h, initial, {"epochs": 3}, opt)
    per_member = torch.tensor(h.member_history.train_losses, dtype=torch.float64)
    assert per_member.shape == (3, E)
    assert h.train_losses == pytest.approx(per_member.mean(1).tolist(), abs=1e-12)
    assert h.train_metrics_history["acc"] == pytest.approx(
        torch.tensor(h.member_history.train_metrics["acc"], dtype=torch.float64).mean(1).tolist(), abs=1e-12
    )


def test_options_accumulation_clipping_ema_scheduler_batchnorm_per_member():
    torch.manual_seed(1)
    h = NNHandler(EnsMLP, ensemble_size=E, batchnorm=True, hidden=16)
    initial = [h.member(i).state_dict() for i in range(E)]
    opt = (torch.optim.SGD, {"lr": 0.2, "momentum": 0.9})
    sched = (torch.optim.lr_scheduler.StepLR, {"step_size": 1, "gamma": 0.5})
    configure(h, opt, sched)
    kwargs = {
        "epochs": 2,
        "gradient_accumulation_steps": 2,
        "gradient_clipping_norm": 0.3,
        "ema_decay": 0.8,
    }
    h.train(progress_bar=False, seed=7, **kwargs)
    stats = h.module.get_buffer("net.1.running_mean")
    assert not torch.allclose(stats[0], stats[1])  # each member keeps its own statistics
    assert_members_match_solo(h, initial, kwargs, opt, sched, batchnorm=True, hidden=16)


def test_outputs_have_a_leading_member_dimension():
    torch.manual_seed(0)
    h = NNHandler(EnsMLP, ensemble_size=E, hidden=8)
    configure(h)
    x = torch.randn(5, 20)
    out = h(x)
    assert out.shape == (E, 5, 3)
    for i in range(E):
        torch.testing.assert_close(out[i], h.member(i)(x))
    preds = h.predict(data(40))
    assert [p.shape for p in preds] == [(E, 40, 3)]
    assert isinstance(h.member(0), EnsMLP) and h.ensemble_size == E


def test_amp_trains_members_with_bfloat16_matmuls():
    def run(use_amp):
        torch.manual_seed(0)
        h = NNHandler(EnsMLP, ensemble_size=E, hidden=8)
        configure(h)
        h.train(epochs=1, use_amp=use_amp, progress_bar=False)
        return h

    amp, full = run("bf16"), run(False)
    assert amp.member_history.train_losses[0] != full.member_history.train_losses[0]
    assert amp.train_losses[0] == pytest.approx(full.train_losses[0], abs=2e-2)
    x = torch.randn(6, 20)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside, alone = amp(x), amp.member(1)(x)
    torch.testing.assert_close(inside[1].float(), alone.float(), atol=2e-2, rtol=2e-2)
    assert (inside.float() - amp(x)).abs().max() > 1e-4  # bf16 rounding is visible


def test_bad_ensemble_arguments_are_refused_by_name():
    with pytest.raises(ValueError, match="ensemble_size must be an int >= 1"):
        NNHandler(EnsMLP, ensemble_size=0)
    h = NNHandler(EnsMLP, ensemble_size=2, hidden=4)
    with pytest.raises(TypeError, match="LBFGS"):
        h.set_optimizer(torch.optim.LBFGS, lr=0.1)
    with pytest.raises(TypeError, match="Adafactor cannot train an ensemble"):
        h.set_optimizer(torch.optim.Adafactor, lr=0.1)
    with pytest.raises(IndexError, match="out of range for an ensemble of 2"):
        h.member(2)
    with pytest.raises(RuntimeError, match="needs an ensemble"):
        NNHandler(EnsMLP, hidden=4).member(0)


def _state(h):
    return {
        "model": {k: v.clone() for k, v in h.module.state_dict().items()},
        "optimizer": h.optimizer.state_dict(),
        "history": h.history.state_dict(),
        "members": h.member_history.state_dict(),
        "rng": torch.get_rng_state(),
    }


def _assert_bitwise(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b) and a.dtype == b.dtype, where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            _assert_bitwise(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_bitwise(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} != {b!r}"


def _fresh(seed=3):
    torch.manual_seed(seed)
    h = NNHandler(EnsMLP, ensemble_size=E, hidden=16, dropout=0.2, batchnorm=True)
    configure(h)
    return h


class Interrupt(Callback):
    def __init__(self, at: int):
        super().__init__()
        self.at, self.seen = at, 0

    def on_train_batch_end(self, batch_idx, logs=None):
        self.seen += 1
        if self.seen == self.at:
            raise KeyboardInterrupt


def test_checkpoint_records_the_ensemble_and_resumes_bitwise(tmp_path):
    straight = _fresh()
    straight.train(epochs=2, ema_decay=0.9, progress_bar=False)
    expected = _state(straight)

    h = _fresh()
    h.train(epochs=1, ema_decay=0.9, progress_bar=False)
    path = tmp_path / "ens.pth"
    h.save(str(path))
    payload = load_checkpoint(str(path))
    assert payload["ensemble"]["size"] == E
    assert payload["model_state_dict"]["net.0.weight"].shape == (E, 16, 20)
    g = NNHandler.load(str(path))
    assert g.ensemble_size == E and g.member_history.train_losses == h.member_history.train_losses
    g.train(epochs=1, ema_decay=0.9, progress_bar=False)
    _assert_bitwise(_state(g), expected, "epoch checkpoint")

    # a mid-epoch step checkpoint, the run interrupted after it, resumed in a new handler
    h = _fresh()
    h.auto_save(None, save_path=str(tmp_path), name="run", every_n_steps=4)
    h.add_callback(Interrupt(at=6 + 4))
    with pytest.raises(KeyboardInterrupt):
        h.train(epochs=2, ema_decay=0.9, progress_bar=False)
    step_files = sorted(tmp_path.glob("*step*"))
    assert step_files, list(tmp_path.iterdir())
    g = NNHandler.load(str(step_files[-1]), skip_callbacks=True)
    g.resume_training()
    _assert_bitwise(_state(g), expected, "step checkpoint")


def test_damaged_ensemble_section_is_refused(tmp_path):
    from nnh.checkpoint import save_checkpoint

    h = NNHandler(EnsMLP, ensemble_size=2, hidden=4)
    path = tmp_path / "e.pth"
    h.save(str(path))
    payload = load_checkpoint(str(path))
    payload["ensemble"]["size"] = 0
    for key in ("integrity", "nnh_format", "versions"):
        del payload[key]
    save_checkpoint(payload, str(path))  # a validly sealed file with a bad section
    with pytest.raises(CheckpointError, match="'ensemble' is damaged"):
        NNHandler.load(str(path))


def test_autosaver_writes_ensemble_checkpoints_each_epoch(tmp_path):
    torch.manual_seed(0)
    h = NNHandler(EnsMLP, ensemble_size=E, hidden=8)
    configure(h)
    h.auto_save(1, save_path=str(tmp_path), name="ens_{epoch:02d}", overwrite=True)
    h.train(epochs=2, progress_bar=False)
    assert sorted(p.name for p in tmp_path.glob("*.pth")) == ["ens_02.pth"]  # the first rotated
    g = NNHandler.load(str(tmp_path / "ens_02.pth"))
    assert g.ensemble_size == E and g.state.epoch == 2
    for k, v in h.module.state_dict().items():
        assert torch.equal(g.module.state_dict()[k], v)


def test_compile_model_is_refused_for_ensembles_with_a_clear_error():
    h = NNHandler(EnsMLP, ensemble_size=2, hidden=4)
    with pytest.raises(RuntimeError, match="compile_model does not support ensembles"):
        h.compile_model(backend="eager")


def test_a_loss_that_is_not_a_scalar_per_member_is_named():
    h = NNHandler(EnsMLP, ensemble_size=2, hidden=4)
    configure(h)
    h.set_loss_fn(nn.functional.cross_entropy, reduction="none")
    with pytest.raises(TypeError, match=r"scalar tensor for each member .* got shape \(16,\)"):
        h.train(epochs=1, progress_bar=False)
