"""Bad input is a clear error naming the argument, raised at the call, before any work."""

from __future__ import annotations

import math

import pytest
import torch
from models import Regressor, regression_data
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from nnh import NNHandler


def regressor(**loss_kw) -> NNHandler:
    h = NNHandler(Regressor, model_type="regression")
    h.set_optimizer(torch.optim.SGD, lr=0.05)
    h.set_loss_fn(nn.functional.mse_loss, **loss_kw)
    h.set_train_loader(regression_data(20), batch_size=5)
    return h


def weights(h: NNHandler) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in h.module.state_dict().items()}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"epochs": True}, r"epochs must be an int >= 0, got True \(bool\)"),
        ({"epochs": 2.0}, r"epochs must be an int"),
        ({"epochs": 1, "gradient_clipping_norm": "1.0"}, r"gradient_clipping_norm must be a number > 0 or None.*got '1.0' \(str\)"),
        ({"epochs": 1, "ema_decay": "0.9"}, r"ema_decay must be a number in \[0, 1\).*got '0.9' \(str\)"),
        ({"epochs": 1, "ema_decay": 1.0}, r"ema_decay must be a number in \[0, 1\)"),
        ({"epochs": 1, "debug_print_interval": "5"}, r"debug_print_interval must be an int >= 1, got '5' \(str\)"),
        ({"epochs": 1, "gradient_accumulation_steps": 1.5}, r"gradient_accumulation_steps must be an int"),
        ({"epochs": 1, "validate_every": "2"}, r"validate_every must be an int"),
        ({"epochs": 1, "seed": "0"}, r"seed must be an int or None"),
        ({"epochs": 1, "use_amp": 1}, r"use_amp must be True/False"),
        ({"epochs": 1, "progress_bar": "no"}, r"progress_bar must be True or False"),
    ],
)
def test_train_arguments_are_checked_before_any_work(kwargs, message):
    h = regressor()
    before = weights(h)
    with pytest.raises((TypeError, ValueError), match=message):
        h.train(**kwargs)
    assert h.train_losses == [] and h.state is None
    assert all(torch.equal(before[k], v) for k, v in h.module.state_dict().items())


def test_data_arguments_are_checked_at_the_call(tmp_path):
    h = regressor()
    with pytest.raises(TypeError, match=r"dataset must be a torch Dataset or DataLoader.*'data.csv' \(str\).*file path"):
        h.set_train_loader("data.csv", batch_size=4)
    with pytest.raises(TypeError, match=r"dataset must be a torch Dataset"):
        h.set_val_loader(None, batch_size=4)
    with pytest.raises(TypeError, match=r"data_loader must be a DataLoader or a Dataset to predict on, got None"):
        h.predict(None)
    with pytest.raises(TypeError, match=r"save_path must be a folder path \(str or os.PathLike\), got None"):
        h.save_path = None
    with pytest.raises(TypeError, match=r"save_path must be a folder path"):
        h.auto_save(1, save_path=None)
    h.save_path = tmp_path  # a Path is fine
    assert h.save_path == str(tmp_path)
    assert len(h.predict(regression_data(7))) == 1  # a Dataset is fine


def test_empty_loaders_say_they_yield_no_batches():
    h = regressor()
    empty = TensorDataset(torch.zeros(0, 4), torch.zeros(0, 1))
    with pytest.raises(ValueError, match=r"the training loader yields no batches: 0 samples, batch_size=4"):
        h.set_train_loader(empty, batch_size=4)
    with pytest.raises(ValueError, match=r"training loader yields no batches: 3 samples.*drop_last=True"):
        h.set_train_loader(regression_data(3), batch_size=4, drop_last=True)
    with pytest.raises(ValueError, match=r"the validation loader yields no batches: 0 samples"):
        h.set_val_loader(empty, batch_size=4)
    # a ready DataLoader is checked too, and again at train() time
    with pytest.raises(ValueError, match=r"validation loader yields no batches"):
        h.set_val_loader(DataLoader(empty, batch_size=2))
    assert h.val_loader is None and len(h.train_loader) == 4  # the failed calls changed nothing
    h.train(epochs=1, progress_bar=False)
    assert len(h.train_losses) == 1 and not math.isnan(h.train_losses[0])


def test_an_empty_iterable_dataset_says_it_yields_no_batches():
    class Empty(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(())

    h = regressor()
    h.set_train_loader(Empty(), batch_size=4)  # no length: checked after the epoch
    with pytest.raises(ValueError, match=r"the training loader yielded no batches this epoch"):
        h.train(epochs=1, progress_bar=False)
    assert h.train_losses == [] and h.state.epoch == 0


def test_epoch_counter_agrees_with_history_after_a_failed_train():
    """Epoch 2's validation fails (its steps ran, it was not recorded): the counter stays at
    1, and a later train() records epoch 2 as the 2nd history entry."""
    calls = {"val": 0, "fail": True}

    def metric(out, y):
        if out.shape[0] == 3:  # the validation batches
            calls["val"] += 1
            if calls["val"] > 2 and calls["fail"]:
                raise ValueError("validation metric failure")
        return (out - y).abs().mean()

    h = regressor()
    h.set_val_loader(regression_data(6, seed=1), batch_size=3)
    h.add_metric("mae", metric)
    with pytest.raises(Exception, match="validation metric failure"):
        h.train(epochs=3, progress_bar=False)
    assert len(h.train_losses) == 1 and h.state.epoch == 1
    calls["fail"] = False
    h.train(epochs=1, progress_bar=False)
    assert len(h.train_losses) == 2 and h.state.epoch == 2


def test_training_and_validation_of_an_epoch_pass_the_same_epoch_index():
    seen: dict[str, list[int]] = {"train": [], "val": []}

    class Net(Regressor):
        pass

    def loss(out, y, epoch):
        seen["train" if torch.is_grad_enabled() else "val"].append(epoch)
        return nn.functional.mse_loss(out, y)

    h = NNHandler(Net, model_type="regression")
    h.set_optimizer(torch.optim.SGD, lr=0.05)
    h.set_loss_fn(loss, pass_epoch_to_loss=True)
    h.set_train_loader(regression_data(10), batch_size=5)
    h.set_val_loader(regression_data(6, seed=1), batch_size=3)
    h.train(epochs=2, progress_bar=False)
    assert seen["train"] == [0, 0, 1, 1]
    assert seen["val"] == [0, 0, 1, 1]
