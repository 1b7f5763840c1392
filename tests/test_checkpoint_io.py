"""The checkpoint file layer against real files and real processes.

Covers: weights_only round trips, refusal of planted pickle payloads (nothing executed),
every way a file can be broken, the format header, crash safety under real ``kill -9``,
key mapping across DDP/compile wrappers, import paths and opt-in source rebuilding.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import os
import pickle
import random
import select
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import torch
from tensordict import TensorDict
from torch import nn

from nnh.checkpoint import (
    FORMAT_KEY,
    FORMAT_NAME,
    FORMAT_VERSION,
    CheckpointError,
    ImportPathError,
    atomic_save,
    atomic_write_bytes,
    atomic_write_text,
    capture_model_source,
    check_header,
    cleanup_stale_temps,
    compare_state_dict,
    import_path,
    import_record,
    is_importable,
    list_temp_files,
    load_checkpoint,
    load_model_state,
    load_weights_file,
    make_header,
    match_state_dict,
    rebuild_class_from_source,
    replace_previous,
    resolve_class,
    resolve_import_path,
    save_checkpoint,
    strip_wrapper_prefixes,
)
from nnh.checkpoint import atomic as atomic_module
from nnh.checkpoint.source import _sha256

# --------------------------------------------------------------------------- helpers


class PlantedPayload:
    """Unpickling this runs ``open(marker, "w")``: a stand-in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def small_net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def top_level_function(x: int) -> int:
    return x + 1


def _assert_names_file(err: CheckpointError, path: Path) -> None:
    assert str(path) in str(err)
    assert err.path == str(path)
    assert "What to do" in str(err)


# --------------------------------------------------------------------------- round trip


def test_round_trip_nested_payload_loads_with_weights_only(tmp_path: Path) -> None:
    payload = {
        "model_state_dict": small_net().state_dict(),
        "nested": {"ints": [1, 2, 3], "pair": (0.5, "x"), "none": None, "flag": True},
        "ema": TensorDict({"a": torch.arange(3.0), "b": {"c": torch.ones(2, 2)}}, batch_size=[]),
        "dtype": torch.bfloat16,
        "history": {"train_loss": [1.5, 1.25], "epoch": 2},
    }
    path = save_checkpoint(payload, tmp_path / "deep" / "run.pth")
    plain = torch.load(path, weights_only=True)  # readable by plain torch, no nnh needed
    loaded = load_checkpoint(path, map_location="cpu")

    assert plain[FORMAT_KEY] == {"name": FORMAT_NAME, "version": FORMAT_VERSION}
    assert loaded["versions"]["torch"] == str(torch.__version__)
    for key, value in payload["model_state_dict"].items():
        assert torch.equal(loaded["model_state_dict"][key], value)
    assert loaded["nested"] == payload["nested"]
    assert loaded["history"] == payload["history"] and loaded["dtype"] is torch.bfloat16
    assert torch.equal(loaded["ema"]["b", "c"], torch.ones(2, 2))
    assert list_temp_files(path.parent) == []
    mapped = load_checkpoint(path, mmap=True)["model_state_dict"]
    assert all(torch.equal(mapped[k], v) for k, v in payload["model_state_dict"].items())


def test_save_checkpoint_refuses_reserved_keys(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint({FORMAT_KEY: {}}, tmp_path / "x.pth")
    assert not (tmp_path / "x.pth").exists()


def test_failed_save_leaves_previous_file_and_no_temp(tmp_path: Path) -> None:
    path = atomic_save({"v": torch.tensor([1.0])}, tmp_path / "m.pth")
    before = path.read_bytes()
    with pytest.raises((pickle.PicklingError, TypeError, AttributeError)):
        atomic_save({"v": torch.zeros(10), "bad": lambda: 0}, path)
    assert path.read_bytes() == before
    assert list_temp_files(tmp_path) == []


def test_durable_save_fsyncs_file_and_folder(tmp_path: Path, monkeypatch) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}") if sys.platform == "linux" else "?")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    path = atomic_save({"w": torch.ones(3)}, tmp_path / "d.pth")
    assert len(synced) == 2  # the written file, then the folder holding the new name
    if sys.platform == "linux":
        assert ".d.pth.tmp-" in synced[0] and synced[1] == str(tmp_path)
    synced.clear()
    atomic_save({"w": torch.ones(3)}, path, durable=False)
    assert synced == []


