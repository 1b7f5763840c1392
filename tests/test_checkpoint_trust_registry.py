"""Checkpoint trust, second round (issue 18): a file selects, it never supplies code or authority.

Hostile files are written with nnh's own writer without the user's key (a stranger's file),
exactly as an attacker who knows the format would make them. Each observation of the issue
is a test here (the save-side ones are in test_save_safety.py, the path and option
sanitisers in test_file_confinement.py).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from models import MLP, accuracy, classification_data
from torch import nn

from nnh import NNHandler
from nnh.checkpoint import CheckpointError, is_own, load_checkpoint, save_checkpoint
from nnh.checkpoint.ownership import read_run_id
from nnh.handler.persistence import handler_payload

SRC = str(Path(__file__).resolve().parents[1] / "src")


def trained(**kw) -> NNHandler:
    torch.manual_seed(0)
    h = NNHandler(MLP, model_type="classification", **kw)
    h.set_optimizer(torch.optim.Adam, lr=1e-2)
    h.set_loss_fn(nn.functional.cross_entropy)
    h.set_train_loader(classification_data(64), batch_size=16, shuffle=True)
    h.train(1, progress_bar=False)
    return h


def foreign(tmp_path: Path, edit, name: str = "foreign.pth") -> Path:
    payload = handler_payload(trained())
    edit(payload)
    return save_checkpoint(payload, tmp_path / name, sign=False)


def load_quietly(path: Path, **kw) -> NNHandler:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return NNHandler.load(str(path), **kw)


# 1. code at train(): a loss or metric outside the registry is never used --------------
DANGEROUS = [
    "sympy.core.sympify.sympify", "numpy.load", "torch.from_file", "torch.set_num_threads",
    "torch.save", "torch.hub.load", "builtins.eval", "os.system", "setuptools.spawn",
    "pip._internal.utils.subprocess.call_subprocess", "nnh.checkpoint.atomic.atomic_write_text",
    "torch.load", "torch.compile", "functools.partial",
]  # fmt: skip


@pytest.mark.parametrize("name", DANGEROUS)
@pytest.mark.parametrize("kind", ["function", "partial"])
def test_a_loss_outside_the_registry_is_dropped_not_called(tmp_path, name, kind):
    marker = tmp_path / "ran"
    source = f"open({str(marker)!r}, 'w').write('x')"

    def edit(p):
        rec = {"kind": "function", "function": name}
        if kind == "partial":
            rec = {"kind": "partial", "function": name, "args": [source, None, True, False],
                   "keywords": {}}  # fmt: skip
        p["loss"]["fn"] = rec
        p["metrics"] = {"acc": rec}

    h = load_quietly(foreign(tmp_path, edit))
    assert h._loss_fn is None and h._metrics == {}
    h.set_loss_fn(nn.functional.cross_entropy)
    h.train(1, progress_bar=False)
    assert not marker.exists()


def test_partial_of_a_registry_function_takes_only_its_own_keywords(tmp_path):
    ok = foreign(tmp_path, lambda p: p["loss"].update(fn={
        "kind": "partial", "function": "torch.nn.functional.cross_entropy", "args": [],
        "keywords": {"label_smoothing": 0.1}}))  # fmt: skip
    h = load_quietly(ok)
    assert h._loss_fn.keywords == {"label_smoothing": 0.1}
    for keywords, args in (({"label_smoothing": float("nan")}, []), ({"__class__": 1}, []),
                           ({}, ["x"]), ({"reduction": "evil"}, [])):  # fmt: skip
        bad = foreign(tmp_path, lambda p, k=keywords, a=args: p["loss"].update(fn={
            "kind": "partial", "function": "torch.nn.functional.cross_entropy", "args": a,
            "keywords": k}), name="bad.pth")  # fmt: skip
        with pytest.raises(CheckpointError) as info:
            NNHandler.load(str(bad))
        assert info.value.kind == "damaged"


# 2. torch.compile options from a file --------------------------------------------------
def test_compile_options_from_a_file_never_reach_torch_compile(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: seen.append(kw) or model)
    path = foreign(tmp_path, lambda p: p["model"].update(compile={
        "backend": "inductor", "mode": "default",
        "options": {"cpp.march": "native -wrapper '/bin/sh,-c,touch /tmp/x'"}}))  # fmt: skip
    with pytest.warns(UserWarning, match="options"):
        NNHandler.load(str(path))
    assert seen == [] or all("options" not in kw for kw in seen)


# 4, 5. ownership cannot be forged or shared ---------------------------------------------
def test_a_forged_run_id_cannot_make_the_victims_training_delete_its_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    victim = trained()
    victim.auto_save(1, save_path="ckpt", name="run_{epoch}", overwrite=False)
    victim.train(3, progress_bar=False)
    published = sorted((tmp_path / "ckpt").iterdir())
    assert len(published) == 3
    stolen = load_checkpoint(published[-1])["run"]["id"]
    before = {p.name: p.read_bytes() for p in published}

    def edit(p):
        p["run"] = {"id": stolen, "lineage": [stolen], "resumed_at": []}
        p["auto_saver"].update(interval=1, save_path="ckpt", name="run_{epoch}", overwrite=True,
                               last_saved=str(published[-1]))  # fmt: skip

    h = load_quietly(foreign(tmp_path, edit))
    assert str(h._run_id) != stolen
    try:
        h.train(3, progress_bar=False)
    except CheckpointError as err:
        assert err.kind == "not_owned"
    for p in published:
        assert p.read_bytes() == before[p.name]


def test_two_runs_loaded_from_one_file_never_replace_each_others_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    start = trained()
    start.auto_save(1, save_path="sweep", name="model", overwrite=True)
    start.save("pretrained.pth")
    a = NNHandler.load("pretrained.pth")
    b = NNHandler.load("pretrained.pth")
    assert str(a._run_id) != str(b._run_id)
    a.train(1, progress_bar=False)
    written = (tmp_path / "sweep" / "model.pth").read_bytes()
    with pytest.raises(CheckpointError) as info:
        b.train(1, progress_bar=False)
    assert info.value.kind == "not_owned"
    assert (tmp_path / "sweep" / "model.pth").read_bytes() == written
    assert read_run_id(tmp_path / "sweep" / "model.pth") == str(a._run_id)


def test_resuming_your_own_run_still_manages_its_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    h = trained()
    h.auto_save(1, save_path="ckpt", name="e{epoch}", overwrite=True)
    h.train(2, progress_bar=False)
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["e3.pth"]
    again = NNHandler.load("ckpt/e3.pth")
    again.train(1, progress_bar=False)
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["e4.pth"]  # rotated its own
    # files written by a guarded automatic save are signed too: still the user's own
    assert is_own(load_checkpoint(tmp_path / "ckpt" / "e4.pth")["integrity"])
    third = NNHandler.load("ckpt/e4.pth")
    assert str(again._run_id) in third._run_id.lineage


# 8. a damaged header ---------------------------------------------------------------------
def test_bytes_changed_after_the_format_marker_give_a_checkpoint_error(tmp_path):
    path = trained().save(str(tmp_path / "run.pth")) or tmp_path / "run.pth"
    data = bytearray(path.read_bytes())
    marker = data.find(b"nnh_format")
    assert marker > 0
    for offset in range(0, 40):
        damaged = bytearray(data)
        damaged[marker + 10 + offset] ^= 0x5A
        bad = tmp_path / f"bad{offset}.pth"
        bad.write_bytes(bytes(damaged))
        try:  # a flip that changes nothing the file means (a memo index) may load
            load_quietly(bad)
        except CheckpointError as err:
            assert err.kind in ("corrupt", "unsafe", "not_nnh", "bad_header", "damaged")
            assert "upgrade" not in str(err) and "weights_only=False" not in str(err)


# 9. bounded work before checks --------------------------------------------------------
def test_model_arguments_that_need_huge_memory_fail_before_any_allocation(tmp_path):
    def edit(p):
        p["model"]["kwargs"] = {"hidden": 100_000}
        p["model_state_dict"].pop(sorted(p["model_state_dict"])[0])

    path = foreign(tmp_path, edit)
    with pytest.raises(CheckpointError) as info:
        NNHandler.load(str(path))
    assert info.value.kind in ("mismatch", "too_large")


@pytest.mark.parametrize("size", [10**9, 2, None])
def test_the_ensemble_size_comes_from_the_weights(tmp_path, size):
    ensemble = trained(ensemble_size=3)
    payload = handler_payload(ensemble)
    assert payload["ensemble"]["size"] == 3
    if size is None:  # a single model's file claiming to be an ensemble
        payload = handler_payload(trained())
        payload["ensemble"] = {"size": 3, "member_history": None}
    else:
        payload["ensemble"]["size"] = size
    path = save_checkpoint(payload, tmp_path / "e.pth", sign=False)
    with pytest.raises(CheckpointError, match=r"ensemble\.size") as info:
        NNHandler.load(str(path))
    assert info.value.kind == "damaged"


def test_expanded_tensors_cannot_fake_a_large_model(tmp_path):
    def edit(p):
        w = p["model_state_dict"]
        key = sorted(w)[0]
        w[key] = torch.zeros(1).expand(*w[key].shape)

    with pytest.raises(CheckpointError) as info:
        NNHandler.load(str(foreign(tmp_path, edit)))
    assert info.value.kind == "damaged"


# 10. deep nesting ------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["history", "loss_kwargs"])
def test_deeply_nested_values_are_a_checkpoint_error(tmp_path, where):
    deep: list = []
    x = deep
    for _ in range(2000):
        x.append([])
        x = x[0]

    def edit(p):
        if where == "history":
            p["history"]["train_losses"] = deep
        else:
            p["loss"]["kwargs"] = {"weight": deep}

    payload = handler_payload(trained())
    edit(payload)
    from nnh.checkpoint.format import make_header

    path = tmp_path / "deep.pth"  # sealing would recurse too: an attacker writes it directly
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20_000)  # the pickler recurses; nnh's loader must not
    try:
        torch.save({**make_header(), **payload, "integrity": {"algorithm": "sum64-v1",
                    "tensors": {}, "digest": "0" * 64}}, path)  # fmt: skip
    finally:
        sys.setrecursionlimit(limit)
    with pytest.raises(CheckpointError) as info:
        NNHandler.load(str(path))
    assert info.value.kind in ("damaged", "corrupt")


# 11. loader options ----------------------------------------------------------------------
def test_loader_options_from_a_file_come_from_an_allowlist(tmp_path):
    def edit(p):
        p["data"]["train"]["loader_kwargs"].update(
            num_workers=100000, collate_fn="os.system", worker_init_fn="x"
        )

    h = load_quietly(foreign(tmp_path, edit))
    assert h._train_loader.num_workers <= 32
    assert h._train_loader.collate_fn is not os.system
    h.train(1, progress_bar=False)


# 12. foreign keys in state dicts and options ------------------------------------------
def test_scheduler_state_with_foreign_keys_is_refused_at_load(tmp_path):
    h = trained()
    h.set_scheduler(torch.optim.lr_scheduler.StepLR, step_size=2)
    payload = handler_payload(h)
    payload["scheduler"]["state_dict"]["optimizer"] = "x"
    path = save_checkpoint(payload, tmp_path / "s.pth", sign=False)
    with pytest.raises(CheckpointError) as info:
        NNHandler.load(str(path))
    assert info.value.kind == "damaged" and "scheduler" in str(info.value)


def test_loss_module_options_with_dunder_keys_are_refused(tmp_path):
    path = foreign(tmp_path, lambda p: p["loss"].update(fn={
        "kind": "module", "class": "torch.nn.modules.loss.CrossEntropyLoss",
        "options": {"__class__": "x", "reduction": "mean"}, "state_dict": {}}))  # fmt: skip
    h = load_quietly(path)  # the dunder key is not a constructor option: ignored, never set
    assert type(h._loss_fn) is nn.CrossEntropyLoss
    h.train(1, progress_bar=False)


def test_nan_learning_rate_in_a_file_is_refused_at_load(tmp_path):
    path = foreign(tmp_path, lambda p: p["optimizer"]["state_dict"]["param_groups"][0].update(
        lr=float("nan")))  # fmt: skip
    with pytest.raises(CheckpointError) as info:
        NNHandler.load(str(path))
    assert info.value.kind == "damaged" and "lr" in str(info.value)


# 13. __main__ segments and imports that exit ------------------------------------------
@pytest.mark.parametrize(
    "name", ["torch.utils.model_dump.__main__.X", "torch.utils.__main__", "this.Net"]
)
def test_model_class_paths_that_would_run_a_program_are_refused_without_importing(tmp_path, name):
    code = (
        "import sys, warnings; warnings.simplefilter('ignore')\n"
        "from nnh import NNHandler\nfrom nnh.checkpoint import CheckpointError\n"
        f"try:\n    NNHandler.load({str(tmp_path / 'm.pth')!r})\n"
        "except CheckpointError as e:\n    print('KIND', e.kind)\n"
        "print('IMPORTED', 'torch.utils.model_dump.__main__' in sys.modules or 'this' in sys.modules)\n"
    )
    foreign(tmp_path, lambda p: p["model"].update(**{"class": name}), name="m.pth")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": SRC + os.pathsep + str(Path(__file__).parent)},
                         timeout=120)  # fmt: skip
    assert "KIND untrusted" in out.stdout, out.stdout + out.stderr
    assert "IMPORTED False" in out.stdout


def test_an_import_that_exits_is_a_checkpoint_error(tmp_path, monkeypatch):
    pkg = tmp_path / "exiting_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise SystemExit(3)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = foreign(tmp_path, lambda p: p["model"].update(**{"class": "exiting_pkg.Net"}))
    with pytest.raises(CheckpointError) as info:
        NNHandler.load(str(path))
    assert info.value.kind == "not_importable"


# 14. resume offsets --------------------------------------------------------------------
@pytest.mark.parametrize("offset", [10**6, -3, 0, "x"])
def test_resume_offsets_out_of_range_are_refused(tmp_path, offset):
    h = trained()
    h.auto_save(1, save_path=str(tmp_path), name="r", every_n_steps=2)
    h.train(1, progress_bar=False)
    step = h.auto_saver.step_path()
    payload = load_checkpoint(step)
    for key in ("nnh_format", "versions", "integrity"):
        payload.pop(key)
    payload["resume"]["batch_offset"] = offset
    path = save_checkpoint(payload, tmp_path / "edited.pth", sign=False)
    with pytest.raises(CheckpointError) as info:
        NNHandler.load(str(path))
    assert info.value.kind == "damaged"


# the user's own files, and vouching ---------------------------------------------------
def test_your_own_file_restores_your_code_with_no_extra_arguments(tmp_path):
    h = trained()
    h.add_metric("accuracy", accuracy)
    h.save(str(tmp_path / "mine.pth"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning at all
        again = NNHandler.load(str(tmp_path / "mine.pth"))
    assert again._metrics == {"accuracy": accuracy}


def test_the_same_file_from_another_user_restores_the_registry_only(tmp_path, monkeypatch):
    h = trained()
    h.add_metric("accuracy", accuracy)
    h.save(str(tmp_path / "theirs.pth"))
    monkeypatch.setenv("NNH_KEY_FILE", str(tmp_path / "another-user.key"))
    with pytest.warns(UserWarning, match="not signed with your key"):
        again = NNHandler.load(str(tmp_path / "theirs.pth"))
    assert again._metrics == {} and again._loss_fn is nn.functional.cross_entropy
    assert NNHandler.load(str(tmp_path / "theirs.pth"), trusted=[accuracy])._metrics == {
        "accuracy": accuracy
    }


def test_an_edited_own_file_is_foreign(tmp_path):
    h = trained()
    h.add_metric("accuracy", accuracy)
    payload = handler_payload(h)
    path = save_checkpoint(payload, tmp_path / "mine.pth")
    edited = load_checkpoint(path)
    mac = edited["integrity"]["mac"]
    for key in ("nnh_format", "versions", "integrity"):
        edited.pop(key)
    edited["metrics"]["accuracy"] = {"kind": "function", "function": "numpy.load"}
    forged = save_checkpoint(edited, tmp_path / "forged.pth", sign=False)
    record = torch.load(forged, weights_only=True)
    record["integrity"]["mac"] = mac  # the old MAC does not cover the edit
    torch.save(record, forged)
    again = load_quietly(forged)
    assert again._metrics == {}


def test_the_signing_key_is_private_and_a_shared_one_is_refused(tmp_path, monkeypatch):
    from nnh.checkpoint import signing

    monkeypatch.setenv("NNH_KEY_FILE", str(tmp_path / "cfg" / "k.key"))
    assert signing.user_key() is not None
    assert (tmp_path / "cfg" / "k.key").stat().st_mode & 0o777 == 0o600
    shared = tmp_path / "shared.key"
    shared.write_text("ab" * 32)
    shared.chmod(0o666)
    monkeypatch.setenv("NNH_KEY_FILE", str(shared))
    with pytest.warns(UserWarning, match="chmod 600"):
        assert signing.user_key() is None


def test_the_loaded_state_after_a_hostile_file_trains_to_finite_values(tmp_path):
    path = foreign(tmp_path, lambda p: p["optimizer"]["kwargs"].update(lr=1e-3))
    h = load_quietly(path)
    h.train(1, progress_bar=False)
    assert all(torch.isfinite(p).all() for p in h.module.parameters())
    assert math.isfinite(h.train_losses[-1])


def test_optimizer_groups_with_settings_the_optimizer_lacks_are_refused(tmp_path):
    path = foreign(tmp_path, lambda p: p["optimizer"]["state_dict"]["param_groups"][0].update(
        evil=1.0))  # fmt: skip
    with pytest.raises(CheckpointError) as info:
        NNHandler.load(str(path))
    assert info.value.kind == "damaged" and "evil" in str(info.value)


@pytest.mark.parametrize("options", [{"label_smoothing": float("nan")}, {"reduction": "x"},
                                     {"ignore_index": 10**12}])  # fmt: skip
def test_registry_loss_modules_take_schema_checked_options_only(tmp_path, options):
    path = foreign(tmp_path, lambda p: p["loss"].update(fn={
        "kind": "module", "class": "torch.nn.modules.loss.CrossEntropyLoss",
        "options": options, "state_dict": {}}))  # fmt: skip
    with pytest.raises(CheckpointError) as info:
        NNHandler.load(str(path))
    assert info.value.kind == "damaged"


def test_a_damaged_global_name_is_reported_as_damage_not_as_a_planted_object(tmp_path):
    path = tmp_path / "run.pth"
    trained().save(str(path))
    data = path.read_bytes()
    assert data.count(b"OrderedDict") >= 1
    bad = tmp_path / "bad.pth"
    bad.write_bytes(data.replace(b"OrderedDict", b"OrderedDicu", 1))
    with pytest.raises(CheckpointError) as info:
        NNHandler.load(str(bad))
    assert info.value.kind == "corrupt"
    assert "weights_only=False" not in str(info.value)


@pytest.mark.parametrize("which", ["targets out of range", "float targets", "int inputs"])
def test_a_foreign_files_data_that_does_not_fit_the_model_is_named_at_train(tmp_path, which):
    def edit(p):
        x, y = p["data"]["train"]["tensors"]
        if which == "targets out of range":
            y = torch.full_like(y, 10**6)
        elif which == "float targets":
            y = y.float()
        else:
            x = x.long()
        p["data"]["train"]["tensors"] = [x, y]

    h = load_quietly(foreign(tmp_path, edit))
    with pytest.raises(CheckpointError) as info:
        h.train(1, progress_bar=False)
    assert info.value.kind == "incompatible_data" and "foreign.pth" in str(info.value)
    h.set_train_loader(classification_data(64), batch_size=16)  # your own data: trains
    h.train(1, progress_bar=False)


def test_optimizer_groups_missing_a_setting_are_refused(tmp_path):
    path = foreign(tmp_path, lambda p: p["optimizer"]["state_dict"]["param_groups"][0].pop("eps"))
    with pytest.raises(CheckpointError) as info:
        NNHandler.load(str(path))
    assert info.value.kind == "damaged" and "eps" in str(info.value)


def test_a_scheduler_record_without_its_class_is_dropped_with_a_warning(tmp_path):
    """Found by the 20,000-example fuzz run (a bare KeyError before)."""
    h = trained()
    h.set_scheduler(torch.optim.lr_scheduler.StepLR, step_size=2)
    payload = handler_payload(h)
    payload["scheduler"].pop("class")
    path = save_checkpoint(payload, tmp_path / "s.pth", sign=False)
    with pytest.warns(UserWarning, match="scheduler"):
        again = NNHandler.load(str(path))
    assert again._scheduler is None
