"""Real multi-process DistributedDataParallel on gloo: torchrun, Slurm variables, two nodes.

Each run is compared with a one-process run on the same data; failure cases must end on
every rank, quickly, with a clear message.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
import ddp_script

from nnh import NNHandler

SCRIPT = Path(__file__).with_name("ddp_script.py")
TIMEOUT = 120
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_", "SLURM_", "TORCHELASTIC"))}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", "--master_addr=127.0.0.1", str(SCRIPT), *args]
    return subprocess.run(cmd, env=base_env(), capture_output=True, text=True, timeout=TIMEOUT)


def single_process(batch: int = ddp_script.BATCH * 2) -> dict:
    """The reference: one process, batch 2b, same data."""
    h = ddp_script.build("none", batch)
    assert not h.is_distributed
    h.train(epochs=3, progress_bar=False)
    preds = h.predict(DataLoader(ddp_script.data(ddp_script.N_VAL, 1), batch_size=64))
    return {"params": h.module.state_dict(), "train_losses": h.train_losses, "val_losses": h.val_losses,
            "val_acc": h.val_metrics_history["acc"], "train_acc": h.train_metrics_history["acc"],
            "predictions": torch.cat(preds), "n_batches": len(preds)}


@pytest.fixture(scope="module")
def reference() -> dict:
    return single_process()


def check_against_reference(result: dict, ref: dict) -> None:
    for k, v in ref["params"].items():
        torch.testing.assert_close(result["params"][k], v, rtol=1e-5, atol=1e-5)
    assert result["train_losses"] == pytest.approx(ref["train_losses"], rel=1e-5)
    assert result["train_acc"] == pytest.approx(ref["train_acc"], rel=1e-6)
    # the 1001-sample validation set: DistributedSampler padding is never counted
    assert result["val_losses"] == pytest.approx(ref["val_losses"], rel=1e-6, abs=1e-7)
    assert result["val_acc"] == pytest.approx(ref["val_acc"], rel=1e-6, abs=1e-7)
    assert result["predictions"].shape == ref["predictions"].shape == (ddp_script.N_VAL, 3)
    torch.testing.assert_close(result["predictions"], ref["predictions"], rtol=1e-5, atol=1e-5)
    assert result["n_batches"] == ref["n_batches"]


def test_torchrun_two_processes_equal_one_process(tmp_path, reference):
    proc = torchrun("none", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = torch.load(tmp_path / "result.pt", weights_only=True)
    check_against_reference(result, reference)
    # evaluate(): the same exact numbers on every rank, equal to what train() logged
    ev = [torch.load(tmp_path / f"evaluate_{r}.pt", weights_only=True) for r in range(2)]
    assert ev[0] == ev[1]
    assert ev[0]["val_loader"] == {"loss": result["val_losses"][-1], "acc": result["val_acc"][-1]}
    assert ev[0]["dataset"]["loss"] == pytest.approx(reference["val_losses"][-1], rel=1e-6)
    # a checkpoint saved in DDP loads in one process
    h = NNHandler.load(str(tmp_path / "ddp.pth"))
    assert not h.is_distributed and h.train_losses == pytest.approx(reference["train_losses"], rel=1e-5)
    h.train(epochs=1, progress_bar=False)


def test_slurm_variables_only(tmp_path, reference):
    port = str(free_port())
    procs = []
    for r in range(2):
        env = base_env()
        env.update(SLURM_PROCID=str(r), SLURM_LOCALID=str(r), SLURM_NTASKS="2",
                   SLURM_NODELIST="localhost", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, str(SCRIPT), "none", str(tmp_path)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=TIMEOUT)
        assert p.returncode == 0, err[-3000:]
    check_against_reference(torch.load(tmp_path / "result.pt", weights_only=True), reference)


def test_two_nodes_on_one_machine(tmp_path, reference):
    port = free_port()
    procs = []
    for node in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}",
               "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}", str(SCRIPT),
               "none", str(tmp_path)]
        procs.append(subprocess.Popen(cmd, env=base_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=TIMEOUT)
        assert p.returncode == 0, err[-3000:]
    check_against_reference(torch.load(tmp_path / "result.pt", weights_only=True), reference)


def test_one_process_checkpoint_loads_in_ddp(tmp_path):
    h = ddp_script.build("none")
    h.train(epochs=1, progress_bar=False)
    h.save(str(tmp_path / "single.pth"))
    proc = torchrun("load", str(tmp_path), "--ckpt", str(tmp_path / "single.pth"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = torch.load(tmp_path / "result.pt", weights_only=True)
    assert len(result["train_losses"]) == 2 and result["train_losses"][0] == pytest.approx(h.train_losses[0])


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("loss", "rank 1 raised ValueError: loss failure on rank 1"),
        ("metric", "metric 'acc' failed"),
        ("callback", "rank 1 raised ValueError: callback failure on rank 1"),
        ("nan", "training diverged"),
        ("save", "not_a_dir.txt"),
    ],
)
def test_a_failure_on_one_rank_ends_every_rank(tmp_path, case, message):
    proc = torchrun(case, str(tmp_path))  # the timeout is the hang detector
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert message in out, out[-4000:]
    assert not (tmp_path / "result.pt").exists()


def test_early_stop_decided_on_rank_zero_stops_every_rank(tmp_path):
    proc = torchrun("early_stop", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(torch.load(tmp_path / "result.pt", weights_only=True)["train_losses"]) == 2


def test_training_padding_is_not_logged(tmp_path):
    """lr = 0: the weights stay put, so the logged training loss and metric must be the
    one-process values over the 97 real samples, without DistributedSampler's duplicate.
    Batch 10: rank 1's 49 samples are 4 x 10 + 9, the duplicate shares its batch with 8 real
    samples (the partial-batch path), as it does in validation (batch 64) and predict."""
    proc = torchrun("pad_train", str(tmp_path), "--batch", "10")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = torch.load(tmp_path / "result.pt", weights_only=True)
    h = ddp_script.build("pad_train", 16)
    h.train(epochs=3, progress_bar=False)
    assert result["train_losses"] == pytest.approx(h.train_losses, rel=1e-6)
    assert result["train_acc"] == pytest.approx(h.train_metrics_history["acc"], rel=1e-6)


def test_uneven_shards_from_a_user_sampler_do_not_deadlock(tmp_path):
    proc = torchrun("uneven", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = torch.load(tmp_path / "result.pt", weights_only=True)
    assert len(result["train_losses"]) == 3 and all(v == v for v in result["train_losses"])


def test_a_rank_that_never_returns_stops_every_rank_within_dist_timeout(tmp_path):
    """Rank 1's loss sleeps forever; with dist_timeout=4 s every rank ends soon after, with
    an error naming dist_timeout (the default would wait 30 minutes)."""
    import time

    mark = tmp_path / "hang_started"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "--master_addr=127.0.0.1", str(SCRIPT), "hang", str(tmp_path)]
    proc = subprocess.run(cmd, env={**base_env(), "NNH_HANG_MARK": str(mark)}, capture_output=True, text=True,
                          timeout=TIMEOUT)
    ended = time.time()
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"waited longer than dist_timeout={ddp_script.HANG_TIMEOUT_S:g} s" in out, out[-4000:]
    waited = ended - float(mark.read_text())
    print(f"every rank ended {waited:.1f} s after rank 1 hung (dist_timeout {ddp_script.HANG_TIMEOUT_S:g} s)")
    # the timeout itself, then torchrun ends the stuck rank: a few seconds of margin
    assert ddp_script.HANG_TIMEOUT_S - 0.5 < waited < ddp_script.HANG_TIMEOUT_S + 15, waited


def test_dist_timeout_is_checked_before_any_work():
    with pytest.raises(TypeError, match=r"dist_timeout must be a number of seconds > 0"):
        NNHandler(torch.nn.Linear, in_features=2, out_features=1, dist_timeout="60")
    with pytest.raises(TypeError, match=r"dist_timeout"):
        NNHandler(torch.nn.Linear, in_features=2, out_features=1, dist_timeout=0)