def test_failed_fsync_fails_the_save_and_keeps_the_old_file(tmp_path: Path, monkeypatch) -> None:
    path = atomic_save({"v": torch.ones(1)}, tmp_path / "m.pth")
    before = path.read_bytes()

    def failing_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="Input/output"):
        atomic_save({"t": torch.zeros(1000)}, path)
    assert path.read_bytes() == before and list_temp_files(tmp_path) == []


def test_atomic_save_into_a_folder_name_is_refused(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    with pytest.raises(CheckpointError, match="is a folder") as info:
        atomic_save({"a": 1}, tmp_path / "out")
    assert info.value.kind == "not_a_file"


def test_atomic_write_text_and_bytes(tmp_path: Path) -> None:
    atomic_write_text("epoch,loss\n0,1.5\n", tmp_path / "log.csv")
    atomic_write_text("epoch,loss\n0,1.5\n1,1.2\n", tmp_path / "log.csv")
    atomic_write_bytes(b"\x00\x01", tmp_path / "a" / "b.bin", durable=False)
    assert (tmp_path / "log.csv").read_text().splitlines()[-1] == "1,1.2"
    assert (tmp_path / "a" / "b.bin").read_bytes() == b"\x00\x01"
    assert list_temp_files(tmp_path) == []


def test_replace_previous_deletes_only_a_different_old_file(tmp_path: Path) -> None:
    old = atomic_save({"e": 1}, tmp_path / "epoch1.pth")
    new = atomic_save({"e": 2}, tmp_path / "epoch2.pth")
    assert replace_previous(new, new) is False and new.exists()
    assert replace_previous(new, tmp_path / "." / "epoch2.pth") is False and new.exists()
    assert replace_previous(new, old) is True and not old.exists()
    assert replace_previous(new, old) is False  # already gone
    assert replace_previous(new, None) is False
    with pytest.raises(CheckpointError, match="does not exist"):
        replace_previous(tmp_path / "never.pth", new)
    assert new.exists()


# --------------------------------------------------------------------------- planted payloads


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
def test_planted_payload_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    files = {
        "torch.pth": lambda p: torch.save({"w": torch.ones(2), "x": PlantedPayload(marker)}, p),
        "proto2.pkl": lambda p: p.write_bytes(pickle.dumps(PlantedPayload(marker), protocol=2)),
        "proto4.pkl": lambda p: p.write_bytes(pickle.dumps(PlantedPayload(marker), protocol=4)),
    }
    for name, write in files.items():
        path = tmp_path / name
        write(path)
        for load in (load_checkpoint, load_weights_file):
            with pytest.raises(CheckpointError) as info:
                load(path)
            message = str(info.value)
            _assert_names_file(info.value, path)
            assert info.value.kind == "unsafe", (name, message)
            assert "tensors, numbers, strings, lists and dicts" in message
            assert "did NOT execute" in message
            assert "open" in message  # names what it refers to
            assert not marker.exists(), f"{name}: the payload ran"

    # The payload is live: an unsafe load really would have run it.
    proof = tmp_path / "proof.pkl"
    proof.write_bytes(pickle.dumps(PlantedPayload(tmp_path / "RAN")))
    pickle.loads(proof.read_bytes()).close()
    assert (tmp_path / "RAN").exists()


# --------------------------------------------------------------------------- broken files


def _valid_checkpoint(tmp_path: Path) -> Path:
    return save_checkpoint({"model_state_dict": {"w": torch.randn(4096)}}, tmp_path / "ok.pth")


@pytest.mark.parametrize(
    ("case", "kind", "words"),
    [
        ("truncated", "corrupt", "damaged or incomplete"),
        ("head_only", "corrupt", "damaged or incomplete"),
        ("random", "corrupt", "not a PyTorch checkpoint"),
        ("text", "corrupt", "not a PyTorch checkpoint"),
        ("empty", "empty", "is empty"),
        ("missing", "missing", "does not exist"),
        ("folder", "not_a_file", "is a folder"),
    ],
)
def test_broken_files_raise_checkpoint_error_naming_the_path(
    tmp_path: Path, case: str, kind: str, words: str
) -> None:
    data = _valid_checkpoint(tmp_path).read_bytes()
    path = tmp_path / f"{case}.pth"
    if case == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif case == "head_only":
        path.write_bytes(data[:100])
    elif case == "random":
        path.write_bytes(random.Random(0).randbytes(5000))
    elif case == "text":
        path.write_text("epoch,loss\n0,1.0\n")
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "folder":
        path.mkdir()
    for load in (load_checkpoint, load_weights_file):
        with pytest.raises(CheckpointError) as info:
            load(path)
        assert info.value.kind == kind
        assert words in str(info.value)
        _assert_names_file(info.value, path)


def test_torch_file_without_header_is_not_an_nnh_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save(small_net().state_dict(), path)
    with pytest.raises(CheckpointError, match="not an nnh checkpoint") as info:
        load_checkpoint(path)
    assert info.value.kind == "not_nnh"
    assert "bare model state_dict" in str(info.value)
    _assert_names_file(info.value, path)
    assert set(load_checkpoint(path, require_header=False)) == set(small_net().state_dict())

    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="holds a list"):
        load_checkpoint(tmp_path / "list.pt", require_header=False)


