"""Checkpoints anyone can hand you (issue 9).

Every hostile file here is written with nnh's own writer (``save_checkpoint``): it passes
``torch.load(weights_only=True)``, the header check and the checksums, exactly as an attacker
who knows the format would make it. What must stop it are the type checks and the ownership
rules.
"""

from __future__ import annotations

import functools
import math
import os
import random
import re
import subprocess
import sys
import textwrap
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from models import MLP, ScaledCrossEntropy, accuracy, classification_data, smoothed_cross_entropy
from torch import nn

from nnh import NNHandler
from nnh.callbacks import ModelCheckpoint
from nnh.checkpoint import CheckpointError, KeyMismatchWarning, load_checkpoint, save_checkpoint
from nnh.checkpoint.ownership import read_run_id
from nnh.handler.persistence import handler_payload

PY = sys.executable
SRC = str(Path(__file__).resolve().parents[1] / "src")


def make_handler(**kw) -> NNHandler:
    torch.manual_seed(0)
    h = NNHandler(MLP, model_type="classification")
    h.set_optimizer(torch.optim.Adam, lr=1e-2)
    h.set_loss_fn(kw.pop("loss", nn.functional.cross_entropy))
    h.set_train_loader(classification_data(64), batch_size=kw.pop("batch_size", 16), shuffle=True)
    return h


def hostile(tmp_path: Path, edit, name: str = "hostile.pth") -> Path:
    """A checkpoint written by nnh's own writer, then edited by ``edit(payload)``."""
    h = make_handler()
    h.train(1, progress_bar=False)
    payload = handler_payload(h)
    edit(payload)
    return save_checkpoint(payload, tmp_path / name, sign=False)  # a stranger's: not signed with our key


# ------------------------------------------------------------------ 1. nothing named is called
MARKER_CASES = {
    "callback os.system": lambda p, m: p.update(
        callbacks=[{"class": "os.system", "config": {"command": f"touch {m}"}, "state": {}}]
    ),
    "callback subprocess.check_call": lambda p, m: p.update(
        callbacks=[{"class": "subprocess.check_call", "config": {"args": ["touch", str(m)]}, "state": {}}]
    ),
    "sde subprocess.getoutput": lambda p, m: p.update(
        sde={"class": "subprocess.getoutput", "config": {"cmd": f"touch {m}"}, "state": None}
    ),
    "sampler shutil.rmtree": lambda p, m: p.update(
        sampler={"class": "shutil.rmtree", "config": {"path": str(m.parent / "victim")}, "state": None}
    ),
    "callback non-stdlib function": lambda p, m: p.update(
        callbacks=[{"class": "nnh.checkpoint.atomic.atomic_write_text",
                    "config": {"text": "x", "path": str(m)}, "state": {}}]
    ),
    "sampler class of the wrong kind": lambda p, m: p.update(
        sampler={"class": "nnh.callbacks.CSVLogger", "config": {"filename": str(m)}, "state": None}
    ),
    "loss shutil.rmtree": lambda p, m: p["loss"].update(fn="shutil.rmtree"),
    "loss partial of os.system": lambda p, m: p["loss"].update(
        fn={"kind": "partial", "function": "os.system", "args": [f"touch {m}"], "keywords": {}}
    ),
    "loss module record naming a function": lambda p, m: p["loss"].update(
        fn={"kind": "module", "class": "torch.save", "options": {}, "state_dict": {}}
    ),
    "metric builtins.eval": lambda p, m: p.update(metrics={"acc": "builtins.eval"}),
    "loss torch.save": lambda p, m: p["loss"].update(fn="torch.save"),
    "metric torch.hub.load": lambda p, m: p.update(metrics={"acc": "torch.hub.load"}),
    "metric non-function torch object": lambda p, m: p.update(metrics={"acc": "torch.nn.Linear"}),
    "optimizer subprocess.Popen": lambda p, m: p["optimizer"].update(**{"class": "subprocess.Popen"}),
    "scheduler that is an optimizer": lambda p, m: p.update(
        scheduler={"class": "torch.optim.SGD", "kwargs": {}, "state_dict": {}}
    ),
    "model os.system": lambda p, m: p["model"].update(**{"class": "os.system"}),
    "model that is not a module": lambda p, m: p["model"].update(**{"class": "torch.optim.SGD"}),
}  # fmt: skip


