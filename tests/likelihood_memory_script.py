"""Peak memory of ``NNHandler.log_likelihood`` for a given number of ODE steps (run in a fresh process).

Usage: ``python tests/likelihood_memory_script.py STEPS [METHOD RTOL]``; prints the growth of
the peak resident set size (MB) during the call. With ``METHOD=dopri5`` the number of steps is
set by ``RTOL`` (= ``atol``) and ``STEPS`` is the most attempts. A small but activation-heavy score MLP (wide batch,
several probes, narrow layers) makes a kept autograd graph cost ~MBs per step.
"""

import resource
import sys

import torch
from torch import nn

from nnh import NNHandler
from nnh.generative import VPSDE


class ScoreNet(nn.Module):
    def __init__(self, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, hidden), nn.SiLU(), nn.Linear(hidden, 2))

    def forward(self, t, x):
        return self.net(torch.cat([x, t[:, None]], dim=1))


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


if __name__ == "__main__":
    steps = int(sys.argv[1])
    method = sys.argv[2] if len(sys.argv) > 2 else "Euler"
    tol = float(sys.argv[3]) if len(sys.argv) > 3 else 1e-5
    torch.manual_seed(0)
    torch.set_num_threads(1)
    handler = NNHandler(ScoreNet, model_type="score_based")
    handler.set_sde(VPSDE)
    x = torch.randn(512, 2)
    handler.log_likelihood(x, ode_steps=2, n_cotangent_vectors=8)  # warm-up allocations
    before = peak_mb()
    out = handler.log_likelihood(
        x, ode_steps=steps, n_cotangent_vectors=8, method=method, rtol=tol, atol=tol
    )
    assert out.shape == (512,) and bool(torch.isfinite(out).all())
    print(f"{peak_mb() - before:.1f}")