def test_newer_format_version_is_refused_with_upgrade_advice(tmp_path: Path) -> None:
    header = make_header()
    header[FORMAT_KEY]["version"] = FORMAT_VERSION + 1
    header["versions"]["nnh"] = "99.0"
    path = atomic_save({**header, "model_state_dict": {"w": torch.ones(1)}}, tmp_path / "n.pth")
    for kwargs in ({}, {"require_header": False}):
        with pytest.raises(CheckpointError, match="newer") as info:
            load_checkpoint(path, **kwargs)
        assert info.value.kind == "newer_version"
        assert "nnh 99.0" in str(info.value) and "upgrade" in str(info.value)
        _assert_names_file(info.value, path)
    with pytest.raises(CheckpointError, match="newer"):
        load_weights_file(path)


@pytest.mark.parametrize(
    "marker",
    [{"name": "other-format", "version": 1}, {"name": FORMAT_NAME, "version": "1"}, "v1",
     {"name": FORMAT_NAME, "version": 0}],
)
def test_malformed_header_is_refused(marker: object) -> None:
    with pytest.raises(CheckpointError) as info:
        check_header({FORMAT_KEY: marker}, "x.pth")
    assert info.value.kind == "bad_header" and "'x.pth'" in str(info.value)


# --------------------------------------------------------------------------- weights files


def test_load_weights_file_accepts_bare_and_full_checkpoints(tmp_path: Path) -> None:
    net = small_net()
    bare = tmp_path / "bare.pt"
    torch.save(net.state_dict(), bare)
    full = save_checkpoint({"model_state_dict": net.state_dict(), "epoch": 3}, tmp_path / "f.pth")
    as_td = save_checkpoint(
        {"model_state_dict": TensorDict(dict(net.state_dict()), batch_size=[]).unflatten_keys(".")},
        tmp_path / "td.pth",
    )
    for path in (bare, full, as_td):
        weights = load_weights_file(path)
        assert set(weights) == set(net.state_dict()), path
        for key, value in net.state_dict().items():
            assert torch.equal(weights[key], value)


def test_load_weights_file_rejects_non_state_dicts(tmp_path: Path) -> None:
    path = tmp_path / "cfg.pt"
    torch.save({"lr": 0.1, "layers": [1, 2]}, path)
    with pytest.raises(CheckpointError, match="not a state_dict") as info:
        load_weights_file(path)
    assert info.value.kind == "bad_weights" and "'lr': float" in str(info.value)
    _assert_names_file(info.value, path)

    no_model = save_checkpoint({"epoch": 1}, tmp_path / "nomodel.pth")
    with pytest.raises(CheckpointError, match="no 'model_state_dict'"):
        load_weights_file(no_model)


# --------------------------------------------------------------------------- kill -9