def own(tmp_path: Path, edit, name: str = "own.pth") -> Path:
    """Like :func:`hostile`, but signed with this user's key: an own file, whose names are
    vouched for (and still type-checked)."""
    h = make_handler()
    h.train(1, progress_bar=False)
    payload = handler_payload(h)
    edit(payload)
    return save_checkpoint(payload, tmp_path / name)


def _load_and_train(path: Path) -> None:
    """Load a file and, if it loaded, train one epoch when it can (as a user would)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            h = NNHandler.load(str(path))
        except CheckpointError:
            return
        if h._adapter is not None and h._loss_fn is not None and h._train_loader is not None:
            h.train(1, progress_bar=False)


@pytest.mark.parametrize("case", sorted(MARKER_CASES))
def test_a_foreign_file_naming_something_else_runs_nothing(tmp_path, case):
    """A stranger's file: names outside the registry are dropped (or refused), never used."""
    marker = tmp_path / "marker"
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    path = hostile(tmp_path, lambda p: MARKER_CASES[case](p, marker))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            NNHandler.load(str(path))
        except CheckpointError as err:
            assert err.kind == "untrusted" and str(path) in str(err)
        else:
            assert any("not signed with your key" in str(w.message) for w in caught)
    _load_and_train(path)
    assert not marker.exists()
    assert (victim / "keep.txt").read_text() == "precious"


@pytest.mark.parametrize("case", sorted(MARKER_CASES))
def test_an_own_file_naming_something_else_is_refused_before_anything_runs(tmp_path, case):
    """Your own file (signed): its names are imported, but each must still fit its slot."""
    marker = tmp_path / "marker"
    path = own(tmp_path, lambda p: MARKER_CASES[case](p, marker))
    with pytest.raises(CheckpointError) as info:
        NNHandler.load(str(path))
    assert info.value.kind == "untrusted"
    assert str(path) in str(info.value)
    assert not marker.exists()


def test_untrusted_error_names_the_record_and_what_was_found(tmp_path):
    path = own(tmp_path, lambda p: p.update(
        callbacks=[{"class": "os.system", "config": {"command": "true"}, "state": {}}]))  # fmt: skip
    with pytest.raises(CheckpointError, match=r"callbacks\[0\]\.class.*os\.system.*standard library"):
        NNHandler.load(str(path))


def test_dropped_records_are_named_once_with_the_way_to_restore_them(tmp_path):
    path = hostile(tmp_path, lambda p: p.update(
        callbacks=[{"class": "mypkg.MyCallback", "config": {}, "state": {}}],
        metrics={"acc": {"kind": "function", "function": "models.accuracy"}}))  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        h = NNHandler.load(str(path))
    messages = [str(w.message) for w in caught if "not signed with your key" in str(w.message)]
    assert len(messages) == 1
    assert "callbacks[0].class" in messages[0] and "'mypkg.MyCallback'" in messages[0]
    assert "trusted=[" in messages[0] and "trust_modules=" in messages[0]
    assert h._callbacks == [] and h._metrics == {}
    # the user vouches: the metric comes back
    again = NNHandler.load(str(path), trusted=[accuracy])
    assert again._metrics == {"acc": accuracy}
    assert NNHandler.load(str(path), trust_modules=("models",))._metrics == {"acc": accuracy}


# ------------------------------------------------------------------ 2. nnh deletes only its own files
def test_stored_paths_cannot_make_nnh_delete_or_replace_unrelated_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the save folders below are relative: under the working folder
    precious = tmp_path / "thesis.txt"
    precious.write_text("years of work")
    other_run = tmp_path / "other" / "best.pth"
    other = make_handler()
    other.save(str(other_run))  # an nnh checkpoint of another run
    before = other_run.read_bytes()
    ckpt = tmp_path / "ckpt"

    def edit(p):
        p["auto_saver"].update(interval=1, save_path="ckpt", name="e{epoch}", overwrite=True,
                               last_saved=str(precious))  # fmt: skip
        p["callbacks"] = [
            {
                "class": "nnh.callbacks.model_checkpoint.ModelCheckpoint",
                "config": {"dirpath": "ckpt", "filename": "best{epoch}", "monitor": "loss"},
                "state": {"best_score": float("inf"), "best_path": str(other_run),
                          "saved": [str(precious), str(other_run)]},
            }
        ]  # fmt: skip

    h = NNHandler.load(str(hostile(tmp_path, edit)))
    h.train(2, progress_bar=False)
    assert precious.read_text() == "years of work"
    assert other_run.read_bytes() == before
    assert sorted(p.name for p in ckpt.iterdir()) == ["best3.pth", "e3.pth"]  # own files rotate


