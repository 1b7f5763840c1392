"""One-file checkpoints under FSDP, ordinary files loaded into FSDP runs, and the train()
options not covered by tests/test_fsdp.py (use_amp, callbacks, early stopping, sample,
log_likelihood), on gloo with 2 real processes.

One torchrun launch (tests/fsdp_full_script.py, under its own timeout) does everything that
needs two ranks; the assertions compare its result files with one unsharded process here.
Tolerance 1e-6 for fp32 training (reduction order differs), 1e-5 for sampling and
likelihoods (ODE/SDE steps amplify it).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import fsdp_full_script as script
import fsdp_script
from test_ddp import free_port

from nnh import NNHandler

SCRIPT = Path(__file__).with_name("fsdp_full_script.py")
TIMEOUT = 420
TOL = 1e-6
pytestmark = pytest.mark.slow


def one_process(epochs: int = 2) -> NNHandler:
    """One unsharded process, batch 2b (the 2-rank global batch), same data and seed."""
    torch.manual_seed(0)
    h = fsdp_script.build(None, fsdp_script.BATCH * 2)
    h.train(epochs=epochs, progress_bar=False, ema_decay=script.EMA)
    return h


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp_full")
    one_process().save(str(out / "one.pth"))
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
    return out


def result(run: Path) -> dict:
    return torch.load(run / "result.pt", weights_only=False)


def rank(run: Path, r: int) -> dict:
    return torch.load(run / f"rank{r}.pt", weights_only=False)


def close(a, b, tol=TOL, what=""):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), what
        for k in a:
            close(a[k], b[k], tol, f"{what}.{k}")
    else:
        torch.testing.assert_close(a, b, atol=tol, rtol=tol, msg=what)


def named_optimizer(osd: dict, module: torch.nn.Module) -> dict:
    """torch's optimizer state dict (keys by position) keyed by parameter name."""
    names = [n for n, _ in module.named_parameters()]
    return {names[i]: {k: v for k, v in st.items()} for i, st in osd["state"].items()}


def file_state(path: Path) -> dict:
    payload = torch.load(path, weights_only=True)  # an ordinary nnh file: weights_only loads it
    names = fsdp_script.Net()
    return {
        "params": payload["model_state_dict"],
        "optimizer": named_optimizer(payload["optimizer"]["state_dict"], names),
        "ema": payload["train_state"]["ema"],
        "epoch": payload["train_state"]["counters"]["epoch"],
    }


def test_full_export_equals_gathered_shards_bitwise(run):
    got, shards = file_state(run / "full.pth"), result(run)["gathered"]
    assert got["epoch"] == shards["epoch"] == 2
    for section in ("params", "optimizer", "ema"):
        flat_a = torch.utils._pytree.tree_leaves(got[section])
        flat_b = torch.utils._pytree.tree_leaves(shards[section])
        assert len(flat_a) == len(flat_b) > 0
        assert list(got[section]) == list(shards[section]) or section == "optimizer"
    for k, v in shards["params"].items():
        assert torch.equal(got["params"][k], v), k
    for k, v in shards["ema"].items():
        assert torch.equal(got["ema"][k], v), k
    for name, st in shards["optimizer"].items():
        for key, v in st.items():
            assert torch.equal(got["optimizer"][name][key], v), (name, key)


def test_full_export_equals_one_unsharded_process(run):
    """The whole file (weights, momentum, EMA, losses) within 1e-6 of one process's file."""
    got, ref = file_state(run / "full.pth"), file_state(run / "one.pth")
    close(got, ref, what="full.pth")
    a = torch.load(run / "full.pth", weights_only=True)
    b = torch.load(run / "one.pth", weights_only=True)
    torch.testing.assert_close(
        torch.tensor(a["history"]["train_losses"]), torch.tensor(b["history"]["train_losses"]),
        atol=TOL, rtol=TOL,
    )  # fmt: skip
    assert a["nnh_format"] == b["nnh_format"] and a["integrity"].keys() == b["integrity"].keys()


