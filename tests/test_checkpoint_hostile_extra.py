"""Hostile files beyond the issue's list (issue 18 asks for five of our own).

Each is a stranger's file (written with nnh's writer, not signed with the user's key): it
must either load without effect (with a warning) or raise ``CheckpointError``, and never
run code, allocate without bound, write outside the working folder or leave a non-finite
state.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch
from models import MLP, classification_data
from torch import nn

from nnh import NNHandler
from nnh.callbacks import EarlyStopping
from nnh.checkpoint import CheckpointError, save_checkpoint
from nnh.handler.persistence import handler_payload


def trained(callbacks=()) -> NNHandler:
    torch.manual_seed(0)
    h = NNHandler(MLP, model_type="classification")
    h.set_optimizer(torch.optim.Adam, lr=1e-2)
    h.set_loss_fn(nn.functional.cross_entropy)
    h.set_train_loader(classification_data(64), batch_size=16, shuffle=True)
    h.set_val_loader(classification_data(32, seed=1), batch_size=16)
    for cb in callbacks:
        h.add_callback(cb)
    h.train(1, progress_bar=False)
    return h


def foreign(tmp_path: Path, edit, h: NNHandler | None = None) -> Path:
    payload = handler_payload(h or trained())
    edit(payload)
    return save_checkpoint(payload, tmp_path / "foreign.pth", sign=False)


def test_lbfgs_line_search_naming_a_shell_function_is_refused(tmp_path):
    """1. A registry optimizer whose string option names code (LBFGS line_search_fn)."""

    def edit(p):
        p["optimizer"].update(**{"class": "torch.optim.lbfgs.LBFGS",
                                 "kwargs": {"lr": 1.0, "line_search_fn": "os.system"}})  # fmt: skip

    with pytest.raises(CheckpointError) as info:
        NNHandler.load(str(foreign(tmp_path, edit)))
    assert info.value.kind == "damaged" and "line_search_fn" in str(info.value)


def test_a_metric_sized_to_exhaust_memory_is_refused(tmp_path):
    """2. A torchmetrics metric whose state would be sized by a huge num_classes."""
    pytest.importorskip("torchmetrics")

    def edit(p):
        p["metrics"] = {"acc": {"kind": "module",
                                "class": "torchmetrics.classification.MulticlassAccuracy",
                                "options": {"num_classes": 10**9, "average": "none"},
                                "state_dict": {}}}  # fmt: skip

    with pytest.raises(CheckpointError) as info:
        NNHandler.load(str(foreign(tmp_path, edit)))
    assert info.value.kind == "damaged" and "num_classes" in str(info.value)


def test_early_stopping_best_weights_poisoned_with_nan_are_refused(tmp_path):
    """3. A callback whose state would put NaN weights back into the model at the end."""
    h = trained([EarlyStopping(monitor="val_loss", patience=5, restore_best_weights=True)])

    def edit(p):
        state = p["callbacks"][0]["state"]
        weights = state.get("best_weights") or {}
        for key in weights:
            if weights[key].is_floating_point():
                weights[key] = torch.full_like(weights[key], float("nan"))
        state["best_weights"] = weights or {"net.0.weight": torch.full((16, 8), float("nan"))}

    with pytest.raises(CheckpointError) as info:
        NNHandler.load(str(foreign(tmp_path, edit, h)))
    assert info.value.kind == "damaged"


def test_a_symlink_in_the_working_folder_does_not_carry_a_log_outside(tmp_path, monkeypatch):
    """4. A CSV log path relative to the working folder, through a symlink that leads out."""
    work = tmp_path / "work"
    work.mkdir()
    outside = tmp_path / "home"
    outside.mkdir()
    victim = outside / ".bashrc"
    victim.write_text("export PATH=/usr/bin\n")
    (work / "data").symlink_to(outside)  # an ordinary link a user may well have
    monkeypatch.chdir(work)

    def edit(p):
        p["callbacks"] = [{"class": "nnh.callbacks.CSVLogger",
                           "config": {"filename": "data/.bashrc", "separator": ","},
                           "state": {}}]  # fmt: skip

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        h = NNHandler.load(str(foreign(tmp_path, edit)))
    assert any("data/.bashrc" in str(w.message) for w in caught)
    h.train(1, progress_bar=False)
    assert victim.read_text() == "export PATH=/usr/bin\n"


def test_optimizer_groups_naming_parameters_the_model_lacks_are_a_checkpoint_error(tmp_path):
    """5. Parameter groups that name parameters which do not exist (a bare KeyError before)."""

    def edit(p):
        p["optimizer"]["kwargs"]["params"] = [{"params": ["net.999.weight"], "lr": 0.1}]

    with pytest.raises(CheckpointError):
        NNHandler.load(str(foreign(tmp_path, edit)))


def test_a_python_rng_state_of_an_unknown_version_is_refused(tmp_path):
    """6. An RNG state that ``random.setstate`` would reject at the first resume."""

    def edit(p):
        _version, internal, gauss = p["rng"]["python"]
        p["rng"]["python"] = (99, internal, gauss)

    with pytest.raises(CheckpointError) as info:
        NNHandler.load(str(foreign(tmp_path, edit)))
    assert info.value.kind == "damaged" and "rng" in str(info.value)


def test_an_embedding_sized_by_the_file_fails_before_allocation(tmp_path):
    """7. A registry-free model class from torch sized to need terabytes, weights missing."""

    def edit(p):
        p["model"].update(**{"class": "torch.nn.Embedding",
                             "kwargs": {"num_embeddings": 10**8, "embedding_dim": 10**4}})  # fmt: skip
        p["model_state_dict"] = {}
        p["optimizer"] = None

    with pytest.raises(CheckpointError) as info:
        NNHandler.load(str(foreign(tmp_path, edit)))
    assert info.value.kind == "too_large"
    assert os.getpid() > 0  # still alive: nothing was allocated
