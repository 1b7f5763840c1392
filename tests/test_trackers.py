"""MLflowLogger and WandbLogger against the real libraries: a local MLflow file store read back
through MlflowClient, and W&B offline run files read back record by record."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from models import Regressor, regression_data
from torch import nn

from nnh import NNHandler
from nnh.callbacks import MLflowLogger, WandbLogger

mlflow_tracking = pytest.importorskip("mlflow.tracking")
pytest.importorskip("wandb")


def regressor(tmp_path: Path) -> NNHandler:
    """A linear regressor with a validation set, an MAE metric and auto-saves every epoch."""
    torch.manual_seed(0)
    h = NNHandler(Regressor, model_type="regression", d_in=4)
    h.set_optimizer(torch.optim.SGD, lr=0.05, momentum=0.5)
    h.set_loss_fn(nn.functional.mse_loss)
    h.set_train_loader(regression_data(30), batch_size=10)
    h.set_val_loader(regression_data(20, seed=1), batch_size=10)
    h.add_metric("mae", nn.functional.l1_loss)
    h.auto_save(1, save_path=str(tmp_path / "ckpt"), name="run_{epoch:02d}")
    return h


def expected_history(h: NNHandler) -> dict[str, list[float]]:
    return {
        "loss": h.train_losses,
        "val_loss": h.val_losses,
        "mae": h.train_metrics_history["mae"],
        "val_mae": h.val_metrics_history["mae"],
    }


# ---------------------------------------------------------------------------- MLflow
@pytest.fixture(scope="module")
def mlflow_run(tmp_path_factory):
    """Two epochs, a checkpoint, a resume from it with two more epochs (one run for all tests)."""
    tmp = tmp_path_factory.mktemp("mlflow")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = "file:" + str(tmp / "mlruns")
    h = regressor(tmp)
    logger = MLflowLogger(tracking_uri=uri, experiment_name="trackers", run_name="first")
    h.add_callback(logger)
    h.train(epochs=2, progress_bar=False)
    first_id = logger.run_id
    h2 = NNHandler.load(str(tmp / "ckpt" / "run_02.pth"))
    (restored,) = [cb for cb in h2.callbacks if isinstance(cb, MLflowLogger)]
    h2.train(epochs=2, progress_bar=False)
    client = mlflow_tracking.MlflowClient(tracking_uri=uri)
    yield {"h": h2, "first_id": first_id, "restored": restored, "client": client, "tmp": tmp}
    mp.undo()


def test_mlflow_metrics_equal_the_history_with_epochs_as_steps(mlflow_run):
    h, client, run_id = mlflow_run["h"], mlflow_run["client"], mlflow_run["first_id"]
    for key, values in expected_history(h).items():
        logged = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        assert [m.step for m in logged] == [1, 2, 3, 4], key
        assert [m.value for m in logged] == values, key
    lrs = client.get_metric_history(run_id, "lr")
    assert sorted(m.step for m in lrs) == [1, 2, 3, 4]
    assert {m.value for m in lrs} == {0.05}


def test_mlflow_params_hold_model_optimizer_and_train_options(mlflow_run):
    run = mlflow_run["client"].get_run(mlflow_run["first_id"])
    params = run.data.params
    assert params["model.class"] == f"{Regressor.__module__}.Regressor"
    assert params["model.d_in"] == "4"
    assert params["optimizer.class"] == "torch.optim.sgd.SGD"
    assert params["optimizer.lr"] == "0.05" and params["optimizer.momentum"] == "0.5"
    assert params["train.epochs"] == "2" and params["train.start_epoch"] == "0"
    assert params["loss_fn"].endswith("mse_loss")
    assert run.info.status == "FINISHED"


def test_mlflow_resumed_run_continues_the_same_run_and_logs_checkpoints(mlflow_run):
    client, run_id = mlflow_run["client"], mlflow_run["first_id"]
    assert mlflow_run["restored"].run_id == run_id
    experiment = client.get_experiment_by_name("trackers")
    assert len(client.search_runs([experiment.experiment_id])) == 1
    tags = client.get_run(run_id).data.tags
    assert tags["checkpoint_path"] == str(mlflow_run["tmp"] / "ckpt" / "run_04.pth")
    saved = client.get_metric_history(run_id, "checkpoint_epoch")
    assert sorted((m.step, m.value) for m in saved) == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)]


# ---------------------------------------------------------------------------- W&B
def wandb_records(path: Path):
    """The protobuf records of a ``.wandb`` file (W&B's LevelDB-style log: a 7-byte file
    header, then 32 KiB blocks of records, each with a 7-byte header, split across blocks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, chunk = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(chunk)
            chunk = b""
            yield record


def wandb_contents(run_dir: Path) -> dict:
    """``{"id", "history": {step: {key: value}}, "config": {...}, "summary": {...}}``."""
    (file,) = run_dir.glob("run-*.wandb")
    out: dict = {"history": {}, "config": {}, "summary": {}}
    for record in wandb_records(file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["id"] = record.run.run_id
        elif kind == "history":
            row = {
                i.key or "/".join(i.nested_key): json.loads(i.value_json)
                for i in record.history.item
            }
            out["history"][record.history.step.num] = row
        elif kind == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "summary":
            for i in record.summary.update:
                out["summary"][i.key or "/".join(i.nested_key)] = json.loads(i.value_json)
    return out


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory):
    """Two epochs, then a resume from the epoch-2 checkpoint with one more (offline mode)."""
    tmp = tmp_path_factory.mktemp("wandb")
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_SILENT", "true")
    h = regressor(tmp)
    logger = WandbLogger(project="nnh-tests", dir=str(tmp / "wb"))
    h.add_callback(logger)
    h.train(epochs=2, progress_bar=False)
    first_id = logger.run_id
    h2 = NNHandler.load(str(tmp / "ckpt" / "run_02.pth"))
    (restored,) = [cb for cb in h2.callbacks if isinstance(cb, WandbLogger)]
    h2.train(epochs=1, progress_bar=False)
    runs = sorted((tmp / "wb" / "wandb").glob("offline-run-*"))
    yield {"h": h, "h2": h2, "first_id": first_id, "restored": restored, "runs": runs, "tmp": tmp}
    mp.undo()


def test_wandb_offline_history_holds_the_values_with_epochs_as_steps(wandb_run):
    first = wandb_contents(wandb_run["runs"][0])
    assert first["id"] == wandb_run["first_id"]
    assert sorted(first["history"]) == [1, 2]
    for key, values in expected_history(wandb_run["h"]).items():
        assert [first["history"][s][key] for s in (1, 2)] == values[:2], key
    assert [first["history"][s]["lr"] for s in (1, 2)] == [0.05, 0.05]
    assert first["config"]["optimizer.class"] == "torch.optim.sgd.SGD"
    assert first["config"]["model.d_in"] == 4
    assert first["config"]["train.epochs"] == 2
    assert first["summary"]["checkpoint_path"] == str(wandb_run["tmp"] / "ckpt" / "run_02.pth")


def test_wandb_resumed_run_continues_the_same_id(wandb_run):
    assert wandb_run["restored"].run_id == wandb_run["first_id"]
    assert len(wandb_run["runs"]) == 2
    second = wandb_contents(wandb_run["runs"][1])
    assert second["id"] == wandb_run["first_id"]
    h2 = wandb_run["h2"]
    assert second["history"][3]["loss"] == h2.train_losses[2]
    assert second["history"][3]["val_mae"] == h2.val_metrics_history["mae"][2]


# ---------------------------------------------------------------------------- both
def test_trackers_check_their_arguments():
    with pytest.raises(ValueError, match="mode must be one of"):
        WandbLogger(mode="online!")
    with pytest.raises(ValueError, match=r"sets wandb.init's 'id' itself"):
        WandbLogger(id="abc")
    with pytest.raises(ValueError, match="experiment_name must be a non-empty string"):
        MLflowLogger(experiment_name="")
    with pytest.raises(ValueError, match="run_id must be an MLflow run id"):
        MLflowLogger().load_state_dict({"run_id": "../../etc"})
    with pytest.raises(ValueError, match="run_id must be a W&B run id"):
        WandbLogger().load_state_dict({"run_id": "a b"})


def test_importing_nnh_imports_no_tracker_and_a_missing_one_names_the_extra():
    code = (
        "import sys, nnh, nnh.callbacks\n"
        "assert 'mlflow' not in sys.modules and 'wandb' not in sys.modules, 'imported'\n"
        "import importlib.util as u\n"
        "real = u.find_spec\n"
        "u.find_spec = lambda name, *a: None if name in ('mlflow', 'wandb') else real(name, *a)\n"
        "for cls, extra in ((nnh.callbacks.MLflowLogger, 'mlflow'), (nnh.callbacks.WandbLogger, 'wandb')):\n"
        "    try:\n"
        "        cls()\n"
        "    except ImportError as e:\n"
        "        assert f'pip install nnh[{extra}]' in str(e), e\n"
        "    else:\n"
        "        raise SystemExit('no ImportError')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_trackers_are_not_in_the_registry_but_check_their_arguments():
    """A file that is not yours cannot bring a tracker (it could point your metrics at any
    server or folder); your own signed files restore them (the resume tests above)."""
    from nnh.checkpoint import CheckpointError
    from nnh.checkpoint.registry import check_arguments, lookup

    assert lookup("nnh.callbacks.MLflowLogger", "callback") is None
    assert lookup("nnh.callbacks.WandbLogger", "callback") is None
    assert lookup("nnh.callbacks.CSVLogger", "callback") is not None
    ok = {"tracking_uri": "file:/tmp/m", "experiment_name": "e", "run_name": None}
    assert check_arguments(MLflowLogger, ok, record="callback") == ok
    with pytest.raises(CheckpointError, match="experiment_name"):
        check_arguments(MLflowLogger, {"experiment_name": 3}, record="callback")
    with pytest.raises(CheckpointError, match="not accepted"):  # no wandb.init arguments from files
        check_arguments(WandbLogger, {"entity": "someone"}, record="callback")
    assert WandbLogger(mode="disabled", dir="d", name="n").config() == {
        "project": None,
        "mode": "disabled",
        "dir": "d",
    }


def test_trackers_run_on_rank_zero_only():
    from nnh.callbacks import CallbackList

    for logger in (MLflowLogger(), WandbLogger(mode="disabled")):
        others = CallbackList([logger], is_main=False)
        assert not any(others.wants(hook) for hook in ("on_train_begin", "on_epoch_end"))
        assert CallbackList([logger], is_main=True).wants("on_epoch_end")


def test_a_file_that_is_not_yours_cannot_bring_a_tracker(tmp_path):
    """An unsigned copy of a file holding an MLflowLogger loads without it, with a warning:
    its tracking URI would otherwise send the next run's settings and metrics anywhere."""
    from nnh.checkpoint import save_checkpoint
    from nnh.handler.persistence import handler_payload

    h = regressor(tmp_path)
    h.add_callback(MLflowLogger(tracking_uri="http://attacker.example", experiment_name="x"))
    own = tmp_path / "own.pth"
    h.save(str(own))
    foreign = save_checkpoint(handler_payload(h), tmp_path / "foreign.pth", sign=False)
    with pytest.warns(UserWarning):
        loaded = NNHandler.load(str(foreign))
    assert not any(isinstance(cb, MLflowLogger) for cb in loaded.callbacks)
    vouched = NNHandler.load(str(foreign), trusted=[MLflowLogger])  # you vouch for the file
    assert any(isinstance(cb, MLflowLogger) for cb in vouched.callbacks)
    mine = NNHandler.load(str(own))
    assert any(isinstance(cb, MLflowLogger) for cb in mine.callbacks)