def test_full_export_loads_into_one_process_and_continues(run):
    """The reverse direction: a full=True export is an ordinary file (checksums verified)."""
    ref = one_process(epochs=3)
    h = NNHandler.load(str(run / "full.pth"))
    assert not h.is_distributed and isinstance(h.module, fsdp_script.Net)
    h.set_train_loader(fsdp_script.data(fsdp_script.N_TRAIN, 0), batch_size=fsdp_script.BATCH * 2)
    h.train(epochs=1, progress_bar=False, ema_decay=script.EMA)
    close(dict(h.module.state_dict()), dict(ref.module.state_dict()), what="continued")


def test_non_finite_shard_on_one_rank_writes_nothing(run):
    """The finite check sees every rank's shards (the NaN sat in rank 1's shard only)."""
    assert not (run / "nan.pth").exists()
    assert "not finite (model out.bias" in rank(run, 0)["nan_error"]
    assert rank(run, 1)["nan_error"].startswith("RuntimeError: saving")  # told, no hang


def test_background_full_save_is_refused_naming_it(run):
    assert "full=True, blocking=False" in result(run)["background_error"]


@pytest.mark.parametrize("name", ["one", "ddp", "full"])
def test_ordinary_file_loads_into_fsdp_and_continues(run, name):
    """Weights, momentum, EMA and epoch arrive as the file holds them (each rank its shard)
    and one more epoch equals one process continuing the same file (1e-6)."""
    res = result(run)[f"load_{name}"]
    assert res["loaded"]["sharded"]
    src = file_state(run / f"{name}.pth")
    if name == "ddp":  # DDP keys came with a "module." prefix in the file
        src["params"] = {k.removeprefix("module."): v for k, v in src["params"].items()}
    loaded = res["loaded"]
    assert loaded["epoch"] == src["epoch"] == 2
    for k, v in src["params"].items():
        assert torch.equal(loaded["params"][k], v), k
    for k, v in src["ema"].items():
        assert torch.equal(loaded["ema"][k], v), k
    for n, st in src["optimizer"].items():
        for key, v in st.items():
            assert torch.equal(loaded["optimizer"][n][key], v), (n, key)
    ref = one_process(epochs=2)
    ref.train(epochs=1, progress_bar=False, ema_decay=script.EMA)
    cont = res["continued"]
    assert cont["epoch"] == 3
    close(cont["params"], dict(ref.module.state_dict()), what="params")
    close(cont["ema"], {k: v for k, v in sorted(ref._state.ema.items())}, what="ema")
    torch.testing.assert_close(
        torch.tensor(cont["train_losses"]), torch.tensor(ref.train_losses), atol=TOL, rtol=TOL
    )


def test_full_save_under_ddp_is_the_ordinary_file(run):
    a = torch.load(run / "ddp_full.pth", weights_only=True)
    b = torch.load(run / "ddp.pth", weights_only=True)
    assert a["model_state_dict"].keys() == b["model_state_dict"].keys()
    for k, v in b["model_state_dict"].items():
        assert torch.equal(a["model_state_dict"][k], v), k
    assert (
        a["optimizer"]["state_dict"]["state"].keys() == b["optimizer"]["state_dict"]["state"].keys()
    )


def test_initialize_from_checkpoint_into_fsdp(run):
    res = result(run)["initialized"]
    assert res["sharded"]
    for k, v in file_state(run / "one.pth")["params"].items():
        assert torch.equal(res["params"][k], v), k


def test_use_amp_sets_bf16_units_and_trains(run):
    amp = result(run)["amp"]
    assert amp["policy"], "no FSDP units"
    for unit in amp["policy"]:
        assert unit and all(p == (torch.bfloat16, torch.float32) for p in unit), unit
    assert amp["param_dtypes"] == ["torch.float32"]  # sharded master weights stay fp32
    assert all(torch.isfinite(torch.tensor(amp["losses"])))
    for unit in amp["policy_after"]:  # train() without use_amp: full precision again
        assert all(p == (None, None) for p in unit), unit


def test_callback_sees_the_same_epochs_and_logs_as_one_process(run):
    torch.manual_seed(0)
    h = fsdp_script.build(None, fsdp_script.BATCH * 2)
    log = script.EpochLog()
    h.add_callback(log)
    h.train(epochs=2, progress_bar=False)
    got = rank(run, 0)["callback"]
    assert [e for e, _ in got] == [e for e, _ in log.seen] == [1, 2]
    for (_, a), (_, b) in zip(got, log.seen, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], abs=TOL), k


