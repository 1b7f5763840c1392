"""NNHandler through its public API: configuration, training, evaluation, utilities."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from models import MLP, AutoEncoder, Regressor, accuracy, classification_data, regression_data
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from nnh import Callback, NNHandler
from nnh.core import MetricError


def classifier(**kw) -> NNHandler:
    h = NNHandler(MLP, **kw)
    h.set_optimizer(torch.optim.Adam, lr=1e-2)
    h.set_loss_fn(nn.functional.cross_entropy)
    h.set_train_loader(classification_data(), batch_size=16, shuffle=True)
    h.set_val_loader(classification_data(37, seed=1), batch_size=10)
    return h


# -- construction ---------------------------------------------------------------------------


def test_model_kwargs_device_and_types():
    h = NNHandler(MLP, device="cpu", model_type="Regression", hidden=7)
    assert isinstance(h.module, MLP) and h.module.net[0].out_features == 7
    assert h.model is h.module and h.device == torch.device("cpu")
    assert h.model_type is NNHandler.ModelType.REGRESSION
    assert NNHandler.ModelType.from_string("score_based") is NNHandler.ModelType.SCORE_BASED
    with pytest.raises(ValueError, match="unknown model type 'clasification'"):
        NNHandler.ModelType.from_string("clasification")
    assert NNHandler.LoggingMode("file") is NNHandler.LoggingMode.FILE


def test_model_class_that_rejects_kwargs_is_named_before_any_work():
    with pytest.raises(TypeError, match=r"MLP cannot be built with keyword arguments \['widht'\]"):
        NNHandler(MLP, widht=3)


def test_logging_to_file_and_console(tmp_path, capsys):
    log = tmp_path / "run.log"
    h = classifier(logger_mode=NNHandler.LoggingMode.BOTH, logger_filename=str(log), logger_level=logging.DEBUG)
    h.train(epochs=1, progress_bar=False)
    text = log.read_text()
    assert "epoch 1: loss=" in text and "val_loss=" in text
    assert "epoch 1: loss=" in capsys.readouterr().err
    assert isinstance(h.logger, logging.Logger)
    assert NNHandler(MLP).logger is None


def test_errors_before_any_work():
    h = NNHandler(MLP)
    before = {k: v.clone() for k, v in h.module.state_dict().items()}
    with pytest.raises(RuntimeError, match="set_train_loader"):
        h.train(epochs=1)
    h.set_train_loader(classification_data(), batch_size=8)
    with pytest.raises(RuntimeError, match="set_optimizer"):
        h.train(epochs=1)
    h.set_optimizer(torch.optim.SGD, lr=0.1)
    with pytest.raises(RuntimeError, match="set_loss_fn"):
        h.train(epochs=1)
    assert h.train_losses == []
    assert all(torch.equal(before[k], v) for k, v in h.module.state_dict().items())
    with pytest.raises(TypeError, match="SGD does not accept the options"):
        h.set_optimizer(torch.optim.SGD, lr=0.1, betas=(0.9, 0.99))
    with pytest.raises(TypeError, match=r"torch\.optim\.Optimizer subclass"):
        h.set_optimizer("adam", lr=0.1)
    with pytest.raises(ValueError, match=r"ready DataLoader and DataLoader options"):
        h.set_train_loader(DataLoader(classification_data()), batch_size=3)


def test_failing_metric_is_named():
    h = classifier()
    h.add_metric("broken", lambda out, y: out.nope)
    with pytest.raises(MetricError, match="metric 'broken' failed"):
        h.train(epochs=1, progress_bar=False)
    with pytest.raises(ValueError, match="reserved"):
        h.add_metric("val_acc", accuracy)


# -- training -------------------------------------------------------------------------------


def test_train_continues_and_history_appends():
    h = classifier()
    h.add_metric("acc", accuracy)
    h.train(epochs=2, progress_bar=False)
    h.train(epochs=3, progress_bar=False)
    assert len(h.train_losses) == len(h.val_losses) == 5
    assert h.state.epoch == 5 and h.state.step == 5 * math.ceil(120 / 16)
    assert len(h.train_metrics_history["acc"]) == len(h.val_metrics_history["acc"]) == 5
    assert h.train_losses[-1] < h.train_losses[0]


def test_same_seed_same_run_and_equal_to_plain_loop():
    def handler_run():
        torch.manual_seed(0)
        h = NNHandler(MLP)
        h.set_optimizer(torch.optim.Adam, lr=1e-2)
        h.set_loss_fn(nn.functional.cross_entropy)
        h.set_train_loader(classification_data(), batch_size=16, shuffle=True)
        h.train(epochs=2, progress_bar=False)
        return h

    def plain_run():
        torch.manual_seed(0)
        model = MLP()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        loader = DataLoader(classification_data(), batch_size=16, shuffle=True)
        for _ in range(2):
            model.train()
            for x, y in loader:
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
        return model

    a, b, plain = handler_run(), handler_run(), plain_run()
    assert a.train_losses == b.train_losses
    for (name, p), q in zip(plain.state_dict().items(), a.module.state_dict().values()):
        assert torch.equal(p, q), name


def test_epoch_values_are_sample_weighted_means():
    h = NNHandler(Regressor, model_type="regression")
    h.set_optimizer(torch.optim.SGD, lr=0.0)  # weights fixed: the epoch loss is the dataset loss
    h.set_loss_fn(nn.functional.mse_loss)
    data = regression_data(50)
    h.set_train_loader(data, batch_size=7)
    h.set_val_loader(regression_data(23, seed=3), batch_size=5)
    h.add_metric("mae", lambda o, y: (o - y).abs().mean().item())  # a Python number works too
    h.train(epochs=1, progress_bar=False)
    with torch.no_grad():
        x, y = data.tensors
        expected = nn.functional.mse_loss(h.module(x), y).item()
        vx, vy = regression_data(23, seed=3).tensors
        expected_val_mae = (h.module(vx) - vy).abs().mean().item()
    assert h.train_losses[0] == pytest.approx(expected, rel=1e-6)
    assert h.val_metrics_history["mae"][0] == pytest.approx(expected_val_mae, rel=1e-6)


def test_loss_gets_epoch_and_fixed_kwargs():
    seen = []

    def loss(out, y, epoch, weight):
        seen.append((epoch, weight))
        return nn.functional.mse_loss(out, y) * weight

    h = NNHandler(Regressor, model_type="regression")
    h.set_optimizer(torch.optim.SGD, lr=0.01)
    h.set_loss_fn(loss, pass_epoch_to_loss=True, weight=2.0)
    h.set_train_loader(regression_data(10), batch_size=5)
    h.train(epochs=2, progress_bar=False)
    assert seen == [(0, 2.0), (0, 2.0), (1, 2.0), (1, 2.0)]
    assert h.pass_epoch_to_loss and h.loss_fn_kwargs == {"weight": 2.0}


def test_extra_batch_items_go_to_the_model_and_generative_uses_input_as_target():
    h = NNHandler(Regressor, model_type="regression")
    h.set_optimizer(torch.optim.SGD, lr=0.0)
    h.set_loss_fn(nn.functional.mse_loss)
    x, y = regression_data(8).tensors
    h.set_train_loader(TensorDataset(x, y, torch.full((8, 1), 3.0)), batch_size=8)
    h.train(epochs=1, progress_bar=False)
    with torch.no_grad():
        assert h.train_losses[0] == pytest.approx(nn.functional.mse_loss(h.module(x) * 3.0, y).item(), rel=1e-6)

    g = NNHandler(AutoEncoder, model_type=NNHandler.ModelType.GENERATIVE)
    g.set_optimizer(torch.optim.Adam, lr=1e-2)
    g.set_loss_fn(nn.functional.mse_loss)
    g.set_train_loader(TensorDataset(torch.randn(64, 6)), batch_size=16)
    g.train(epochs=5, progress_bar=False)
    assert g.train_losses[-1] < g.train_losses[0]


def test_schedulers_step_per_epoch_and_plateau_gets_val_loss():
    h = classifier()
    h.set_scheduler(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5)
    h.train(epochs=3, progress_bar=False)
    assert h.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 / 8)
    assert h.scheduler.last_epoch == 3

    p = classifier()
    p.set_scheduler(torch.optim.lr_scheduler.ReduceLROnPlateau, mode="min", patience=100)
    p.train(epochs=3, progress_bar=False)
    assert p.scheduler.best == pytest.approx(min(p.val_losses))

    q = classifier()
    q._val_loader = None
    q.set_scheduler(torch.optim.lr_scheduler.ReduceLROnPlateau, patience=100)
    q.train(epochs=2, progress_bar=False)
    assert q.scheduler.best == pytest.approx(min(q.train_losses))


def test_handler_optimizer_is_a_real_torch_optimizer():
    h = classifier()
    assert isinstance(h.optimizer, torch.optim.Adam)
    h.train(epochs=1, progress_bar=False)
    sd = h.optimizer.state_dict()
    assert len(sd["state"]) == len(list(h.module.parameters()))
    h.optimizer.param_groups[0]["lr"] = 0.0  # user code changes the lr: the next epoch obeys
    before = {k: v.clone() for k, v in h.module.named_parameters()}
    h.train(epochs=1, progress_bar=False)
    assert all(torch.equal(before[k], v) for k, v in h.module.named_parameters())


def test_validate_every_and_nan_for_skipped_epochs():
    h = classifier()
    h.train(epochs=4, validate_every=2, progress_bar=False)
    assert math.isnan(h.val_losses[0]) and math.isnan(h.val_losses[2])
    assert not math.isnan(h.val_losses[1]) and not math.isnan(h.val_losses[3])


def test_batches_are_those_of_the_equivalent_dataloader():
    seen = []

    class Capture(Callback):
        def on_train_batch_begin(self, batch, logs=None):
            seen.append(logs["batch"][0].clone())

    torch.manual_seed(3)
    h = NNHandler(MLP, dropout=0.0)  # no dropout: the loader is the only RNG consumer
    h.set_optimizer(torch.optim.SGD, lr=0.0)
    h.set_loss_fn(nn.functional.cross_entropy)
    data = classification_data()
    h.set_train_loader(data, batch_size=16, shuffle=True)
    h.add_callback(Capture())
    state = torch.get_rng_state()
    h.train(epochs=2, progress_bar=False)
    torch.set_rng_state(state)
    expected = [x for _ in range(2) for x, _ in DataLoader(data, batch_size=16, shuffle=True)]
    assert len(seen) == len(expected) and all(torch.equal(a, b) for a, b in zip(seen, expected))


def test_every_train_option_at_once(tmp_path, caplog):
    h = classifier(logger_mode="console")
    h.add_metric("acc", accuracy)
    h.auto_save(interval=2, save_path=str(tmp_path), name="run_{epoch}_{val_acc:.2f}")
    h.train(
        epochs=4,
        validate_every=2,
        gradient_accumulation_steps=3,
        use_amp=True,
        gradient_clipping_norm=0.5,
        ema_decay=0.9,
        seed=7,
        progress_bar=True,
        debug_print_interval=2,
        save_on_last_epoch=True,
        epoch_train_and_val_pbar=True,
    )
    assert len(h.train_losses) == 4 and all(math.isfinite(v) for v in h.train_losses)
    assert h.state.ema is not None and h.state.step == 4 * math.ceil(math.ceil(120 / 16) / 3)
    assert sorted(p.name for p in tmp_path.glob("*.pth")) == sorted(
        f"run_{e}_{h.val_metrics_history['acc'][e - 1]:.2f}.pth" for e in (2, 4)
    )


# -- evaluation and utilities ---------------------------------------------------------------


def test_eval_keep_eval_and_freeze():
    h = classifier()
    bn = h.module.net[1]
    h.keep_eval_on_module(bn)
    h.freeze_module(h.module.net[0], verbose=True)
    frozen = h.module.net[0].weight.detach().clone()
    stats = bn.running_mean.clone()
    h.train(epochs=2, progress_bar=False)
    assert torch.equal(bn.running_mean, stats) and not bn.training
    assert torch.equal(h.module.net[0].weight, frozen)
    assert h.count_parameters() == h.count_parameters(trainable_only=False) - 8 * 16 - 16
    h.eval()
    assert not h.module.training
    h.eval(activate=False)
    assert h.module.training and not bn.training
    h.keep_eval_on_module(bn, activate=False)
    h.eval(activate=False)
    assert bn.training


def test_predict_uses_ema_then_restores_weights():
    h = classifier()
    h.train(epochs=2, ema_decay=0.5, progress_bar=False)
    live = {k: v.detach().clone() for k, v in h.module.named_parameters()}
    data = classification_data(20, seed=5)
    with_ema = torch.cat(h.predict(DataLoader(data, batch_size=8)))
    without = torch.cat(h.predict(DataLoader(data, batch_size=8), apply_ema=False))
    assert all(torch.equal(live[k], v) for k, v in h.module.named_parameters())
    ref = MLP()
    ref.load_state_dict(h.module.state_dict())
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(h.state.ema[name])
        ref.eval()
        expected = torch.cat([ref(x) for x, _ in DataLoader(data, batch_size=8)])
    assert torch.equal(with_ema, expected)
    assert (with_ema - without).abs().max() > 1e-3
    assert h.module.training  # predict restores the mode
    h.eval()
    assert torch.equal(h(data.tensors[0][:3]), h.module(data.tensors[0][:3]))


def test_compile_model_still_trains_and_module_stays_plain():
    h = classifier()
    h.compile_model(backend="eager")
    assert h.module.__class__ is MLP and h.model is not h.module
    h.train(epochs=2, progress_bar=False)
    assert h.train_losses[1] < h.train_losses[0]


def test_print_summary_and_plots(tmp_path):
    import matplotlib.image as mpimg

    h = classifier()
    h.add_metric("acc", accuracy)
    h.train(epochs=3, progress_bar=False)
    text = h.print()
    assert "MLP" in text and "Adam" in text and "acc" in text and "3 epochs" in text
    assert "Sequential" in h.print(show_model_structure=True)
    fig = h.plot_losses(log_y_scale=True, save_path=str(tmp_path / "loss.png"))
    assert fig.axes[0].get_yscale() == "log"
    figs = h.plot_metrics(save_path_prefix=str(tmp_path / "metric"))
    assert set(figs) == {"acc"}
    for name in ("loss.png", "metric_acc.png"):
        image = mpimg.imread(tmp_path / name)
        assert image.shape[0] > 200 and image.shape[1] > 300 and image.std() > 0.01


def test_fp16_autocast_with_loss_scaler_trains_and_the_scaler_survives_a_checkpoint(tmp_path):
    h = classifier()
    h.train(epochs=2, use_amp="fp16", gradient_clipping_norm=1.0, progress_bar=False)
    assert h.state.scaler is not None and float(h.state.scaler["scale"]) == 2.0**16
    assert h.state.step + h.state.skipped_steps == 2 * math.ceil(120 / 16)
    assert h.train_losses[1] < h.train_losses[0]
    h.save(str(tmp_path / "fp16.pth"))
    g = NNHandler.load(str(tmp_path / "fp16.pth"))
    assert torch.equal(g.state.scaler["scale"], h.state.scaler["scale"])
    assert torch.equal(g.state.scaler["growth_tracker"], h.state.scaler["growth_tracker"])
    h.train(epochs=1, use_amp=False, progress_bar=False)  # AMP off: the scaler is dropped
    assert h.state.scaler is None
