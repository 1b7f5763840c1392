"""Checkpoints written by earlier nnh versions still load and train.

``tests/data/format_v1_*.pth`` were written by nnh 0.1.0 before checksums existed (format
version 1), ``format_v2_*.pth`` by the first version with them; both hold a classifier with
a scheduler, EMA and callbacks, and a score model with its SDE
(``tests/data/make_compat_fixtures.py`` wrote them).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nnh import NNHandler
from nnh.checkpoint import load_checkpoint

DATA = Path(__file__).with_name("data")


@pytest.mark.parametrize("version", [1, 2])
def test_earlier_classifier_checkpoints_load_and_train(version):
    path = DATA / f"format_v{version}_classifier.pth"
    assert load_checkpoint(path)["nnh_format"]["version"] == version
    h = NNHandler.load(str(path))
    assert len(h.train_losses) == 2 and h._state.ema is not None
    assert [type(cb).__name__ for cb in h.callbacks] == ["EarlyStopping", "LearningRateMonitor"]
    h.train(1, progress_bar=False)
    assert len(h.train_losses) == 3 and all(torch.isfinite(p).all() for p in h.module.parameters())


@pytest.mark.parametrize("version", [1, 2])
def test_earlier_score_model_checkpoints_load_and_sample(version):
    h = NNHandler.load(str(DATA / f"format_v{version}_score.pth"))
    assert type(h.sde).__name__ == "VPSDE"
    samples = h.sample((8, 2), steps=5)
    assert samples.shape == (8, 2) and torch.isfinite(samples).all()
