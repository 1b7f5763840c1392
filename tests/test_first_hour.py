"""What a new user meets in the first hour (issue 12): options that continue, seeded model
initialisation, nnh.checkpointing, logging across save/load, file modes, print(), exact
metrics, device errors, plots, warnings once, packaging and docs links."""

from __future__ import annotations

import logging
import os
import re
import warnings
from pathlib import Path

import pytest
import torch
from models import MLP, accuracy, classification_data
from torch import nn
from torch.utils.data import TensorDataset

from nnh import Callback, NNHandler, checkpointing
from nnh.callbacks import CSVLogger

ROOT = Path(__file__).resolve().parents[1]


def classifier(**kw) -> NNHandler:
    h = NNHandler(MLP, **kw)
    h.set_optimizer(torch.optim.Adam, lr=1e-2)
    h.set_loss_fn(nn.functional.cross_entropy)
    h.set_train_loader(classification_data(), batch_size=16, shuffle=True)
    h.set_val_loader(classification_data(37, seed=1), batch_size=10)
    h.add_metric("accuracy", accuracy)
    return h


# -- train() options continue ----------------------------------------------------------------


def test_train_options_continue_within_a_process_and_across_save_load(tmp_path):
    h = classifier()
    h.train(1, gradient_accumulation_steps=2, gradient_clipping_norm=1.0, ema_decay=0.9,
            progress_bar=False)
    h.train(1)  # nothing passed: the same options
    assert h._last_train_kwargs["ema_decay"] == 0.9
    assert h._last_train_kwargs["gradient_accumulation_steps"] == 2
    assert h.state.ema is not None
    h.save(str(tmp_path / "run.pth"))
    g = NNHandler.load(str(tmp_path / "run.pth"))
    g.train(1)
    assert g.state.ema is not None and g._last_train_kwargs == h._last_train_kwargs
    g.train(1, gradient_accumulation_steps=1)  # a passed option changes only itself
    assert g._last_train_kwargs["gradient_accumulation_steps"] == 1
    assert g._last_train_kwargs["ema_decay"] == 0.9


def test_dropping_ema_weights_warns():
    h = classifier()
    h.train(1, ema_decay=0.9, progress_bar=False)
    with pytest.warns(UserWarning, match="discards the EMA weights"):
        h.train(1, ema_decay=0.0)
    assert h.state.ema is None


def test_remaining_epochs_of_an_epoch_checkpoint_and_of_a_finished_call(tmp_path):
    h = classifier()
    h.auto_save(1, save_path=str(tmp_path), name="ep{epoch}")
    h.train(4, progress_bar=False)
    assert h.remaining_epochs == 0
    assert NNHandler.load(str(tmp_path / "ep1.pth")).remaining_epochs == 3
    assert NNHandler.load(str(tmp_path / "ep4.pth")).remaining_epochs == 0
    with pytest.raises(RuntimeError, match="remaining_epochs is 0"):
        NNHandler.load(str(tmp_path / "ep4.pth")).resume_training()


# -- seeding ----------------------------------------------------------------------------------


def test_seed_argument_seeds_the_initial_weights():
    a = NNHandler(MLP, seed=3)
    torch.rand(100)  # the global generator moves on
    b = NNHandler(MLP, seed=3)
    c = NNHandler(MLP, seed=4)
    for (name, p), q in zip(a.module.named_parameters(), b.module.parameters()):
        assert torch.equal(p, q), name
    assert not torch.equal(a.module.net[0].weight, c.module.net[0].weight)
    assert a.seed == 3


def test_a_model_with_its_own_seed_parameter_receives_the_handler_seed():
    class Seeded(nn.Module):
        def __init__(self, seed: int = 0):
            super().__init__()
            self.seen = seed
            self.lin = nn.Linear(2, 2)

    h = NNHandler(Seeded, seed=11)
    assert h.module.seen == 11 and h.seed == 11
    with pytest.raises(TypeError, match="seed must be an int"):
        NNHandler(MLP, seed="0")


# -- nnh.checkpointing ------------------------------------------------------------------------


def test_checkpointing_module_functions_take_the_handler_class_first(tmp_path):
    class MyHandler(NNHandler):
        pass

    h = classifier()
    h.train(1, progress_bar=False)
    path = str(tmp_path / "run.pth")
    h.save(path)
    g = checkpointing.load(MyHandler, path, skip_optimizer=True)
    assert type(g) is MyHandler and g.train_losses == h.train_losses
    assert len(g.optimizer.state) == 0
    torch.save(h.module.state_dict(), tmp_path / "w.pth")
    w = checkpointing.initialize_from_checkpoint(NNHandler, str(tmp_path / "w.pth"), MLP,
                                                 model_type="classification")
    assert torch.equal(w.module.net[0].weight, h.module.net[0].weight) and w.optimizer is None


# -- logging ----------------------------------------------------------------------------------


def test_logging_configuration_is_restored_and_the_log_file_continues(tmp_path):
    log = tmp_path / "train.log"
    h = classifier(logger_mode=NNHandler.LoggingMode.FILE, logger_filename=str(log),
                   logger_level=logging.DEBUG)
    h.train(1, progress_bar=False)
    h.save(str(tmp_path / "run.pth"))
    g = NNHandler.load(str(tmp_path / "run.pth"))
    assert g.logger is not None and g.logger.level == logging.DEBUG
    g.train(1)
    text = log.read_text()
    assert "epoch 1:" in text and "epoch 2:" in text and "loaded" in text