def test_automatic_save_from_a_file_never_replaces_a_file_it_did_not_write(tmp_path):
    """Even your own file (paths kept) never makes an automatic save replace a file that is
    not a checkpoint of this run."""
    precious = tmp_path / "model.pth"
    precious.write_text("not a checkpoint, and not nnh's to replace")

    def edit(p):
        p["auto_saver"].update(interval=1, save_path=str(tmp_path), name="model")

    h = NNHandler.load(str(own(tmp_path, edit)))
    with pytest.raises(CheckpointError) as info:
        h.train(1, progress_bar=False)
    assert info.value.kind == "not_owned" and str(precious) in str(info.value)
    assert precious.read_text().startswith("not a checkpoint")
    h.auto_save(1, save_path=str(tmp_path), name="model")  # the user confirms: now it may
    h.train(1, progress_bar=False)
    assert read_run_id(precious) == h._run_id


@pytest.mark.parametrize("who", ["auto_saver", "ModelCheckpoint", "CSVLogger", "logging"])
def test_a_foreign_file_cannot_choose_a_path_outside_the_working_folder(tmp_path, monkeypatch, who):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    target = tmp_path / "site-packages"  # outside the working folder
    target.mkdir()
    victim = target / "victim.log"
    victim.write_text("precious")

    def edit(p):
        if who == "auto_saver":
            p["auto_saver"].update(interval=1, save_path=str(target), name="evil")
        elif who == "CSVLogger":
            p["callbacks"] = [{"class": "nnh.callbacks.CSVLogger",
                               "config": {"filename": str(victim), "separator": ";"}, "state": {}}]
        elif who == "logging":
            p["logging"] = {"mode": "file", "filename": str(victim), "level": 20}
        else:
            p["callbacks"] = [{"class": "nnh.callbacks.ModelCheckpoint",
                               "config": {"dirpath": "../site-packages", "filename": "evil",
                                          "monitor": None, "save_last": True},
                               "state": {"best_score": 0.0, "best_path": None, "saved": []}}]  # fmt: skip

    path = hostile(tmp_path, edit)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        h = NNHandler.load(str(path))
    # the warning names the refused field or its value (long tmp paths shorten the message)
    said = [str(w.message) for w in caught]
    assert any("site-packages" in m or who in m for m in said), said
    h.train(1, progress_bar=False)
    assert sorted(p.name for p in target.iterdir()) == ["victim.log"]
    assert victim.read_text() == "precious"


def test_file_names_with_folders_are_refused(tmp_path):
    h = make_handler()
    with pytest.raises(ValueError, match="file name"):
        h.auto_save(1, save_path=str(tmp_path), name="../escape_{epoch}")
    with pytest.raises(ValueError, match="file name"):
        ModelCheckpoint(str(tmp_path), filename="sub/best_{epoch}")


def test_resumed_run_keeps_rotating_its_own_files(tmp_path):
    h = make_handler()
    h.auto_save(1, save_path=str(tmp_path), name="e{epoch}", overwrite=True)
    h.train(2, progress_bar=False)
    assert [p.name for p in tmp_path.iterdir()] == ["e2.pth"]
    again = NNHandler.load(str(tmp_path / "e2.pth"))
    again.train(1, progress_bar=False)  # same run: its previous file is its own to delete
    assert [p.name for p in tmp_path.iterdir()] == ["e3.pth"]


# ------------------------------------------------------------------ 3. corruption is caught
def _tensor_regions(path: Path) -> list[tuple[int, int]]:
    regions = []
    with zipfile.ZipFile(path) as zf, open(path, "rb") as fh:
        for info in zf.infolist():
            if "/data/" not in info.filename or info.file_size == 0:
                continue
            fh.seek(info.header_offset + 26)
            name_len, extra_len = int.from_bytes(fh.read(2), "little"), int.from_bytes(fh.read(2), "little")
            start = info.header_offset + 30 + name_len + extra_len
            regions.append((start, info.file_size))
    return regions


