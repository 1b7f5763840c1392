"""Callbacks through the public API: hook order, stopping, and the built-in callbacks."""

from __future__ import annotations

import csv
import sys
import warnings

import pytest
import torch
from models import Regressor, regression_data
from torch import nn

from nnh import Callback, NNHandler
from nnh.callbacks import (
    CallbackList,
    CSVLogger,
    EarlyStopping,
    EpochTimer,
    LearningRateMonitor,
    TensorBoardLogger,
)


def regressor(lr: float = 0.05, n_train: int = 30, n_val: int | None = 20, **optimizer_kwargs) -> NNHandler:
    """A linear regressor: 3 train batches of 10, 2 val batches of 10 (deterministic)."""
    torch.manual_seed(0)
    h = NNHandler(Regressor, model_type="regression")
    h.set_optimizer(torch.optim.SGD, lr=lr, **optimizer_kwargs)
    h.set_loss_fn(nn.functional.mse_loss)
    h.set_train_loader(regression_data(n_train), batch_size=10)
    if n_val:
        h.set_val_loader(regression_data(n_val, seed=1), batch_size=10)
    return h


class Recorder(Callback):
    """Records every hook with its index, and a few logs."""

    def __init__(self):
        super().__init__()
        self.events: list[tuple] = []
        self.logs: dict[str, list] = {}

    def _keep(self, name, logs):
        self.logs.setdefault(name, []).append(logs)

    def on_train_begin(self, logs=None):
        self.events.append(("train_begin",))
        self._keep("train_begin", dict(logs))

    def on_train_end(self, logs=None):
        self.events.append(("train_end",))

    def on_epoch_begin(self, epoch, logs=None):
        self.events.append(("epoch_begin", epoch))

    def on_epoch_end(self, epoch, logs=None):
        self.events.append(("epoch_end", epoch))
        self._keep("epoch_end", dict(logs))

    def on_train_batch_begin(self, batch, logs=None):
        self.events.append(("train_batch_begin", batch))

    def on_train_batch_end(self, batch, logs=None):
        self.events.append(("train_batch_end", batch))
        self._keep("train_batch_end", dict(logs))

    def on_val_begin(self, logs=None):
        self.events.append(("val_begin",))

    def on_val_end(self, logs=None):
        self.events.append(("val_end",))

    def on_val_batch_begin(self, batch, logs=None):
        self.events.append(("val_batch_begin", batch))

    def on_val_batch_end(self, batch, logs=None):
        self.events.append(("val_batch_end", batch))


def expected_events(epochs: int, validate_every: int) -> list[tuple]:
    out: list[tuple] = [("train_begin",)]
    for e in range(1, epochs + 1):
        out.append(("epoch_begin", e))
        for b in range(3):
            out += [("train_batch_begin", b), ("train_batch_end", b)]
        if e % validate_every == 0:
            out.append(("val_begin",))
            for b in range(2):
                out += [("val_batch_begin", b), ("val_batch_end", b)]
            out.append(("val_end",))
        out.append(("epoch_end", e))
    out.append(("train_end",))
    return out


# -- the protocol ----------------------------------------------------------------------------


def test_hooks_fire_in_order_with_their_logs():
    h = regressor()
    rec = Recorder()
    h.add_callback(rec)
    h.train(epochs=2, progress_bar=False)
    assert rec.events == expected_events(2, validate_every=1)
    assert rec.logs["train_begin"] == [{"epochs": 2, "start_epoch": 0}]
    ends = rec.logs["epoch_end"]
    assert [e["epoch"] for e in ends] == [1, 2]
    assert set(ends[0]) == {"epoch", "loss", "val_loss", "lr"}
    assert [e["loss"] for e in ends] == h.train_losses
    assert [e["val_loss"] for e in ends] == h.val_losses
    batch = rec.logs["train_batch_end"][0]
    assert isinstance(batch["loss"], torch.Tensor) and batch["loss"].ndim == 0
    assert batch["batch_size"] == 10 and batch["updated"] is True
    assert batch["output"].shape == (10, 1)


