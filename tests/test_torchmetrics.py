"""torchmetrics.Metric objects as handler metrics: update per batch, compute per epoch."""

from __future__ import annotations

import ddp_script
import pytest
import torch
from models import MLP, DDPNet, classification_data
from test_ddp import SCRIPT, base_env, free_port
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassF1Score

from nnh import NNHandler


def macro_f1(preds: torch.Tensor, target: torch.Tensor) -> float:
    return float(MulticlassF1Score(num_classes=3, average="macro")(preds, target))


def test_metric_object_is_computed_over_the_whole_epoch_not_averaged_per_batch():
    """lr = 0: the weights stay put, so each epoch's F1 must be macro-F1 over the whole set;
    the mean of per-batch F1 values differs (it is not a mean of batch values)."""
    torch.manual_seed(0)
    h = NNHandler(DDPNet)
    h.set_optimizer(torch.optim.SGD, lr=0.0)
    h.set_loss_fn(nn.functional.cross_entropy)
    train, val = ddp_script.data(90, 0), ddp_script.data(70, 1)
    h.set_train_loader(train, batch_size=16)
    h.set_val_loader(val, batch_size=16)
    h.add_metric("f1", MulticlassF1Score(num_classes=3, average="macro"))
    h.train(epochs=2, progress_bar=False)
    h.module.eval()
    with torch.no_grad():
        train_out, val_out = h.module(train.tensors[0]), h.module(val.tensors[0])
    whole_train, whole_val = macro_f1(train_out, train.tensors[1]), macro_f1(val_out, val.tensors[1])
    batch_mean = sum(macro_f1(val_out[i:i + 16], val.tensors[1][i:i + 16]) * len(val_out[i:i + 16])
                     for i in range(0, 70, 16)) / 70
    assert abs(batch_mean - whole_val) > 1e-3  # the two really differ on this data
    assert h.val_metrics_history["f1"] == pytest.approx([whole_val] * 2, rel=1e-6)
    assert h.train_metrics_history["f1"] == pytest.approx([whole_train] * 2, rel=1e-6)  # a state of its own


def test_metric_object_under_ddp_equals_the_metric_over_the_whole_set(tmp_path):
    """1 001 validation samples on 2 ranks, batch 64: the padded duplicate shares rank 1's last
    batch. The synchronised F1 must equal macro-F1 over the 1 001 predictions."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "--master_addr=127.0.0.1", str(SCRIPT), "torchmetrics", str(tmp_path)]
    proc = subprocess.run(cmd, env=base_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = torch.load(tmp_path / "result.pt", weights_only=True)
    target = ddp_script.data(ddp_script.N_VAL, 1).tensors[1]
    assert result["predictions"].shape[0] == len(target) == 1001
    assert result["val_f1"][-1] == pytest.approx(macro_f1(result["predictions"], target), rel=1e-6)


def test_metric_object_is_loaded_back_as_missing_not_broken(tmp_path):
    h = NNHandler(MLP)
    h.add_metric("f1", MulticlassF1Score(num_classes=3, average="macro"))
    assert h.metrics["f1"].metric.__class__ is MulticlassF1Score
    h.set_optimizer(torch.optim.SGD, lr=0.1)
    h.set_loss_fn(nn.functional.cross_entropy)
    h.set_train_loader(DataLoader(classification_data(20), batch_size=10))
    h.train(epochs=1, progress_bar=False)
    assert 0 <= h.train_metrics_history["f1"][0] <= 1


def test_a_phase_starts_from_a_fresh_metric_after_an_interrupted_one():
    from nnh.handler.metric_objects import StatefulMetric

    m = StatefulMetric(MulticlassF1Score(num_classes=3, average="macro"))
    m.begin("train")
    m(torch.eye(3)[[0, 1, 2, 0]], torch.tensor([1, 2, 0, 2]))  # all wrong; the epoch is interrupted
    m.begin("train")  # the next epoch
    m(torch.eye(3)[[0, 1, 2]], torch.tensor([0, 1, 2]))  # all right
    assert m.end("train") == pytest.approx(1.0)