def test_one_flipped_bit_anywhere_in_tensor_data_is_caught(tmp_path):
    h = make_handler()
    h.train(1, progress_bar=False)
    good = tmp_path / "good.pth"
    h.save(str(good))
    data = good.read_bytes()
    regions = _tensor_regions(good)
    assert regions
    rng = random.Random(0)
    for trial in range(20):
        start, size = rng.choice(regions)
        offset, bit = start + rng.randrange(size), rng.randrange(8)
        damaged = bytearray(data)
        damaged[offset] ^= 1 << bit
        bad = tmp_path / f"bad{trial}.pth"
        bad.write_bytes(bytes(damaged))
        with pytest.raises(CheckpointError) as info:
            NNHandler.load(str(bad))
        assert info.value.kind == "corrupt" and str(bad) in str(info.value), trial
    NNHandler.load(str(good))  # the intact file still loads


# ------------------------------------------------------------------ 4. missing weights are reported
def test_missing_and_unexpected_weights_are_always_reported(tmp_path):
    def edit(p):
        del p["model_state_dict"]["net.4.weight"]
        p["model_state_dict"]["net.9.bias"] = torch.zeros(3)

    path = hostile(tmp_path, edit)
    with pytest.warns(KeyMismatchWarning) as record:
        NNHandler.load(str(path))  # default strict_load=False
    message = str(record[0].message)
    assert "net.4.weight" in message and "net.9.bias" in message and str(path) in message
    with pytest.raises(CheckpointError, match=r"net\.4\.weight[\s\S]*net\.9\.bias"):
        NNHandler.load(str(path), strict_load=True)


# ------------------------------------------------------------------ 5. no non-finite state is written
class NaNAfter:
    """A loss that turns NaN after ``after`` calls (counting from construction)."""

    def __init__(self, after: int):
        self.after, self.calls = after, 0

    def __call__(self, out, target):
        self.calls += 1
        loss = nn.functional.cross_entropy(out, target)
        return loss * float("nan") if self.calls > self.after else loss