def test_validate_every_two_skips_val_hooks_on_odd_epochs():
    h = regressor()
    rec = Recorder()
    h.add_callback(rec)
    h.train(epochs=2, validate_every=2, progress_bar=False)
    assert rec.events == expected_events(2, validate_every=2)
    assert "val_loss" not in rec.logs["epoch_end"][0] and "val_loss" in rec.logs["epoch_end"][1]


def test_second_train_call_continues_epoch_numbers():
    h = regressor()
    rec = Recorder()
    h.add_callback(rec)
    h.train(epochs=1, progress_bar=False)
    h.train(epochs=1, progress_bar=False)
    assert rec.logs["train_begin"][1] == {"epochs": 1, "start_epoch": 1}
    assert [e for e in rec.events if e[0] == "epoch_end"] == [("epoch_end", 1), ("epoch_end", 2)]


class StopAt(Callback):
    def __init__(self, epoch: int):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            self.handler.stop_training = True


def test_a_callback_stops_training_after_its_epoch():
    h = regressor()
    rec = Recorder()
    h.add_callback(StopAt(2))
    h.add_callback(rec)
    h.train(epochs=10, progress_bar=False)
    assert len(h.train_losses) == 2 and len(h.val_losses) == 2
    assert [e for e in rec.events if e[0] == "epoch_end"] == [("epoch_end", 1), ("epoch_end", 2)]
    assert rec.events[-1] == ("train_end",) and rec.events.count(("train_end",)) == 1


def test_rank0_only_callbacks_are_not_dispatched_on_other_ranks(tmp_path):
    path = tmp_path / "log.csv"
    es, csv_logger = EarlyStopping(), CSVLogger(path)
    assert es.all_ranks and not csv_logger.all_ranks and not TensorBoardLogger.all_ranks
    other_rank = CallbackList([es, csv_logger], is_main=False)
    assert not CallbackList([csv_logger], is_main=False).wants("on_epoch_end")
    assert CallbackList([csv_logger], is_main=True).wants("on_epoch_end")
    other_rank.call("on_epoch_end", 1, {"epoch": 1, "loss": 1.0, "val_loss": 1.0})
    assert not path.exists() and es.best == 1.0


# -- EarlyStopping -----------------------------------------------------------------------------


def test_early_stopping_stops_after_patience_epochs_without_improvement():
    h = regressor(lr=0.0)  # the weights never change: the validation loss is constant
    es = EarlyStopping(monitor="val_loss", patience=3)
    h.add_callback(es)
    h.train(epochs=20, progress_bar=False)
    assert len(h.train_losses) == 4  # epoch 1 sets the best, epochs 2..4 wait
    assert (es.best_epoch, es.wait, es.stopped_epoch) == (1, 3, 4)
    assert es.best == h.val_losses[0]


class Scripted(Callback):
    """Logs ``score`` = a scripted value per epoch (registered before the callback reading it)."""

    def __init__(self, scores):
        super().__init__()
        self.scores = list(scores)

    def on_epoch_end(self, epoch, logs=None):
        logs["score"] = self.scores[epoch - 1]


def test_early_stopping_max_mode_and_min_delta():
    h = regressor()
    es = EarlyStopping(monitor="score", mode="max", patience=2, min_delta=0.1)
    h.add_callback(Scripted([1.0, 2.0, 2.05, 2.09, 5.0, 6.0]))
    h.add_callback(es)
    h.train(epochs=6, progress_bar=False)
    # 2.05 and 2.09 do not beat 2.0 by more than 0.1: two waiting epochs -> stop after epoch 4
    assert len(h.train_losses) == 4
    assert (es.best, es.best_epoch, es.stopped_epoch) == (2.0, 2, 4)


class Snapshots(Callback):
    def __init__(self):
        super().__init__()
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def on_epoch_end(self, epoch, logs=None):
        self.weights[epoch] = {k: v.clone() for k, v in self.handler.module.state_dict().items()}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


