"""Checkpoints through NNHandler: save/load, skip flags, initialize_from_checkpoint,
AutoSaver, ModelCheckpoint, safety."""

from __future__ import annotations

import math
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
from models import MLP, BatchLog, Regressor, accuracy, classification_data
from torch import nn

from nnh import NNHandler
from nnh.callbacks.model_checkpoint import ModelCheckpoint
from nnh.checkpoint import CheckpointError, load_checkpoint


def trained(tmp_path=None, epochs=2, **train_kw) -> NNHandler:
    torch.manual_seed(0)
    h = NNHandler(MLP, hidden=12)
    h.set_optimizer(torch.optim.Adam, lr=1e-2)
    h.set_scheduler(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5)
    h.set_loss_fn(nn.functional.cross_entropy)
    h.set_train_loader(classification_data(), batch_size=16, shuffle=True)
    h.set_val_loader(classification_data(30, seed=1), batch_size=10)
    h.add_metric("acc", accuracy)
    h.add_callback(BatchLog())
    h.train(epochs=epochs, ema_decay=0.9, progress_bar=False, **train_kw)
    return h


def same_params(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_save_load_restores_everything(tmp_path):
    h = trained()
    path = tmp_path / "full.pth"
    h.save(str(path))
    torch.load(path, weights_only=True)  # plain data only
    g = NNHandler.load(str(path))
    assert type(g.module) is MLP and g.module.net[0].out_features == 12 and same_params(h.module, g.module)
    assert isinstance(g.optimizer, torch.optim.Adam)
    assert_opt_equal(h.optimizer.state_dict(), g.optimizer.state_dict())
    assert g.scheduler.state_dict()["last_epoch"] == 2 and g.optimizer.param_groups[0]["lr"] == pytest.approx(2.5e-3)
    assert g.train_losses == h.train_losses and g.val_metrics_history == h.val_metrics_history
    assert g.loss_fn is nn.functional.cross_entropy and set(g.metrics) == {"acc"}
    assert [type(c) for c in g.callbacks] == [BatchLog] and g.callbacks[0].sums == h.callbacks[0].sums
    assert all(torch.equal(h.state.ema[k], g.state.ema[k]) for k in h.state.ema.keys())
    assert g.state.epoch == 2 and g.state.step == h.state.step
    assert len(g.train_loader.dataset) == 120  # TensorDataset embedded
    g.train(epochs=1, ema_decay=0.9, progress_bar=False)
    assert len(g.train_losses) == 3


def assert_opt_equal(a, b):
    assert a["param_groups"] == b["param_groups"]
    for k in a["state"]:
        for key, v in a["state"][k].items():
            assert torch.equal(v, b["state"][k][key])


@pytest.mark.parametrize(
    "flag",
    ["skip_optimizer", "skip_scheduler", "skip_history", "skip_callbacks", "skip_ema"],
)
def test_every_skip_flag_skips_exactly_its_part(tmp_path, flag):
    h = trained()
    path = tmp_path / "c.pth"
    h.save(str(path))
    g = NNHandler.load(str(path), **{flag: True})
    assert same_params(h.module, g.module)
    opt_state_loaded = len(g.optimizer.state_dict()["state"]) > 0
    assert opt_state_loaded == (flag != "skip_optimizer")
    assert (g.scheduler is not None and g.scheduler.last_epoch == 2) == (flag != "skip_scheduler")
    assert (g.train_losses == h.train_losses) == (flag != "skip_history")
    assert (len(g.callbacks) == 1) == (flag != "skip_callbacks")
    assert (g.state.ema is not None) == (flag != "skip_ema")


def test_skip_sampler_sde(tmp_path):
    from nnh.generative import VPSDE

    h = NNHandler(Regressor, model_type="regression")
    h.set_sde(VPSDE, beta_min=0.2, beta_max=10.0, T=2.0)
    h.save(str(tmp_path / "s.pth"))
    g = NNHandler.load(str(tmp_path / "s.pth"))
    assert isinstance(g.sde, VPSDE) and g.sde.T == 2.0 and g.sde.config() == h.sde.config()
    assert NNHandler.load(str(tmp_path / "s.pth"), skip_sampler_sde=True).sde is None


def test_initialize_from_checkpoint_bare_state_dict_full_checkpoint_and_wrapped_keys(tmp_path):
    h = trained()
    full, bare, ddp_keys = tmp_path / "full.pth", tmp_path / "bare.pth", tmp_path / "ddp.pth"
    h.save(str(full))
    torch.save(h.module.state_dict(), bare)
    torch.save({f"module._orig_mod.{k}": v for k, v in h.module.state_dict().items()}, ddp_keys)
    for path in (full, bare, ddp_keys):
        g = NNHandler.initialize_from_checkpoint(str(path), MLP, hidden=12)
        assert same_params(h.module, g.module) and g.optimizer is None and g.train_losses == []
    with pytest.raises(CheckpointError, match=r"net\.0\.weight.*\[12, 8\].*\[5, 8\]"):
        NNHandler.initialize_from_checkpoint(str(bare), MLP, hidden=5)


def test_compiled_model_saves_plain_keys_and_loads(tmp_path):
    h = trained()
    h.compile_model(backend="eager")
    h.save(str(tmp_path / "c.pth"))
    payload = load_checkpoint(tmp_path / "c.pth")
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in payload["model_state_dict"])
    g = NNHandler.load(str(tmp_path / "c.pth"))
    assert g.model is not g.module and same_params(h.module, g.module)


