"""Distributed sampling and likelihoods for tests/test_ddp_generative.py (launched by torchrun).

    python ddp_generative_script.py OUT_DIR

Every rank runs the same code. Rank 0 writes OUT_DIR/result.pt with the gathered samples and
likelihoods; every rank writes OUT_DIR/rank{r}.pt with what its calls returned.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
from gen_models import ExactGaussianScore, ScoreMLP, SDESampler
from torch.utils.data import DataLoader, TensorDataset

from nnh import NNHandler
from nnh.generative import VPSDE

N_POINTS, N_SAMPLES, BATCH, STEPS = 37, 101, 8, 12  # 37 on 2 ranks: one padded duplicate


def points() -> TensorDataset:
    g = torch.Generator().manual_seed(3)
    return TensorDataset(2 * torch.randn(N_POINTS, 2, generator=g))


def mlp_handler() -> NNHandler:
    torch.manual_seed(0)
    h = NNHandler(ScoreMLP, hidden=32, model_type="score_based")
    h.set_sde(VPSDE)
    return h


def likelihoods(h: NNHandler, data) -> torch.Tensor | None:
    return h.log_likelihood(data, ode_steps=STEPS, method="Heun", noise_type="exact")


def conditions() -> torch.Tensor:
    """Per-sample means ``(4 (i mod 5), 0)``: sample i must land near its own condition."""
    return torch.stack([4.0 * (torch.arange(N_SAMPLES) % 5), torch.zeros(N_SAMPLES)], dim=1)


def exact_handler() -> NNHandler:
    h = NNHandler(ExactGaussianScore, model_type="score_based", sde_config=VPSDE().config())
    h.set_sde(VPSDE)
    return h


def main() -> None:
    out = sys.argv[1]
    torch.set_num_threads(1)
    h = mlp_handler()
    assert h.is_distributed and h.world_size == 2, (h.is_distributed, h.world_size)
    from_dataset = likelihoods(h, points())
    from_loader = likelihoods(h, DataLoader(points(), batch_size=BATCH))
    g = exact_handler()
    g.seed = 0
    samples = g.sample((N_SAMPLES, 2), 30, bar=False)
    g.seed = 0
    ode_plain = g.sample((N_SAMPLES, 2), 5, method="ode", bar=False)
    g.seed = 0
    ode = g.sample((N_SAMPLES, 2), 10, method="ode", condition=[conditions()], bar=False)
    g.set_sampler(SDESampler, dim=2, steps=5)  # calls g.sample on rank 0 alone: no collective
    custom = g.get_samples(7)
    mine = {"custom": custom, "dataset": from_dataset, "loader": from_loader, "samples": samples, "ode": ode, "ode_plain": ode_plain}
    torch.save(mine, os.path.join(out, f"rank{h.rank}.pt"))
    if h.rank == 0:
        torch.save(mine, os.path.join(out, "result.pt"))


if __name__ == "__main__":
    main()