def test_restore_best_weights_loads_the_best_epoch_when_stopping():
    h = regressor(lr=0.1)
    snaps, es = Snapshots(), EarlyStopping(monitor="score", patience=2, restore_best_weights=True)
    h.add_callback(Scripted([3.0, 1.0, 2.0, 2.0, 0.0]))
    h.add_callback(snaps)
    h.add_callback(es)
    h.train(epochs=5, progress_bar=False)
    assert len(h.train_losses) == 4 and es.best_epoch == 2
    assert not _equal(snaps.weights[2], snaps.weights[4])  # training did move the weights
    assert _equal(h.module.state_dict(), snaps.weights[2])
    assert all(v.device.type == "cpu" for v in es.best_weights.values())
    # the stored copy is a copy, not a view of the live weights
    assert all(v.data_ptr() != p.data_ptr() for v, p in zip(es.best_weights.values(), h.module.parameters()))
    # the handler computes with the restored weights
    x = regression_data(5)[:][0]
    expected = x @ snaps.weights[2]["lin.weight"].T + snaps.weights[2]["lin.bias"]
    torch.testing.assert_close(torch.cat(h.predict(torch.utils.data.TensorDataset(x))), expected)


def test_restore_best_weights_keeps_last_weights_when_not_stopped():
    h = regressor(lr=0.1)
    snaps, es = Snapshots(), EarlyStopping(monitor="score", patience=5, restore_best_weights=True)
    h.add_callback(Scripted([3.0, 1.0, 2.0]))
    h.add_callback(snaps)
    h.add_callback(es)
    h.train(epochs=3, progress_bar=False)
    assert es.stopped_epoch == 0
    assert _equal(h.module.state_dict(), snaps.weights[3])
    es.restore_best()
    assert _equal(h.module.state_dict(), snaps.weights[2])
    with pytest.raises(RuntimeError, match="restore_best_weights=True"):
        EarlyStopping().restore_best()


def test_early_stopping_state_round_trips_through_a_checkpoint(tmp_path):
    h = regressor(lr=0.0)
    es = EarlyStopping(monitor="val_loss", patience=3, restore_best_weights=True)
    h.add_callback(es)
    h.train(epochs=2, progress_bar=False)
    assert (es.best_epoch, es.wait) == (1, 1)
    path = tmp_path / "ckpt.pth"
    h.save(str(path))
    raw = torch.load(path, weights_only=True)
    assert any(rec["state"].get("wait") == 1 for rec in raw["callbacks"])

    h2 = NNHandler.load(str(path))
    (es2,) = [cb for cb in h2.callbacks if isinstance(cb, EarlyStopping)]
    assert es2.config() == es.config()
    assert (es2.best, es2.best_epoch, es2.wait) == (es.best, 1, 1)
    assert _equal(es2.best_weights, es.best_weights)
    assert all(v.device.type == "cpu" for v in es2.best_weights.values())
    h2.train(epochs=10, progress_bar=False)
    # the wait counter continued: epochs 3 and 4 complete the patience of 3
    assert len(h2.train_losses) == 4 and es2.stopped_epoch == 4


def test_early_stopping_skips_epochs_without_the_key():
    h = regressor(lr=0.0)
    es = EarlyStopping(monitor="val_loss", patience=2)
    h.add_callback(es)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # validating every 2nd epoch is not a missing key
        h.train(epochs=20, validate_every=2, progress_bar=False)
    # validated epochs 2 (best), 4 (wait 1), 6 (wait 2 -> stop)
    assert len(h.train_losses) == 6 and (es.best_epoch, es.stopped_epoch) == (2, 6)


def test_early_stopping_warns_once_naming_the_missing_key():
    h = regressor(n_val=None)
    es = EarlyStopping(monitor="val_loss", patience=1)
    h.add_callback(es)
    with pytest.warns(UserWarning, match=r"'val_loss' never appeared.*\['epoch', 'loss', 'lr'\]") as rec:
        h.train(epochs=3, progress_bar=False)
    assert len([w for w in rec if "EarlyStopping" in str(w.message)]) == 1
    assert len(h.train_losses) == 3 and es.wait == 0
    h = regressor()
    h.add_callback(EarlyStopping(monitor="val_acc"))
    with pytest.warns(UserWarning, match=r"'val_acc' is not logged at epoch 1.*'val_loss'"):
        h.train(epochs=1, progress_bar=False)


