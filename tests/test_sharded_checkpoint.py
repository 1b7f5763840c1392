"""Sharded checkpoint folders under FSDP (gloo, real processes; tests/sharded_ckpt_script.py).

Launches are shared between assertions: one 2-rank launch trains and saves an epoch folder
and a step folder and continues (the reference); then a 2-rank resume (bitwise), a
1-process resume and a 3-rank resume (within 1e-6: resharding changes reduction order), each
under its own timeout. The kill -9 test has a launch of its own. Corruption and trust run
in this process (a folder loads into a single process without a process group).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from fsdp_script import accuracy
from test_ddp import free_port

from nnh import NNHandler
from nnh.checkpoint import CheckpointError, latest, list_temp_files, save_checkpoint
from nnh.checkpoint.sharded import METADATA_NAME

SCRIPT = Path(__file__).with_name("sharded_ckpt_script.py")
TIMEOUT = 300
TOL = 1e-6
pytestmark = pytest.mark.slow


def env() -> dict:
    out = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(
            ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_", "SLURM_", "TORCHELASTIC")
        )
    }
    out.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    out["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).parents[1] / "src"), out.get("PYTHONPATH", "")]
    )
    return out


def command(ranks: int, *args: str) -> list[str]:
    if ranks == 1:  # no torchrun: one plain process, no process group
        return [sys.executable, str(SCRIPT), *args]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
            f"--master_port={free_port()}", "--master_addr=127.0.0.1", str(SCRIPT), *args]  # fmt: skip


def launch(ranks: int, *args: str) -> None:
    proc = subprocess.run(
        command(ranks, *args), env=env(), capture_output=True, text=True, timeout=TIMEOUT
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("sharded")
    launch(2, "train", str(out))
    results = {"out": out, "train": torch.load(out / "train-2.pt", weights_only=False)}
    launch(2, "resume", str(out), results["train"]["step_path"])
    launch(1, "resume", str(out))
    launch(3, "resume", str(out))
    for world in (1, 2, 3):
        results[world] = torch.load(out / f"resume-{world}.pt", weights_only=False)
    return results


def assert_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def assert_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=TOL, rtol=TOL, msg=k)


def test_folder_holds_each_ranks_shards_and_signed_metadata(runs):
    folder = runs["out"] / "e2.pth"
    names = sorted(p.name for p in folder.iterdir())
    assert names == [".metadata", "__0_0.distcp", "__1_0.distcp", METADATA_NAME]
    meta = torch.load(folder / METADATA_NAME, weights_only=True)
    assert sorted(meta["sharded"]["files"]) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert meta["sharded"]["world_size"] == 2 and len(meta["sharded"]["rng"]) == 2
    assert meta["sharded"]["fsdp"]["wrap_classes"] == ["Block"]
    assert meta["model_state_dict"] == {} and meta["model"]["class"] == "fsdp_script.Net"
    assert isinstance(meta["integrity"].get("mac"), str)  # signed with the user's key
    assert list_temp_files(runs["out"]) == []  # every temporary folder was committed
    newest = Path(latest(runs["out"]))  # folders count; the newest verified one
    assert newest.is_dir() and (newest / METADATA_NAME).is_file()


def test_a_background_save_under_fsdp_is_a_complete_folder(runs):
    done, path = runs["train"]["bg"]
    assert done and Path(path).is_dir()
    a = torch.load(Path(path) / METADATA_NAME, weights_only=True)
    b = torch.load(runs["out"] / "e2.pth" / METADATA_NAME, weights_only=True)
    assert a["history"] == b["history"]  # the same state as the blocking save before it


def test_auto_saves_are_folders_and_overwrite_removes_the_previous_one(runs):
    epochs = sorted(p.name for p in runs["out"].glob("ep*.pth") if ".step-" not in p.name)
    assert epochs == ["ep4.pth"]  # ep1..ep3 removed once the next one was committed
    assert (runs["out"] / "ep4.pth" / METADATA_NAME).is_file()


def test_two_ranks_resume_an_epoch_folder_bitwise(runs):
    ref, got = runs["train"], runs[2]
    assert got["sharded"]
    assert_equal(got["loaded"]["params"], ref["e2"]["params"])
    assert_equal(got["loaded"]["opt"], ref["e2"]["opt"])
    for part in ("params", "ema", "opt"):
        assert_equal(got["e4"][part], ref["e4"][part])
    assert got["e4"]["train_losses"] == ref["e4"]["train_losses"]
    assert got["e4"]["val_losses"] == ref["e4"]["val_losses"]
    assert torch.equal(got["e4"]["rng"], ref["e4"]["rng"])


def test_two_ranks_resume_a_mid_epoch_step_folder_bitwise(runs):
    ref, got = runs["train"]["e4"], runs[2]["step_e4"]
    assert runs[2]["step_resume"]
    for part in ("params", "ema", "opt"):
        assert_equal(got[part], ref[part])
    assert got["train_losses"] == ref["train_losses"]  # every rank's running sums restored
    assert got["step"] == ref["step"]


@pytest.mark.parametrize("world", [1, 3])
def test_one_process_and_three_ranks_reshard_and_continue(runs, world):
    ref, got = runs["train"], runs[world]
    assert got["sharded"] == (world == 3)
    assert_equal(got["loaded"]["params"], ref["e2"]["params"])  # resharding moves bytes only
    assert_equal(got["loaded"]["opt"], ref["e2"]["opt"])
    for part in ("params", "ema", "opt"):
        assert_close(got["e4"][part], ref["e4"][part])
    torch.testing.assert_close(
        torch.tensor(got["e4"]["train_losses"]), torch.tensor(ref["e4"]["train_losses"]),
        atol=TOL, rtol=TOL,
    )  # fmt: skip


def test_a_folder_loads_into_a_ddp_run(runs):
    ref, got = runs["train"], runs[2]
    assert got["ddp_wrapped"] == "DistributedDataParallel"
    assert_equal(got["ddp_loaded"]["params"], ref["e2"]["params"])
    assert_equal(got["ddp_loaded"]["opt"], ref["e2"]["opt"])
    for part in ("params", "ema", "opt"):
        assert_close(got["ddp_e4"][part], ref["e4"][part])


def test_non_finite_state_is_refused_on_every_rank(runs):
    error = runs["train"]["nan_error"]
    assert error.startswith("NonFiniteStateError") and "model inp.weight" in error
    assert not (runs["out"] / "nan.pth").exists()
    assert list_temp_files(runs["out"], "nan.pth") == []  # refused before anything was written


def copy_folder(runs, tmp_path) -> Path:
    target = tmp_path / "copy.pth"
    shutil.copytree(runs["out"] / "e2.pth", target)
    return target


def test_corrupt_or_missing_shard_is_named(runs, tmp_path):
    folder = copy_folder(runs, tmp_path)
    shard = folder / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"shard file '__1_0.distcp' .* is corrupt") as err:
        NNHandler.load(str(folder))
    assert err.value.kind == "corrupt"
    shard.unlink()
    with pytest.raises(CheckpointError, match=r"shard file '__1_0.distcp' .* is missing"):
        NNHandler.load(str(folder))
    (folder / METADATA_NAME).unlink()
    with pytest.raises(CheckpointError, match="holds no nnh metadata file") as err:
        NNHandler.load(str(folder))
    assert latest(tmp_path) is None  # nothing loadable left


def test_a_folder_loads_in_one_process_with_its_own_functions(runs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an own folder: nothing dropped, no warning
        h = NNHandler.load(str(runs["out"] / "e2.pth"))
    assert h._metrics["acc"] is accuracy
    assert h.train_losses == runs["train"]["e2"]["train_losses"]


def test_unsigned_metadata_follows_the_foreign_file_rules(runs, tmp_path):
    folder = copy_folder(runs, tmp_path)
    meta = torch.load(folder / METADATA_NAME, weights_only=True)
    for key in ("nnh_format", "versions", "integrity"):
        del meta[key]
    save_checkpoint(meta, folder / METADATA_NAME, sign=False)  # same data, not the user's own
    with pytest.warns(UserWarning, match="acc"):
        h = NNHandler.load(str(folder))
    assert "acc" not in h._metrics  # a stranger's file names no user function
    h = NNHandler.load(str(folder), trusted=[accuracy])
    assert h._metrics["acc"] is accuracy
    import nnh.checkpoint  # converting never signs a stranger's folder with your key

    file = nnh.checkpoint.sharded_to_file(folder, tmp_path / "full.pth")
    assert "mac" not in torch.load(file, weights_only=True)["integrity"]


def test_a_folder_converts_to_one_file_offline(runs, tmp_path):
    from fsdp_script import Net

    import nnh.checkpoint

    ref = runs["train"]["e2"]
    path = nnh.checkpoint.sharded_to_file(runs["out"] / "e2.pth", tmp_path / "full.pth")
    raw = torch.load(path, weights_only=True)  # an ordinary nnh file: header, checksums, signed
    assert raw["nnh_format"]["name"] == "nnh-checkpoint" and "sharded" not in raw
    assert isinstance(raw["integrity"].get("mac"), str)  # the folder was the user's own
    h = NNHandler.load(str(path))
    assert_equal({k: v for k, v in h.module.state_dict().items()}, ref["params"])
    names = {id(p): n for n, p in h.module.named_parameters()}
    opt = {f"{names[id(p)]}.{k}": v for p, st in h.optimizer.state.items() for k, v in st.items()}
    assert_equal(opt, ref["opt"])
    assert_equal(dict(h._state.ema.items()), ref["ema"])
    assert h.train_losses == ref["train_losses"]
    for source in (path, runs["out"] / "e2.pth"):  # initialize_from_checkpoint reads both
        g = NNHandler.initialize_from_checkpoint(str(source), Net)
        assert_equal(g.module.state_dict(), ref["params"])
    with pytest.raises(CheckpointError, match="mid-epoch step checkpoint of 2 ranks"):
        nnh.checkpoint.sharded_to_file(runs["train"]["step_path"], tmp_path / "step.pth")


class _Planted:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_planted_dcp_index_runs_nothing(runs, tmp_path):
    """DCP unpickles its .metadata; a stranger's folder with matching checksums must not run
    code through it (nnh's reader builds only DCP's own records)."""
    import hashlib
    import pickle

    folder = copy_folder(runs, tmp_path)
    marker = tmp_path / "ran"
    (folder / ".metadata").write_bytes(pickle.dumps(_Planted(marker)))
    meta = torch.load(folder / METADATA_NAME, weights_only=True)
    for key in ("nnh_format", "versions", "integrity"):
        del meta[key]
    digest = hashlib.sha256((folder / ".metadata").read_bytes()).hexdigest()
    meta["sharded"]["files"][".metadata"] = digest  # consistent, as a stranger would make it
    save_checkpoint(meta, folder / METADATA_NAME, sign=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CheckpointError, match="did NOT execute") as err:
            NNHandler.load(str(folder))
    assert err.value.kind == "unsafe" and "posix.system" in str(err.value)
    assert not marker.exists()


def test_edited_metadata_is_refused(runs, tmp_path):
    folder = copy_folder(runs, tmp_path)
    meta_file = folder / METADATA_NAME
    meta = torch.load(meta_file, weights_only=True)
    name = next(iter(meta["sharded"]["files"]))
    meta["sharded"]["files"][name] = "0" * 64  # edited without re-sealing
    torch.save(meta, meta_file)
    with pytest.raises(CheckpointError, match="damaged") as err:
        NNHandler.load(str(folder))
    assert err.value.kind == "corrupt"


def kill_rank_one_during_save_of_k(cmd: list[str], out: Path) -> None:
    """Run ``cmd`` (a script that saves folder ``k.pth``, then saves it again), ``kill -9``
    rank 1 once its shards of the second save are in the temporary folder, and check that
    the previous ``k.pth`` (recorded by the script in ``kill-2.pt``) still loads, and is the
    newest verified checkpoint."""
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + TIMEOUT
        pid_file = out / "pid-1"
        while not (pid_file.exists() and any(
            (t / "__1_0.distcp").exists() for t in list_temp_files(out, "k.pth")
        )):  # fmt: skip
            assert proc.poll() is None, proc.stderr.read()[-4000:]
            assert time.monotonic() < deadline, "the second save never started"
            time.sleep(0.2)
        os.kill(int(pid_file.read_text()), signal.SIGKILL)  # rank 1, its shards written
        proc.wait(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    saved = torch.load(out / "kill-2.pt", weights_only=False)["k"]
    h = NNHandler.load(str(out / "k.pth"))  # the previous, complete folder
    got = {k: v.detach() for k, v in h.module.state_dict().items()}
    assert_equal(got, saved["params"])
    assert latest(out) == str(out / "k.pth")


def test_kill_9_of_a_rank_during_a_save_keeps_the_previous_folder(tmp_path):
    kill_rank_one_during_save_of_k(command(2, "kill", str(tmp_path)), tmp_path)