def test_lambda_loss_and_metric_warn_on_save_and_load_asks_to_set_again(tmp_path):
    h = NNHandler(Regressor, model_type="regression")
    h.set_optimizer(torch.optim.SGD, lr=0.1)
    h.set_loss_fn(lambda out, y: ((out - y) ** 2).mean())
    h.add_metric("mae", lambda out, y: (out - y).abs().mean())
    with pytest.warns(UserWarning, match="loss function .* cannot be saved by import path"):
        h.save(str(tmp_path / "l.pth"))
    with pytest.warns(UserWarning, match="set it again"):
        g = NNHandler.load(str(tmp_path / "l.pth"))
    assert g.loss_fn is None and g.metrics == {}
    with pytest.raises(RuntimeError, match="set_loss_fn"):
        g.set_train_loader(classification_data(8, d=4), batch_size=4)
        g.train(epochs=1)


def test_autosaver_intervals_names_and_overwrite(tmp_path):
    h = trained(epochs=0)
    h.auto_save(2, save_path=str(tmp_path / "a"), name="m{epoch}_{val_acc:.2f}")
    h.train(epochs=5, progress_bar=False)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    acc = h.val_metrics_history["acc"]
    assert names == sorted(f"m{e}_{acc[e - 1]:.2f}.pth" for e in (2, 4, 5))  # 5: save_on_last_epoch

    h.auto_save(-1, save_path=str(tmp_path / "b"), name="last{epoch}")
    h.train(epochs=3, progress_bar=False)
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["last8.pth"]

    h.auto_save(1, save_path=str(tmp_path / "c"), name="ov{epoch}", overwrite=True)
    h.train(epochs=3, progress_bar=False)
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["ov11.pth"]
    assert h.save_interval == 1 and h.overwrite_last_saved and h.save_model_name == "ov{epoch}"

    for interval in (0, None):
        h.auto_save(interval, save_path=str(tmp_path / "d"))
        h.train(epochs=1, progress_bar=False)
        assert not (tmp_path / "d").exists()
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['accuracy'\]"):
        h.auto_save(1, name="m_{accuracy}")


def test_save_on_last_epoch_false_does_not_save_extra(tmp_path):
    h = trained(epochs=0)
    h.auto_save(2, save_path=str(tmp_path), name="e{epoch}")
    h.train(epochs=3, save_on_last_epoch=False, progress_bar=False)
    assert [p.name for p in tmp_path.iterdir()] == ["e2.pth"]


def test_model_checkpoint_keeps_best_and_every_n(tmp_path):
    h = trained(epochs=0)
    h.add_callback(ModelCheckpoint(str(tmp_path / "best"), filename="b{epoch}", monitor="val_acc", mode="max"))
    h.add_callback(ModelCheckpoint(str(tmp_path / "every"), filename="e{epoch}", monitor=None, every_n_epochs=2))
    h.train(epochs=4, progress_bar=False)
    best_epoch = max(range(4), key=lambda i: (h.val_metrics_history["acc"][i], -i)) + 1
    assert [p.name for p in (tmp_path / "best").iterdir()] == [f"b{best_epoch}.pth"]
    assert sorted(p.name for p in (tmp_path / "every").iterdir()) == ["e2.pth", "e4.pth"]
    g = NNHandler.load(str(tmp_path / "best" / f"b{best_epoch}.pth"))
    assert len(g.train_losses) == best_epoch