def test_a_nan_never_replaces_the_last_good_recovery_file(tmp_path):
    loss = NaNAfter(after=4 + 1)  # epoch 1: 4 batches; NaN from the 2nd batch of epoch 2
    h = make_handler(loss=loss)
    h.auto_save(1, save_path=str(tmp_path), name="run_{epoch}", every_n_steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the lambda-free loss object is not importable
        h.train(1, progress_bar=False)
    step = h.auto_saver.step_path()
    with pytest.warns(UserWarning, match="not finite"), pytest.raises(FloatingPointError):
        h.train(1, progress_bar=False)
    payload = load_checkpoint(step)
    assert all(torch.isfinite(t).all() for t in payload["model_state_dict"].values())
    assert (payload["resume"]["epoch"], payload["resume"]["batch_offset"]) == (1, 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["run_1.pth", step.name])


def test_explicit_save_of_a_non_finite_state_is_refused_and_keeps_the_old_file(tmp_path):
    h = make_handler()
    path = tmp_path / "model.pth"
    h.save(str(path))
    before = path.read_bytes()
    with torch.no_grad():
        h.module.net[0].weight[0, 0] = float("inf")
    with pytest.raises(CheckpointError, match=r"net\.0\.weight") as info:
        h.save(str(path))
    assert info.value.kind == "non_finite" and path.read_bytes() == before


# ------------------------------------------------------------------ 6. one recovery file per name
def test_two_runs_with_different_names_never_share_a_recovery_file(tmp_path):
    paths = []
    for suffix in "AB":
        h = make_handler()
        h.auto_save(1, save_path=str(tmp_path), name=f"exp_{{epoch}}_{suffix}", every_n_steps=2)
        h.train(1, progress_bar=False)
        paths.append(h.auto_saver.step_path())
    assert paths[0] != paths[1] and all(p.exists() for p in paths)
    assert read_run_id(paths[0]) != read_run_id(paths[1])


# ------------------------------------------------------------------ 7. a trusted load never runs the script
SCRIPT = """
import sys
import torch
from torch import nn
from nnh import NNHandler

HIDDEN = 5

def act(x):
    return torch.tanh(x)

class Net(nn.Module):
    def __init__(self, d=3):
        super().__init__()
        self.lin = nn.Linear(d, HIDDEN)

    def forward(self, x):
        return act(self.lin(x))

with open(sys.argv[2], "a") as log:
    log.write("script ran\\n")
h = NNHandler(Net, save_model_code=True, model_type="regression")
h.save(sys.argv[1])
"""


def test_trusted_load_of_a_script_class_never_reruns_the_script(tmp_path):
    script, ckpt, log = tmp_path / "train.py", tmp_path / "net.pth", tmp_path / "runs.log"
    script.write_text(textwrap.dedent(SCRIPT))
    env = {**os.environ, "PYTHONPATH": SRC}
    subprocess.run([PY, str(script), str(ckpt), str(log)], check=True, env=env, capture_output=True)
    assert log.read_text() == "script ran\n"
    with pytest.raises(CheckpointError, match="trust_model_code=True"):
        NNHandler.load(str(ckpt))
    h = NNHandler.load(str(ckpt), trust_model_code=True)
    assert log.read_text() == "script ran\n"  # the script's top level did not run again
    out = h(torch.zeros(2, 3))
    assert out.shape == (2, 5) and torch.equal(out, torch.tanh(h.module.lin(torch.zeros(2, 3))))


# ------------------------------------------------------------------ 8. losses and metrics as objects
LOSSES = {
    "CrossEntropyLoss(label_smoothing=0.2)": lambda: nn.CrossEntropyLoss(label_smoothing=0.2),
    "CrossEntropyLoss(weight=...)": lambda: nn.CrossEntropyLoss(
        weight=torch.tensor([1.0, 2.0, 0.5]), ignore_index=-3, reduction="sum"
    ),
    "partial of a function": lambda: functools.partial(smoothed_cross_entropy, smoothing=0.1),
    "user module": lambda: ScaledCrossEntropy(scale=0.5),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_objects_survive_save_and_load_and_train(tmp_path, name):
    loss = LOSSES[name]()
    if isinstance(loss, ScaledCrossEntropy):
        loss.class_weight.copy_(torch.tensor([0.2, 1.0, 3.0]))
        loss.note = "tuned"
    h = make_handler(loss=loss)
    h.add_metric("accuracy", accuracy)
    h.add_metric("ce", nn.CrossEntropyLoss(label_smoothing=0.05))
    path = tmp_path / "run.pth"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning on save ...
        h.save(str(path))
        again = NNHandler.load(str(path))  # ... nor on load
    restored = again._loss_fn
    assert type(restored) is type(loss)
    if isinstance(loss, functools.partial):
        assert restored.func is loss.func and restored.keywords == loss.keywords
    else:
        for key, value in vars(loss).items():
            if not key.startswith("_") and key != "training":
                assert getattr(restored, key) == value, key
        for key, value in loss.state_dict().items():
            assert torch.equal(restored.state_dict()[key], value), key
    assert again._metrics["ce"].label_smoothing == 0.05
    x, y = classification_data(16)[:]
    out = again.module.eval()(x)
    assert torch.equal(restored(out, y), loss(out, y))
    again.train(1, progress_bar=False)  # the seed's "load and resume training" works
    assert len(again.train_losses) == 1 and math.isfinite(again.train_losses[0])


# ------------------------------------------------------------------ 9. clear errors
@pytest.mark.parametrize(
    "edit, section",
    [
        (lambda p: p.pop("model"), "model"),
        (lambda p: p.pop("rng"), "rng"),
        (lambda p: p.update(history=[1, 2, 3]), "history"),
        (lambda p: p["model"].pop("kwargs"), "model"),
        (lambda p: p.update(callbacks={"not": "a list"}), "callbacks"),
        (lambda p: p.update(train_state={"counters": {"epoch": "one"}}), "train_state"),
        (lambda p: p.update(rng={"torch": torch.zeros(3), "python": (1, 2)}), "rng"),
        (lambda p: p.update(history={"train_losses": 5}), "history"),
        (lambda p: p["callbacks"].append({"class": "nnh.callbacks.EpochTimer",
                                          "config": {"bogus": 1}, "state": {}}), "callbacks[0]"),
        (lambda p: p.update(target_epoch="ten"), "target_epoch"),
        (lambda p: p["run"].update(resumed_at=["x"]), "run.resumed_at"),
    ],
)
def test_damaged_sections_are_named(tmp_path, edit, section):
    path = hostile(tmp_path, edit)
    with pytest.raises(CheckpointError, match=rf"(section|record) '{re.escape(section)}") as info:
        NNHandler.load(str(path))
    assert info.value.kind == "damaged" and str(path) in str(info.value)


def test_full_disk_is_named_and_keeps_the_previous_file(tiny_disk):
    small = NNHandler(nn.Linear, in_features=4, out_features=2, model_type="regression")
    path = tiny_disk / "model.pth"
    small.save(str(path))
    before = path.read_bytes()
    big = NNHandler(nn.Linear, in_features=1024, out_features=1024, model_type="regression")
    with pytest.raises(CheckpointError, match="no space left on device") as info:
        big.save(str(path))
    assert info.value.kind == "disk_full" and str(path) in str(info.value)
    assert path.read_bytes() == before
    assert [p.name for p in tiny_disk.iterdir()] == ["model.pth"]  # no partial file


def test_file_size_limit_is_named(tmp_path):
    code = textwrap.dedent(
        f"""
        import resource, sys
        from torch import nn
        from nnh import NNHandler
        from nnh.checkpoint import CheckpointError
        resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        h = NNHandler(nn.Linear, in_features=1024, out_features=1024, model_type="regression")
        try:
            h.save({str(tmp_path / "model.pth")!r})
        except CheckpointError as err:
            print(err.kind, "|", err)
        """
    )
    out = subprocess.run([PY, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": SRC})
    assert out.stdout.startswith("file_too_large |"), out.stdout + out.stderr
    assert "file-size limit" in out.stdout and "model.pth" in out.stdout


def test_resuming_a_step_checkpoint_with_another_batch_size_is_an_error(tmp_path):
    h = make_handler(batch_size=8)
    h.auto_save(None, save_path=str(tmp_path), name="run", every_n_steps=3)
    h.train(1, progress_bar=False)
    again = NNHandler.load(str(h.auto_saver.step_path()))
    again.set_train_loader(classification_data(64), batch_size=32, shuffle=True)
    with pytest.raises(CheckpointError, match="batch_size=8") as info:
        again.resume_training()
    assert info.value.kind == "batch_size" and len(again.train_losses) == 0


def test_auto_save_names_that_can_never_be_filled_fail_at_configuration(tmp_path):
    h = make_handler()
    with pytest.raises(ValueError, match="step"):
        h.auto_save(1, save_path=str(tmp_path), name="m_{step}")
    with pytest.raises(ValueError, match="val_loss"):
        h.auto_save(1, save_path=str(tmp_path), name="m_{val_loss:.3f}")
    h.set_val_loader(classification_data(32, seed=1), batch_size=16)
    h.auto_save(1, save_path=str(tmp_path), name="m_{val_loss:.3f}")  # now it can be filled


def test_hostile_files_do_not_change_a_good_file_loading(tmp_path):
    """Sanity: the same pipeline on an unedited payload loads and trains."""
    path = hostile(tmp_path, lambda p: None)
    h = NNHandler.load(str(path))
    h.train(1, progress_bar=False)
    assert len(h.train_losses) == 2 and math.isfinite(h.train_losses[-1])


def test_standard_library_names_are_refused_without_importing_them(tmp_path):
    assert "this" not in sys.modules  # importing it prints the Zen of Python: an import side effect
    path = own(tmp_path, lambda p: p.update(
        sampler={"class": "this.Sampler", "config": {}, "state": None}))  # fmt: skip
    with pytest.raises(CheckpointError, match="standard library") as info:
        NNHandler.load(str(path))
    assert info.value.kind == "untrusted" and "this" not in sys.modules


def test_mid_epoch_resume_with_the_loaders_own_generator_is_bitwise(tmp_path):
    """A train loader with its own ``generator=``: the step checkpoint replays its shuffle."""

    def build() -> NNHandler:
        torch.manual_seed(0)
        h = NNHandler(MLP, dropout=0.0)
        h.set_optimizer(torch.optim.Adam, lr=1e-2)
        h.set_loss_fn(nn.functional.cross_entropy)
        h.set_train_loader(classification_data(64), batch_size=8, shuffle=True,
                           generator=torch.Generator().manual_seed(7))  # fmt: skip
        return h

    straight = build()
    straight.train(2, progress_bar=False)
    run = build()
    run.auto_save(None, save_path=str(tmp_path), name="run", every_n_steps=3)
    run.train(1, progress_bar=False)
    run.train(1, progress_bar=False)
    again = NNHandler.load(str(run.auto_saver.step_path()))
    assert again._resume["epoch"] == 2 and again._resume["batch_offset"] == 6  # mid-epoch
    again.resume_training()
    for key, value in straight.module.state_dict().items():
        assert torch.equal(again.module.state_dict()[key], value), key
