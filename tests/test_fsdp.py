"""FSDP2 through NNHandler on gloo with 2 real processes, compared with one unsharded process.

One torchrun launch (tests/fsdp_script.py) trains several configurations; every assertion
below reads its result file. Tolerance: 1e-6 (fp32; reduction order differs, not bitwise).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import fsdp_script

from nnh import NNHandler

SCRIPT = Path(__file__).with_name("fsdp_script.py")
TIMEOUT = 300
TOL = 1e-6
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("fsdp")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(
            ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_", "SLURM_", "TORCHELASTIC")
        )
    }
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={free_port()}", "--master_addr=127.0.0.1", str(SCRIPT), str(out)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out / "result.pt", weights_only=False)


def reference(config: dict) -> dict:
    """One process, batch 2b, same data and seed."""
    torch.manual_seed(0)
    return fsdp_script.run(None, fsdp_script.BATCH * 2, config)


def close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=TOL, rtol=TOL, msg=k)


@pytest.mark.parametrize("name", sorted(fsdp_script.CONFIGS))
def test_fsdp_matches_one_process(fsdp_run, name):
    ref = reference(fsdp_script.CONFIGS[name])
    got = fsdp_run[name]
    close(got["init"], ref["init"])  # the shard-by-shard init equals the unsharded one
    close(got["params"], ref["params"])
    for key in ("train_losses", "val_losses", "val_acc"):
        torch.testing.assert_close(
            torch.tensor(got[key]), torch.tensor(ref[key]), atol=TOL, rtol=TOL
        )
    torch.testing.assert_close(got["predictions"], ref["predictions"], atol=TOL, rtol=TOL)
    for k, v in ref["evaluate"].items():
        assert got["evaluate"][k] == pytest.approx(v, abs=TOL)


def test_auto_wrap_by_size_matches(fsdp_run):
    close(fsdp_run["auto_wrap"]["params"], reference({})["params"])


def test_bf16_mixed_precision_is_close(fsdp_run):
    """bf16 compute (8 mantissa bits) over 24 SGD steps: within 5e-2 of fp32 one process."""
    ref, got = reference({}), fsdp_run["bf16"]
    for k in ref["params"]:
        assert got["params"][k].dtype == torch.float32  # sharded master weights stay fp32
        torch.testing.assert_close(got["params"][k], ref["params"][k], atol=5e-2, rtol=5e-2)
    assert not torch.equal(got["params"]["out.weight"], ref["params"]["out.weight"])  # bf16 ran


def test_module_is_sharded_and_ranks_agree(fsdp_run):
    assert fsdp_run["is_sharded"]
    full = sum(p.numel() for p in fsdp_script.Net().parameters())
    assert fsdp_run["local_numel"] <= full // 2 + 64  # rank 0 holds about half
    a, b = fsdp_run["rank_eval"]
    assert a == b


def test_bad_options_are_named_before_work():
    with pytest.raises(ValueError, match=r"unknown fsdp option\(s\) \['shard_sizes'\]"):
        NNHandler(fsdp_script.Net, strategy="fsdp", fsdp={"shard_sizes": 2})
    with pytest.raises(ValueError, match="strategy must be one of"):
        NNHandler(fsdp_script.Net, strategy="zero3")
    with pytest.raises(ValueError, match="strategy is 'ddp'"):
        NNHandler(fsdp_script.Net, fsdp={"min_params": 3})
    with pytest.raises(ValueError, match="activation_checkpointing needs wrap_classes"):
        NNHandler(fsdp_script.Net, strategy="fsdp", fsdp={"activation_checkpointing": True})
    with pytest.raises(ValueError, match="ensemble_size=2 cannot be used with strategy='fsdp'"):
        NNHandler(fsdp_script.Net, strategy="fsdp", ensemble_size=2)


def test_single_process_fsdp_is_unchanged():
    h = NNHandler(fsdp_script.Net, strategy="fsdp", seed=0)
    assert isinstance(h.module, fsdp_script.Net) and not h.is_distributed