def test_save_model_code_needs_opt_in_to_run_stored_code(tmp_path):
    module_dir = tmp_path / "userpkg"
    module_dir.mkdir()
    (module_dir / "gone_model.py").write_text(textwrap.dedent('''
        import torch
        from torch import nn

        class GoneNet(nn.Module):
            def __init__(self, width=3):
                super().__init__()
                self.lin = nn.Linear(2, width)

            def forward(self, x):
                return torch.relu(self.lin(x))
    '''))
    save = textwrap.dedent(f'''
        import sys; sys.path.insert(0, {str(module_dir)!r})
        import torch
        from gone_model import GoneNet
        from nnh import NNHandler
        torch.manual_seed(0)
        h = NNHandler(GoneNet, save_model_code=True, model_type="regression", width=4)
        h.save({str(tmp_path / "code.pth")!r})
        torch.save(h.module.state_dict(), {str(tmp_path / "ref.pth")!r})
    ''')
    subprocess.run([sys.executable, "-c", save], check=True)
    with pytest.raises(CheckpointError, match="trust"):
        NNHandler.load(str(tmp_path / "code.pth"))
    g = NNHandler.load(str(tmp_path / "code.pth"), trust_model_code=True)
    ref = torch.load(tmp_path / "ref.pth", weights_only=True)
    assert type(g.module).__name__ == "GoneNet" and g.module.lin.out_features == 4
    assert all(torch.equal(ref[k], v) for k, v in g.module.state_dict().items())


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_planted_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as f:
        pickle.dump({"model_state_dict": Payload(str(marker))}, f)
    torch.save({"x": Payload(str(marker))}, tmp_path / "evil2.pth")
    marker.unlink(missing_ok=True)
    for path in (evil, tmp_path / "evil2.pth"):
        with pytest.raises(CheckpointError, match=str(path.name)):
            NNHandler.load(str(path))
    assert not marker.exists()


def test_corrupt_truncated_and_foreign_files_name_the_file(tmp_path):
    h = trained(epochs=1)
    good = tmp_path / "good.pth"
    h.save(str(good))
    data = good.read_bytes()
    (tmp_path / "trunc.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "foreign.pth")
    for name in ("trunc.pth", "junk.pth", "foreign.pth", "missing.pth"):
        with pytest.raises(CheckpointError, match=name):
            NNHandler.load(str(tmp_path / name))


def test_seed_usage_examples_run_as_written(tmp_path, monkeypatch):
    """The three examples of the loading-module document, adapted to ``from nnh import``."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    h = trained(epochs=1)
    h.save("models/my_model_checkpoint.pth")
    h.save("models/pretrained_model.pth")

    # Loading a complete handler state
    loaded_handler = NNHandler.load(path="models/my_model_checkpoint.pth",
                                    device="cuda" if torch.cuda.is_available() else "cpu")
    loaded_handler.train(epochs=2, progress_bar=False)
    assert len(loaded_handler.train_losses) == 3

    # Loading only model weights for inference
    torch.save(h.module.state_dict(), "models/pretrained_weights.pth")
    inference_handler = NNHandler.initialize_from_checkpoint(
        checkpoint_path="models/pretrained_weights.pth", model_class=MLP,
        device="cuda" if torch.cuda.is_available() else "cpu", d_in=8, hidden=12, n_classes=3)
    inference_handler.eval()
    test_input = torch.randn(1, 8).to(inference_handler.device)
    with torch.no_grad():
        prediction = inference_handler.model(test_input).argmax(dim=1).item()
    assert prediction in (0, 1, 2)

    # Selective loading for fine-tuning
    fine_tune_handler = NNHandler.load(path="models/pretrained_model.pth",
                                       device="cuda" if torch.cuda.is_available() else "cpu",
                                       skip_optimizer=True, skip_scheduler=True)
    fine_tune_handler.set_optimizer(optimizer_class=torch.optim.Adam, lr=1e-5)
    fine_tune_handler.set_scheduler(scheduler_class=torch.optim.lr_scheduler.ReduceLROnPlateau,
                                    mode="min", factor=0.5, patience=5)
    fine_tune_handler.train(epochs=2, progress_bar=False)
    assert fine_tune_handler.optimizer.param_groups[0]["lr"] == pytest.approx(1e-5)
    assert not math.isnan(fine_tune_handler.val_losses[-1])