def test_early_stopping_rejects_bad_options():
    with pytest.raises(ValueError, match="mode must be 'min' or 'max'"):
        EarlyStopping(mode="minimum")
    with pytest.raises(ValueError, match="patience"):
        EarlyStopping(patience=-1)
    with pytest.raises(ValueError, match="min_delta"):
        EarlyStopping(min_delta=-0.1)


# -- LearningRateMonitor -----------------------------------------------------------------------


class SeeLogs(Callback):
    def __init__(self):
        super().__init__()
        self.logs: list[dict] = []

    def on_epoch_end(self, epoch, logs=None):
        self.logs.append(dict(logs))


def test_lr_monitor_records_the_lr_each_epoch_trained_with():
    h = regressor(lr=0.1)
    h.set_scheduler(torch.optim.lr_scheduler.StepLR, step_size=2, gamma=0.5)
    mon, after = LearningRateMonitor(), SeeLogs()
    h.add_callback(mon)
    h.add_callback(after)
    h.train(epochs=5, progress_bar=False)
    assert list(mon.history) == ["lr"]
    assert mon.history["lr"] == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025], rel=1e-12)
    assert [logs["lr"] for logs in after.logs] == mon.history["lr"]
    state = mon.state_dict()
    again = LearningRateMonitor(**mon.config())
    again.load_state_dict(torch.load(_roundtrip(state), weights_only=True))
    assert again.history == mon.history and again.logging_interval == "epoch"


def _roundtrip(obj):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def test_lr_monitor_step_interval_counts_optimizer_updates():
    h = regressor(lr=0.1)
    h.set_scheduler(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5)
    mon = LearningRateMonitor(logging_interval="step")
    h.add_callback(mon)
    h.train(epochs=2, gradient_accumulation_steps=2, progress_bar=False)
    # 3 batches with accumulation 2: updates after batch 2 and after the partial window
    assert mon.history["lr"] == pytest.approx([0.1, 0.1, 0.05, 0.05], rel=1e-12)
    with pytest.raises(ValueError, match="'epoch' or 'step'"):
        LearningRateMonitor("batch")


def test_lr_monitor_names_param_groups():
    h = regressor()
    h.set_optimizer(torch.optim.SGD, lr=0.1,
                    params=[{"params": ["lin.weight"], "lr": 0.2}, {"params": ["lin.bias"]}])
    mon, after = LearningRateMonitor(), SeeLogs()
    h.add_callback(mon)
    h.add_callback(after)
    h.train(epochs=2, progress_bar=False)
    assert mon.history == {"lr/group0": [0.2, 0.2], "lr/group1": [0.1, 0.1]}
    assert after.logs[1]["lr/group0"] == 0.2 and after.logs[1]["lr/group1"] == 0.1


# -- CSVLogger ---------------------------------------------------------------------------------


def read_csv(path, delimiter=","):
    with open(path, newline="") as f:
        rows = list(csv.reader(f, delimiter=delimiter))
    return rows[0], [dict(zip(rows[0], r)) for r in rows[1:]]


def test_csv_logger_writes_a_row_per_epoch_with_exact_values(tmp_path):
    path = tmp_path / "sub" / "log.csv"
    h = regressor()
    timer = EpochTimer()
    h.add_callback(timer)
    h.add_callback(CSVLogger(path, separator=";"))
    h.train(epochs=3, progress_bar=False)
    header, rows = read_csv(path, ";")
    assert header == ["epoch", "loss", "val_loss", "lr", "epoch_time"]
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert [float(r["loss"]) for r in rows] == h.train_losses
    assert [float(r["val_loss"]) for r in rows] == h.val_losses
    assert [float(r["epoch_time"]) for r in rows] == timer.times


def test_csv_logger_adds_new_keys_as_columns(tmp_path):
    path = tmp_path / "log.csv"
    h = regressor()
    h.add_callback(CSVLogger(path))
    h.train(epochs=3, validate_every=2, progress_bar=False)
    header, rows = read_csv(path)
    assert header == ["epoch", "loss", "lr", "val_loss"]
    assert [r["val_loss"] for r in rows][0::2] == ["", ""]
    assert float(rows[1]["val_loss"]) == h.val_losses[1]
    assert [float(r["loss"]) for r in rows] == h.train_losses
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind


def test_csv_logger_restarts_the_file_unless_append(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("old,content\n1,2\n")
    h = regressor()
    h.add_callback(CSVLogger(path))
    h.train(epochs=1, progress_bar=False)
    h.train(epochs=1, progress_bar=False)  # a second train() call continues the file
    header, rows = read_csv(path)
    assert header[0] == "epoch" and [r["epoch"] for r in rows] == ["1", "2"]


def test_csv_logger_append_continues_an_existing_file(tmp_path):
    path, ckpt = tmp_path / "log.csv", tmp_path / "ckpt.pth"
    h = regressor()
    h.add_callback(CSVLogger(path))
    h.train(epochs=2, progress_bar=False)
    h.save(str(ckpt))
    h2 = NNHandler.load(str(ckpt), skip_callbacks=True)
    h2.add_callback(CSVLogger(path, append=True))
    h2.train(epochs=2, progress_bar=False)
    header, rows = read_csv(path)
    assert header == ["epoch", "loss", "val_loss", "lr"]
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert [float(r["loss"]) for r in rows] == h2.train_losses


def test_csv_logger_resumed_from_checkpoint_drops_rows_after_it(tmp_path):
    path, ckpt = tmp_path / "log.csv", tmp_path / "ckpt.pth"
    h = regressor()
    h.add_callback(CSVLogger(path))
    h.train(epochs=2, progress_bar=False)
    h.save(str(ckpt))
    h.train(epochs=1, progress_bar=False)  # row 3 of a run that then "crashed"
    assert len(read_csv(path)[1]) == 3
    h2 = NNHandler.load(str(ckpt))  # the callback comes back from the checkpoint
    h2.train(epochs=2, progress_bar=False)
    _, rows = read_csv(path)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert [float(r["loss"]) for r in rows] == h2.train_losses


# -- EpochTimer --------------------------------------------------------------------------------


def test_epoch_timer_records_a_positive_time_per_epoch():
    h = regressor()
    timer, after = EpochTimer(), SeeLogs()
    h.add_callback(timer)
    h.add_callback(after)
    h.train(epochs=3, progress_bar=False)
    assert len(timer.times) == 3 and all(t > 0 for t in timer.times)
    assert timer.total_time == pytest.approx(sum(timer.times))
    assert [logs["epoch_time"] for logs in after.logs] == timer.times
    restored = EpochTimer()
    restored.load_state_dict(timer.state_dict())
    assert restored.times == timer.times


# -- TensorBoardLogger -------------------------------------------------------------------------


def test_tensorboard_logger_says_what_to_install_when_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(ImportError, match=r"pip install nnh\[tensorboard\]"):
        TensorBoardLogger("runs")


def test_tensorboard_logger_writes_epoch_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    h = regressor()
    tb = TensorBoardLogger(log_dir=str(tmp_path / "run"), comment="_a")
    assert tb.config() == {"log_dir": str(tmp_path / "run"), "comment": "_a"}
    h.add_callback(tb)
    h.train(epochs=2, progress_bar=False)
    assert tb.writer is None  # closed at train end
    acc = EventAccumulator(str(tmp_path / "run_a"))
    acc.Reload()
    assert {"loss", "val_loss", "lr"} <= set(acc.Tags()["scalars"])
    loss = acc.Scalars("loss")
    assert [e.step for e in loss] == [1, 2]
    assert [e.value for e in loss] == pytest.approx(h.train_losses, rel=1e-6)


# -- configs -----------------------------------------------------------------------------------


def test_configs_rebuild_equal_callbacks(tmp_path):
    for cb in (EarlyStopping("val_acc", "max", 2, 0.01, True, True), LearningRateMonitor("step"),
               CSVLogger(tmp_path / "x.csv", ";", True), EpochTimer()):
        again = type(cb)(**cb.config())
        assert again.config() == cb.config()
    assert CSVLogger(tmp_path / "x.csv", ";", True).config() == {
        "filename": str(tmp_path / "x.csv"), "separator": ";", "append": True}