WRITER = textwrap.dedent(
    """
    import os, sys
    import torch
    torch.set_num_threads(1)
    from nnh.checkpoint import save_checkpoint

    path, n, numel = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

    def write_forever(counter):
        while True:
            data = {f"t{i}": torch.full((numel,), float(counter)) for i in range(n)}
            save_checkpoint({"counter": counter, "n": n, "numel": numel, "data": data}, path)
            counter += 1

    print("ready", flush=True)
    for line in sys.stdin:
        words = line.split()
        if words[0] == "quit":
            break
        pid = os.fork()
        if pid == 0:
            try:
                write_forever(int(words[1]))
            finally:
                os._exit(3)
        print("pid", pid, flush=True)
        print("dead", os.waitpid(pid, 0)[1], flush=True)
    """
)


def _read_line(proc: subprocess.Popen, timeout: float = 60.0) -> list[str]:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline().decode() if ready else ""
    if not line:
        if proc.poll() is None:
            pytest.fail(f"the writer process gave no answer within {timeout} s")
        pytest.fail(f"the writer process died: {proc.stderr.read().decode()[-2000:]}")
    return line.split()


def _check_complete_version(path: Path, latest: int, round_: int, stride: int) -> int:
    ckpt = load_checkpoint(path)  # header checked, weights_only
    counter = ckpt["counter"]
    assert latest <= counter and counter // stride <= round_
    assert len(ckpt["data"]) == ckpt["n"] == 4
    for tensor in ckpt["data"].values():
        assert tensor.shape == (ckpt["numel"],)
        assert bool((tensor == float(counter)).all()), "a tensor from another version"
    return counter


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork and SIGKILL")
def test_kill_minus_nine_never_leaves_a_partial_file(tmp_path: Path) -> None:
    """A writer re-saving ~48 MB to one path is SIGKILLed at random moments, 20 times.

    After every kill the final name holds one complete version. A killed writer may leave
    its temporary file; cleanup_stale_temps removes those once the writer is dead.
    """
    path, stride, rng = tmp_path / "live.pth", 100_000, random.Random(20240601)
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), "4", str(3_000_000)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0,
    )
    child = None
    try:
        assert _read_line(proc) == ["ready"]
        latest, interrupted, temps_seen = -1, 0, set()
        for round_ in range(20):
            proc.stdin.write(f"go {round_ * stride}\n".encode())
            child = int(_read_line(proc)[1])
            deadline = time.monotonic() + 60
            while round_ == 0 and not path.exists():
                assert time.monotonic() < deadline, "first save never appeared"
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.35))
            os.kill(child, signal.SIGKILL)
            status = int(_read_line(proc)[1])
            child = None
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
            temps = set(list_temp_files(tmp_path, path.name))
            interrupted += bool(temps - temps_seen)  # this kill hit a write in progress
            temps_seen |= temps
            latest = _check_complete_version(path, latest, round_, stride)
            others = set(tmp_path.iterdir()) - {path} - set(list_temp_files(tmp_path))
            assert others == set(), f"unexpected files {others}"
        print(f"{interrupted} of 20 kills interrupted a write; last version {latest}")
        proc.stdin.write(b"quit\n")
        assert proc.wait(timeout=30) == 0
    finally:
        if child is not None:
            os.kill(child, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert latest > 0, "the writer never completed a second save"
    assert interrupted >= 1, "no kill landed during a write; the test proved nothing"
    removed = cleanup_stale_temps(tmp_path)
    assert set(removed) == temps_seen and list_temp_files(tmp_path) == []
    assert _check_complete_version(path, latest, 99, stride) == latest


def test_cleanup_stale_temps_keeps_live_writers(tmp_path: Path) -> None:
    done = subprocess.Popen(["true"])
    done.wait()
    host = atomic_module._host_tag()
    dead = tmp_path / f".model.pth.tmp-{host}-{done.pid}-0a1b2c3d"
    live = tmp_path / f".model.pth.tmp-{host}-{os.getpid()}-0a1b2c3e"
    foreign_fresh = tmp_path / f".model.pth.tmp-otherhost-{done.pid}-0a1b2c3f"
    foreign_old = tmp_path / f".other.pth.tmp-otherhost-{done.pid}-0a1b2c40"
    unrelated = tmp_path / ".model.pth.tmp-notes"
    for file in (dead, live, foreign_fresh, foreign_old, unrelated):
        file.write_bytes(b"partial")
    os.utime(foreign_old, (time.time() - 7200, time.time() - 7200))

    assert cleanup_stale_temps(tmp_path, "model.pth") == [dead]
    assert sorted(cleanup_stale_temps(tmp_path)) == [foreign_old]
    assert live.exists() and foreign_fresh.exists() and unrelated.exists()
    assert cleanup_stale_temps(tmp_path, max_age_s=0) == sorted([live, foreign_fresh])
    assert cleanup_stale_temps(tmp_path / "nowhere") == []


# --------------------------------------------------------------------------- keys


def _filled(model: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return model


def _plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return strip_wrapper_prefixes(model.state_dict())


def test_strip_wrapper_prefixes_any_order() -> None:
    sd = {
        "module._orig_mod.a.weight": 1,
        "_orig_mod.module.b.weight": 2,
        "module.module.c": 3,
        "d._orig_mod.e": 4,
        "plain": 5,
    }
    assert strip_wrapper_prefixes(sd) == {"a.weight": 1, "b.weight": 2, "c": 3, "d.e": 4, "plain": 5}
    with pytest.raises(CheckpointError, match="both mean 'x'"):
        strip_wrapper_prefixes({"module.x": 1, "_orig_mod.x": 2})


def test_keys_map_between_plain_wrapped_and_compiled_models() -> None:
    forms = {
        "plain": lambda m: m,
        "data_parallel": nn.DataParallel,
        "compiled": lambda m: torch.compile(m, backend="eager"),
        "compiled_dp": lambda m: torch.compile(nn.DataParallel(m), backend="eager"),
    }
    for src_name, wrap_src in forms.items():
        source = wrap_src(_filled(small_net(), seed=1))
        saved = source.state_dict()
        for dst_name, wrap_dst in forms.items():
            target = wrap_dst(_filled(small_net(), seed=2))
            adapted = match_state_dict(target, saved, strict=True)
            assert set(adapted) == set(target.state_dict()), (src_name, dst_name)
            result = load_model_state(target, saved, strict=True)
            assert result.missing_keys == [] and result.unexpected_keys == []
            for key, value in _plain_state(source).items():
                assert torch.equal(_plain_state(target)[key], value), (src_name, dst_name, key)


def test_compiled_submodule_keys_map_to_plain() -> None:
    class Outer(nn.Module):
        def __init__(self, compiled: bool) -> None:
            super().__init__()
            enc = nn.Linear(2, 2)
            self.enc = torch.compile(enc, backend="eager") if compiled else enc

    source, target = Outer(compiled=True), Outer(compiled=False)
    assert "enc._orig_mod.weight" in source.state_dict()
    load_model_state(target, source.state_dict())
    assert torch.equal(target.enc.weight, source.enc.weight)


def test_mismatch_error_lists_missing_unexpected_and_shapes(tmp_path: Path) -> None:
    saved = nn.DataParallel(small_net()).state_dict()
    saved["module.extra.bias"] = torch.zeros(1)
    del saved["module.2.bias"]
    saved["module.0.weight"] = torch.zeros(5, 4)
    target = small_net()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    source = tmp_path / "ckpt.pth"

    with pytest.raises(CheckpointError) as info:
        load_model_state(target, saved, strict=True, source=source)
    message = str(info.value)
    assert info.value.kind == "mismatch" and str(source) in message
    assert "missing keys" in message and "2.bias" in message
    assert "unexpected keys" in message and "module.extra.bias" in message
    assert "0.weight: checkpoint [5, 4] vs model [3, 4]" in message
    for key, value in target.state_dict().items():
        assert torch.equal(value, before[key]), "a failed load changed the model"

    with pytest.raises(CheckpointError, match=r"0\.weight: checkpoint \[5, 4\] vs model \[3, 4\]"):
        load_model_state(target, saved, strict=False)

    saved["module.0.weight"] = torch.ones(3, 4)
    report = compare_state_dict(target, saved)
    assert report.missing == ["2.bias"] and report.unexpected == ["module.extra.bias"]
    result = load_model_state(target, saved, strict=False)
    assert result.missing_keys == ["2.bias"] and result.unexpected_keys == ["module.extra.bias"]
    assert torch.equal(target[0].weight, torch.ones(3, 4))
    with pytest.raises(CheckpointError, match="strict_load=False"):
        load_model_state(target, saved, strict=True)


# --------------------------------------------------------------------------- import paths


def test_import_path_round_trip_for_class_and_function() -> None:
    for obj in (nn.Linear, torch.optim.AdamW, top_level_function, PlantedPayload):
        path = import_path(obj)
        assert resolve_import_path(path) is obj
        assert is_importable(obj) == (True, "")
    assert import_path(top_level_function) == f"{__name__}.top_level_function"
    assert import_record(nn.Linear) == {
        "path": "torch.nn.modules.linear.Linear", "importable": True, "reason": ""
    }


def test_lambdas_and_local_objects_are_not_importable() -> None:
    def local_fn() -> None:
        pass

    class LocalNet(nn.Module):
        pass

    cases = [(lambda x: x, "lambda"), (local_fn, "inside the function"),
             (LocalNet, "inside the function"), (torch.ones(1), "no import path")]
    for obj, words in cases:
        ok, reason = is_importable(obj)
        assert not ok and words in reason and "What to do" in reason
        with pytest.raises(ImportPathError, match=words):
            import_path(obj)
        assert import_record(obj)["path"] is None


def test_main_objects_are_recorded_but_reported_not_importable(monkeypatch) -> None:
    class Scripted:
        pass

    Scripted.__module__, Scripted.__qualname__ = "__main__", "Scripted"
    fake_main = type(sys)("__main__")
    fake_main.__file__ = "/somewhere/train.py"
    fake_main.__spec__ = None
    monkeypatch.setitem(sys.modules, "__main__", fake_main)
    assert import_path(Scripted) == "__main__.Scripted"
    ok, reason = is_importable(Scripted)
    assert not ok and "train.py" in reason and "same script" in reason
    with pytest.raises(ImportPathError, match="same script"):
        resolve_import_path("__main__.Scripted")
    fake_main.Scripted = Scripted
    assert resolve_import_path("__main__.Scripted") is Scripted

    fake_main.__spec__ = importlib.machinery.ModuleSpec("mypkg.train", None)
    assert import_path(Scripted) == "mypkg.train.Scripted"


@pytest.mark.parametrize(
    ("path", "words"),
    [
        ("nnh_no_such_package_xyz.models.Net", "no module named 'nnh_no_such_package_xyz'"),
        ("torch.nn.NoSuchLayer", "'torch.nn' has no attribute 'NoSuchLayer'"),
        ("torch.nn.Linear.nope", "'torch.nn.Linear' has no attribute 'nope'"),
        ("not a path", "is not an import path"),
    ],
)
def test_unknown_import_path_gives_clear_error(path: str, words: str) -> None:
    with pytest.raises(ImportPathError) as info:
        resolve_import_path(path)
    assert words in str(info.value) and repr(path) in str(info.value)


# --------------------------------------------------------------------------- model source

MODULE_TEMPLATE = '''
import torch
from torch import nn

HIDDEN = 7


def make_head(width):
    return nn.Linear(HIDDEN, width)


class {cls}(nn.Module):
    def __init__(self, width=3):
        super().__init__()
        self.body = nn.Linear(5, HIDDEN)
        self.head = make_head(width)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


if __name__ == "__main__":
    raise SystemExit("must not run on rebuild")
'''


def _import_temporary_module(tmp_path: Path, monkeypatch) -> tuple[str, type, Path]:
    name = f"nnh_tmp_models_{uuid.uuid4().hex[:8]}"
    file = tmp_path / "mods" / f"{name}.py"
    file.parent.mkdir()
    file.write_text(MODULE_TEMPLATE.format(cls="TinyNet"))
    monkeypatch.syspath_prepend(str(file.parent))
    module = importlib.import_module(name)
    return name, module.TinyNet, file


def test_source_is_not_run_without_trust(tmp_path: Path, monkeypatch) -> None:
    _, cls, _ = _import_temporary_module(tmp_path, monkeypatch)
    record = capture_model_source(cls)
    marker = tmp_path / "SOURCE_RAN"
    record["source"] += f"\nopen({str(marker)!r}, 'w').close()\n"
    record["sha256"] = _sha256(record["source"])
    ckpt = tmp_path / "c.pth"

    with pytest.raises(CheckpointError) as info:
        rebuild_class_from_source(record, trust_code=False, path=ckpt)
    message = str(info.value)
    assert info.value.kind == "untrusted_code" and str(ckpt) in message
    assert "cannot be imported" in message and "trust_code=True" in message
    assert not marker.exists()

    rebuild_class_from_source(record, trust_code=True)
    assert marker.exists()  # the stored code was live: only the opt-in ran it


def test_tampered_source_is_refused(tmp_path: Path, monkeypatch) -> None:
    _, cls, _ = _import_temporary_module(tmp_path, monkeypatch)
    record = capture_model_source(cls)
    record["source"] += "\nprint('edited')\n"
    with pytest.raises(CheckpointError, match="checksum") as info:
        rebuild_class_from_source(record, trust_code=True)
    assert info.value.kind == "bad_source"
    with pytest.raises(CheckpointError, match="malformed"):
        rebuild_class_from_source({"module": "m"}, trust_code=True)


def test_rebuild_with_trust_when_the_module_is_gone(tmp_path: Path, monkeypatch) -> None:
    name, cls, file = _import_temporary_module(tmp_path, monkeypatch)
    original = _filled(cls(width=4), seed=3)
    path_str = import_path(cls)
    saved = save_checkpoint(
        {
            "model_class": path_str,
            "model_source": capture_model_source(cls),
            "model_state_dict": original.state_dict(),
        },
        tmp_path / "with_code.pth",
    )
    # The module disappears: not in sys.modules, not on sys.path, file deleted.
    del sys.modules[name]
    monkeypatch.undo()
    file.unlink()
    importlib.invalidate_caches()
    with pytest.raises(ImportPathError, match="no module named"):
        resolve_import_path(path_str)

    ckpt = load_checkpoint(saved)
    assert ckpt["model_source"]["mode"] == "module"
    assert "import torch" in ckpt["model_source"]["imports"]
    with pytest.raises(CheckpointError, match="trust_code=True") as info:
        resolve_class(ckpt["model_class"], ckpt["model_source"], path=saved)
    assert "no module named" in str(info.value) and str(saved) in str(info.value)

    rebuilt = resolve_class(ckpt["model_class"], ckpt["model_source"], trust_code=True)
    assert rebuilt.__module__ == f"nnh_restored.{name}" and rebuilt.__name__ == "TinyNet"
    model = rebuilt(width=4)
    assert set(model.state_dict()) == set(original.state_dict())
    load_model_state(model, ckpt["model_state_dict"], strict=True, source=saved)
    x = torch.randn(2, 5)
    assert torch.equal(model(x), original(x))
    # A rebuilt class can be captured again (re-saving with save_model_code works).
    assert capture_model_source(rebuilt)["class_source"] == ckpt["model_source"]["class_source"]
    with pytest.raises(CheckpointError, match="no longer loaded"):
        capture_model_source(cls)


def test_class_mode_capture_for_local_class() -> None:
    class LocalHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 2)

    record = capture_model_source(LocalHead)
    assert record["mode"] == "class"
    assert "from torch import nn" in record["imports"]
    rebuilt = rebuild_class_from_source(record, trust_code=True)
    assert set(rebuilt().state_dict()) == {"fc.weight", "fc.bias"}


def test_rebuilt_module_keeps_relative_imports_into_its_package(tmp_path: Path, monkeypatch) -> None:
    package = f"nnh_tmp_pkg_{uuid.uuid4().hex[:8]}"
    root = tmp_path / package
    root.mkdir()
    (root / "__init__.py").write_text("")
    (root / "layers.py").write_text("from torch import nn\n\n\ndef block():\n    return nn.Linear(2, 2)\n")
    (root / "models.py").write_text(
        "from torch import nn\n\nfrom .layers import block\n\n\n"
        "class Net(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.block = block()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    record = capture_model_source(importlib.import_module(f"{package}.models").Net)
    del sys.modules[f"{package}.models"]
    delattr(sys.modules[package], "models")
    (root / "models.py").unlink()
    importlib.invalidate_caches()
    with pytest.raises(ImportPathError):
        resolve_import_path(f"{package}.models.Net")
    rebuilt = rebuild_class_from_source(record, trust_code=True)
    assert set(rebuilt().state_dict()) == {"block.weight", "block.bias"}
