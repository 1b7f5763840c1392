"""One-file checkpoints and the remaining train() options under FSDP, for
tests/test_fsdp_full_file.py (launched once by torchrun on gloo, 2 ranks).

    python fsdp_full_script.py OUT_DIR

OUT_DIR/one.pth must exist: a single-process checkpoint (tests/test_fsdp_full_file.py writes
it). Rank 0 writes OUT_DIR/result.pt; every rank writes OUT_DIR/rank{r}.pt with what only
that rank can tell (its stop epoch, its sample / likelihood results).
"""

from __future__ import annotations

import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
import torch.distributed as dist
from fsdp_script import BATCH, N_TRAIN, N_VAL, Block, Net, build, data
from gen_models import ScoreMLP
from torch.distributed.tensor import DTensor
from torch.utils.data import TensorDataset

from nnh import NNHandler
from nnh.callbacks import EarlyStopping
from nnh.callbacks.base import Callback
from nnh.generative import VPSDE
from nnh.handler.finite import NonFiniteStateError

WRAP = {"wrap_classes": [Block]}
EMA = 0.9
N_POINTS, N_SAMPLES, STEPS = 37, 21, 6


class EpochLog(Callback):
    """Records every epoch's number and logs (for the callback comparison)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list = []

    def on_epoch_end(self, epoch, logs=None):
        self.seen.append((epoch, {k: float(v) for k, v in (logs or {}).items()}))


class ShardableScore(ScoreMLP):
    """ScoreMLP whose constructor-filled buffer is re-created by ``reset_parameters`` (the
    meta-device build of strategy='fsdp' needs it)."""

    def reset_parameters(self) -> None:
        with torch.no_grad():
            n = self.freqs.numel()
            self.freqs.copy_(math.pi * torch.arange(1, n + 1, dtype=torch.float32))


def full(value):
    return (
        value.full_tensor().detach().clone()
        if isinstance(value, DTensor)
        else value.detach().clone()
    )


def gathered_state(h: NNHandler) -> dict:
    """Every tensor of the sharded state, all-gathered (a collective: every rank calls it)."""
    names = {id(p): n for n, p in h.module.named_parameters()}
    opt = {}
    for p, st in h.optimizer.state.items():
        opt[names[id(p)]] = {k: full(v) for k, v in st.items() if isinstance(v, torch.Tensor)}
    st = h._state
    return {
        "params": {k: full(v) for k, v in h.module.state_dict().items()},
        "optimizer": opt,
        "ema": None if st.ema is None else {k: full(v) for k, v in sorted(st.ema.items())},
        "epoch": st.epoch,
        "train_losses": list(h.train_losses),
    }


def trained(strategy: str, epochs: int = 2, **options) -> NNHandler:
    h = build(strategy, BATCH, WRAP if strategy == "fsdp" else None)
    h.train(epochs=epochs, progress_bar=False, ema_decay=EMA, **options)
    return h


def units_policy(h: NNHandler) -> list:
    from torch.distributed.fsdp import FSDPModule

    out = []
    for m in h.module.modules():
        if isinstance(m, FSDPModule):
            for g in m._get_fsdp_state()._fsdp_param_groups:
                out.append([(p.param_dtype, p.reduce_dtype) for p in g.fsdp_params])
    return out


def score_handler(strategy: str) -> NNHandler:
    torch.manual_seed(0)
    fsdp = {"min_params": 100} if strategy == "fsdp" else None
    h = NNHandler(ShardableScore, hidden=16, model_type="score_based", strategy=strategy,
                  fsdp=fsdp, seed=0)  # fmt: skip
    h.set_sde(VPSDE)
    return h


def points() -> torch.Tensor:
    return 2 * torch.randn(N_POINTS, 2, generator=torch.Generator().manual_seed(3))


def generative(strategy: str) -> dict:
    h = score_handler(strategy)
    h.seed = 0
    sde = h.sample((N_SAMPLES, 2), STEPS, bar=False)
    h.seed = 0
    ode = h.sample((N_SAMPLES, 2), STEPS, method="ode", bar=False)
    ll = h.log_likelihood(points(), ode_steps=STEPS, method="Heun", noise_type="exact")
    try:
        h.log_likelihood(TensorDataset(points()), method="dopri5")
        adaptive = None
    except ValueError as err:
        adaptive = str(err)
    return {
        "sde": sde,
        "ode": ode,
        "ll": ll,
        "adaptive": adaptive,
        "sharded": type(h.module).__name__.startswith("FSDP"),
    }


def main() -> None:
    out = sys.argv[1]
    torch.set_num_threads(1)
    results: dict = {}
    mine: dict = {}

    # 1. one file from a sharded run, equal to the gathered shards
    h = trained("fsdp")
    results["gathered"] = gathered_state(h)
    h.save(os.path.join(out, "full.pth"), full=True)
    try:
        h.save(os.path.join(out, "bg.pth"), full=True, blocking=False)
    except ValueError as err:
        results["background_error"] = str(err)

    # a NaN in one rank's shard only: no file, every rank raises
    bad = build("fsdp", BATCH, WRAP)
    if dist.get_rank() == 1:
        with torch.no_grad():
            bad.module.out.bias.to_local().fill_(float("nan"))
    try:
        bad.save(os.path.join(out, "nan.pth"), full=True)
    except (NonFiniteStateError, RuntimeError) as err:  # rank 0 has the reason, others told
        mine["nan_error"] = f"{type(err).__name__}: {err}"

    # 2. ordinary files into an FSDP run: single-process, DDP, and the full export itself
    d = trained("ddp")
    d.save(os.path.join(out, "ddp.pth"))
    d.save(os.path.join(out, "ddp_full.pth"), full=True)  # DDP: full=True is the ordinary file
    for name in ("one", "ddp", "full"):
        g = NNHandler.load(os.path.join(out, f"{name}.pth"), strategy="fsdp", fsdp=WRAP)
        loaded = gathered_state(g)
        loaded["sharded"] = type(g.module).__name__.startswith("FSDP")
        g.set_train_loader(data(N_TRAIN, 0), batch_size=BATCH, shuffle=False)  # per rank
        g.set_val_loader(data(N_VAL, 1), batch_size=BATCH)
        g.train(epochs=1, progress_bar=False, ema_decay=EMA)
        results[f"load_{name}"] = {"loaded": loaded, "continued": gathered_state(g)}
    w = NNHandler.initialize_from_checkpoint(os.path.join(out, "one.pth"), Net, strategy="fsdp",
                                             fsdp=WRAP)  # fmt: skip
    results["initialized"] = {
        "params": {k: full(v) for k, v in w.module.state_dict().items()},
        "sharded": type(w.module).__name__.startswith("FSDP"),
    }

    # 3. use_amp sets the units' mixed precision (bf16 gathers, fp32 reduction)
    a = build("fsdp", BATCH, WRAP)
    a.train(epochs=1, progress_bar=False, use_amp=True)
    results["amp"] = {
        "policy": units_policy(a),
        "losses": list(a.train_losses),
        "param_dtypes": sorted({str(p.dtype) for p in a.module.parameters()}),
    }
    a.train(epochs=1, progress_bar=False, use_amp=False)  # (omitted: the last call's value)
    results["amp"]["policy_after"] = units_policy(a)

    # 4. callbacks and early stopping
    c = build("fsdp", BATCH, WRAP)
    log = EpochLog()
    c.add_callback(log)
    c.train(epochs=2, progress_bar=False)
    mine["callback"] = log.seen
    e = build("fsdp", BATCH, WRAP)
    e.add_callback(EarlyStopping(monitor="val_loss", patience=1, min_delta=10.0))
    e.train(epochs=6, progress_bar=False)
    mine["stopped_after"] = len(e.train_losses)
    mine["early_params"] = {k: full(v) for k, v in e.module.state_dict().items()}

    # 5. sample and log_likelihood: FSDP against DDP (same weights, same per-rank seeds)
    mine["gen_fsdp"] = generative("fsdp")
    mine["gen_ddp"] = generative("ddp")

    rank = dist.get_rank()
    torch.save(mine, os.path.join(out, f"rank{rank}.pt"))
    if rank == 0:
        torch.save(results, os.path.join(out, "result.pt"))


if __name__ == "__main__":
    main()