def test_logger_setter():
    h = NNHandler(MLP)
    custom = logging.getLogger("nnh.test.custom")
    h.logger = custom
    assert h.logger is custom
    with pytest.raises(TypeError, match=r"logging\.Logger"):
        h.logger = "stderr"
    h.logger = None
    assert h.logger is None


def test_a_saved_log_file_that_is_not_a_log_falls_back_to_the_console(tmp_path):
    from nnh.handler.logs import logging_options

    with pytest.warns(UserWarning, match=r"does not end in '\.log'"):
        options = logging_options({"mode": "file", "filename": "/etc/passwd", "level": 20})
    assert options["logger_mode"] == "console"


# -- file modes -------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_files_nnh_writes_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        h = classifier()
        h.add_callback(CSVLogger(str(tmp_path / "log.csv")))
        h.train(2, progress_bar=False)
        h.save(str(tmp_path / "run.pth"))
    finally:
        os.umask(old)
    expected = 0o666 & ~umask
    for name in ("log.csv", "run.pth"):
        assert (tmp_path / name).stat().st_mode & 0o777 == expected, name


# -- print() ----------------------------------------------------------------------------------


def test_print_returns_the_last_validation_metrics():
    h = classifier()
    h.train(1, progress_bar=False)
    text = h.print()
    val = h.val_metrics_history["accuracy"][-1]
    assert f"val_accuracy {val:.6g}" in text and "val_loss" in text


# -- exact metrics ----------------------------------------------------------------------------


def test_a_float32_accuracy_is_logged_as_the_exact_fraction():
    # 200 samples in batches of 40, one misclassified in each: every batch mean is 39/40,
    # which float32 cannot hold exactly (0.97500002...)
    x = torch.zeros(200, 2)
    x[:, 0] = 1.0
    x[::40, 0] = 0.0
    y = torch.zeros(200, dtype=torch.long)
    h = NNHandler(nn.Linear, in_features=2, out_features=2)
    with torch.no_grad():
        h.module.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        h.module.bias.copy_(torch.tensor([0.0, 0.5]))
    h.set_optimizer(torch.optim.SGD, lr=0.0)
    h.set_loss_fn(nn.functional.cross_entropy)
    h.set_train_loader(TensorDataset(x, y), batch_size=40)
    h.set_val_loader(TensorDataset(x, y), batch_size=40)
    h.add_metric("accuracy", accuracy)
    h.train(1, progress_bar=False)
    assert h.val_metrics_history["accuracy"] == [0.975]
    assert h.train_metrics_history["accuracy"] == [0.975]


# -- devices ----------------------------------------------------------------------------------


def test_an_unusable_cuda_device_is_a_clear_error():
    if torch.cuda.is_available():  # a GPU machine: the device works
        assert NNHandler(MLP, device="cuda").device.type == "cuda"
        return
    with pytest.raises(RuntimeError, match=r"device='cuda'.*Use device='cpu'"):
        NNHandler(MLP, device="cuda")


# -- plots ------------------------------------------------------------------------------------


def test_plots_have_integer_epoch_ticks_titles_and_a_resume_marker(tmp_path):
    h = classifier()
    h.train(3, progress_bar=False)
    h.save(str(tmp_path / "run.pth"))
    g = NNHandler.load(str(tmp_path / "run.pth"))
    g.train(2)
    ax = g.plot_losses().axes[0]
    assert ax.get_title() == "Loss per epoch"
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks)
    resumed = [line for line in ax.get_lines() if line.get_label() == "resumed from checkpoint"]
    assert len(resumed) == 1 and list(resumed[0].get_xdata()) == [3.5, 3.5]
    assert g.plot_metrics()["accuracy"].axes[0].get_title() == "Accuracy per epoch"
    assert not any(line.get_label() == "resumed from checkpoint"
                   for line in h.plot_losses().axes[0].get_lines())


# -- warnings once ----------------------------------------------------------------------------


def test_an_unimportable_callback_warns_once_not_on_every_automatic_save(tmp_path):
    class Local(Callback):  # defined in a function: no import path
        pass

    h = classifier()
    h.add_callback(Local())
    h.auto_save(1, save_path=str(tmp_path), name="ep{epoch}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        h.train(3, progress_bar=False)
    about = [w for w in caught if "callback Local" in str(w.message)]
    assert len(about) == 1, [str(w.message) for w in caught]


# -- packaging and docs -----------------------------------------------------------------------


def test_license_is_an_spdx_string_with_a_setuptools_that_reads_it():
    text = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^license = "MIT"$', text, re.M)
    assert int(re.search(r'"setuptools>=(\d+)', text).group(1)) >= 77


def test_every_markdown_file_the_docs_name_exists():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for page in pages:
        for name in re.findall(r"[\w./-]*\w\.md\b", page.read_text()):
            name = name.split("#")[0]
            candidates = [page.parent / name, ROOT / name, ROOT / "docs" / name]
            assert any(c.exists() for c in candidates), f"{page.name} names {name}"