def test_early_stopping_stops_every_rank_at_the_same_epoch(run):
    torch.manual_seed(0)
    h = fsdp_script.build(None, fsdp_script.BATCH * 2)
    from nnh.callbacks import EarlyStopping

    h.add_callback(EarlyStopping(monitor="val_loss", patience=1, min_delta=10.0))
    h.train(epochs=6, progress_bar=False)
    stops = [rank(run, r)["stopped_after"] for r in (0, 1)]
    assert stops == [len(h.train_losses)] * 2 == [2, 2]
    close(rank(run, 0)["early_params"], dict(h.module.state_dict()), what="early")


def test_log_likelihood_under_fsdp_equals_one_process(run):
    h = script.score_handler("ddp")
    assert not h.is_distributed
    one = h.log_likelihood(script.points(), ode_steps=script.STEPS, method="Heun",
                           noise_type="exact")  # fmt: skip
    got = rank(run, 0)["gen_fsdp"]
    assert got["sharded"]
    torch.testing.assert_close(got["ll"], one, atol=1e-5, rtol=1e-5)
    assert rank(run, 1)["gen_fsdp"]["ll"] is None  # gathered on rank 0, as under DDP


def test_adaptive_likelihood_of_a_dataset_is_refused_under_fsdp_only(run):
    """dopri5 takes a data-dependent number of steps per rank's share: under FSDP that would
    mismatch the model's all-gathers, so it is refused on every rank before any work."""
    for r in (0, 1):
        assert (
            "method='dopri5') of a Dataset/DataLoader cannot run under strategy='fsdp'"
            in (rank(run, r)["gen_fsdp"]["adaptive"])
        )
    assert rank(run, 0)["gen_ddp"]["adaptive"] is None  # DDP: no collective in the forward


def test_samples_under_fsdp_equal_ddp(run):
    """Each rank draws its share of the samples from its own noise (as under DDP), so a
    2-rank draw is not one process's draw; with the same seed FSDP equals DDP (1e-5)."""
    got, ddp = rank(run, 0)["gen_fsdp"], rank(run, 0)["gen_ddp"]
    for key in ("sde", "ode"):
        assert got[key].shape == (script.N_SAMPLES, 2)
        torch.testing.assert_close(got[key], ddp[key], atol=1e-5, rtol=1e-5)
    assert rank(run, 1)["gen_fsdp"]["sde"] is None


def test_full_save_in_one_process_is_the_ordinary_file(tmp_path):
    h = NNHandler(fsdp_script.Net, strategy="fsdp", seed=0)
    h.save(str(tmp_path / "a.pth"), full=True)
    h.save(str(tmp_path / "b.pth"))
    a = torch.load(tmp_path / "a.pth", weights_only=True)
    b = torch.load(tmp_path / "b.pth", weights_only=True)
    for k, v in b["model_state_dict"].items():
        assert torch.equal(a["model_state_dict"][k], v)
    assert NNHandler.load(str(tmp_path / "a.pth")).module.inp.weight.shape == (32, 5)


def test_bad_sharding_overrides_are_named_before_the_file_is_read(tmp_path):
    missing = str(tmp_path / "absent.pth")  # never opened: the arguments fail first
    with pytest.raises(ValueError, match=r"strategy must be one of \['ddp', 'fsdp'\], got 'zero'"):
        NNHandler.load(missing, strategy="zero")
    with pytest.raises(ValueError, match=r"unknown fsdp option\(s\) \['shards'\]"):
        NNHandler.load(missing, strategy="fsdp", fsdp={"shards": 2})
    with pytest.raises(ValueError, match="fsdp options were given but strategy is 'ddp'"):
        NNHandler.load(missing, fsdp={"min_params": 3})
    h = NNHandler(fsdp_script.Net, seed=0)
    with pytest.raises(TypeError, match=r"save\(full=\.\.\.\) must be True or False, got 'yes'"):
        h.save(str(tmp_path / "x.pth"), full="yes")
    assert not (tmp_path / "x.pth").exists()
