"""An ensemble under real two-process DDP (torchrun, gloo) equals the one-process run."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import ensemble_ddp_script as script

from nnh import NNHandler

pytestmark = pytest.mark.slow


def torchrun_script(script: Path, *args: str) -> subprocess.CompletedProcess:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_", "SLURM_", "TORCHELASTIC"))}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           "--master_addr=127.0.0.1", str(script), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)


def test_ensemble_under_ddp_equals_one_process(tmp_path):
    proc = torchrun_script(Path(script.__file__), str(tmp_path))
    assert proc.returncode == 0, proc.stderr[:6000]
    result = torch.load(tmp_path / "result.pt", weights_only=True)
    ref = script.run(script.build(script.BATCH * 2))  # one process, the two ranks' batch
    for k, v in ref["params"].items():
        torch.testing.assert_close(result["params"][k], v, rtol=1e-5, atol=1e-5)
    assert result["train_losses"] == pytest.approx(ref["train_losses"], rel=1e-5)
    for a, b in zip(result["members"]["val_losses"], ref["members"]["val_losses"]):
        assert a == pytest.approx(b, rel=1e-5)
    assert result["predictions"].shape == (script.MEMBERS, script.N_VAL, 3)
    torch.testing.assert_close(result["predictions"], ref["predictions"], rtol=1e-5, atol=1e-5)
    h = NNHandler.load(str(tmp_path / "ens.pth"))  # a DDP checkpoint loads in one process
    assert h.ensemble_size == script.MEMBERS and not h.is_distributed
    h.train(epochs=1, progress_bar=False)
