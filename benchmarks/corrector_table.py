"""The predictor-corrector's bias at equal model calls (issue 20), for ``bench_generative.py --corrector``.

Exact 4-mode mixture score (``MixtureExactScore``), 20 000 samples per run, ``snr = 0.16``,
one corrector step per predictor step, several seeds. Each row is run with every seed and
reports, per mode, the within-mode std error (signed: + is too wide) averaged over the seeds,
the mean over the modes with its standard error across seeds (the bias estimate: the modes'
Monte-Carlo noise averages out), and seed 0's max |std error| and max |weight error| (the
goals' metric). Rows: nnh's per-sample corrector (``sample_sde(method="pc")``), the seed's
batch-mean rule (the same loop with :func:`seed_rule_corrector`) and EM at the same calls.
"""

from __future__ import annotations

import math
import time

import torch
from gen_models import FOUR_MODES, MixtureExactScore, mixture_errors

from nnh.generative import SDE, em_sde_step, langevin_corrector_step, sample_sde, time_grid
from nnh.generative.sde import expand_time

__all__ = ["corrector_table", "pc_loop", "seed_rule_corrector", "signed_std_errors"]


def seed_rule_corrector(
    sde: SDE, score_fn, t, x: torch.Tensor, noise: torch.Tensor, snr: float, dt=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The seed's Langevin step: ``eps = 2 (snr mean||z|| / mean||s||)^2``, norms averaged over the batch."""
    score = score_fn(t, x)
    b = x.shape[0]
    z_norm = noise.reshape(b, -1).norm(dim=-1).mean()
    step = 2 * (snr * z_norm / score.reshape(b, -1).norm(dim=-1).mean()) ** 2
    x_mean = x + step * score
    return x_mean + torch.sqrt(2 * step) * noise, x_mean


def pc_loop(sde: SDE, score_fn, n: int, steps: int, grid: str, corrector, seed: int, snr=0.16):
    """``sample_sde(method="pc", corrector_steps=1)`` written out, with ``corrector`` swappable."""
    g = torch.Generator().manual_seed(seed)
    x = sde.prior((n, 2), generator=g)
    times = time_grid(sde, steps, sde.epsilon, grid)
    for i in range(steps):
        dt = times[i] - times[i + 1]
        t = torch.full((n,), times[i])
        x, _ = corrector(sde, score_fn, t, x, torch.randn(x.shape, generator=g), snr, dt)
        last = i == steps - 1
        z = torch.zeros_like(x) if last else torch.randn(x.shape, generator=g)
        x_next, x_mean = em_sde_step(sde, score_fn, t, x, dt, z)
        x = (x_mean if last else x_next).detach()
    return x


def signed_std_errors(x: torch.Tensor, sde: SDE) -> list[float]:
    """Per mode (weights 0.4, 0.3, 0.2, 0.1): sample std / target std - 1, samples to the nearest mean."""
    t = torch.tensor(sde.epsilon, dtype=torch.float64)
    mu, sigma = float(sde.mu(t)), float(sde.sigma(t))
    target = math.sqrt(mu**2 * FOUR_MODES["std"] ** 2 + sigma**2)
    means = mu * torch.tensor(FOUR_MODES["means"], dtype=torch.float64)
    y = x.double()
    nearest = torch.cdist(y, means).argmin(dim=1)
    return [
        float(((y[nearest == k] - means[k]) ** 2).mean().sqrt()) / target - 1
        for k in range(len(means))
    ]


def corrector_table(sde: SDE, n: int, seeds: int, long_steps: int = 500) -> list[dict]:
    """The rows for one SDE (see the module docstring); prints each as it comes."""
    model = MixtureExactScore(sde_config=sde.config())

    def score(t, x):
        with torch.no_grad():
            return model(t, x) / expand_time(sde.sigma(t), x)

    check = pc_loop(sde, score, 64, 5, "edm", langevin_corrector_step, 3)
    same = sample_sde(sde, score, (64, 2), 5, method="pc", time_grid="edm",
                      generator=torch.Generator().manual_seed(3))  # fmt: skip
    assert torch.equal(check, same), "the written-out loop must be sample_sde's pc"

    def nnh_pc(steps, grid, seed):
        g = torch.Generator().manual_seed(seed)
        return sample_sde(sde, score, (n, 2), steps, method="pc", time_grid=grid, generator=g)

    def seed_pc(steps, grid, seed):
        return pc_loop(sde, score, n, steps, grid, seed_rule_corrector, seed)

    def em(steps, grid, seed):
        g = torch.Generator().manual_seed(seed)
        return sample_sde(sde, score, (n, 2), steps, method="em", time_grid=grid, generator=g)

    configs = [
        ("pc per-sample (nnh)", nnh_pc, 200, "uniform", 400),
        ("pc batch-mean (seed)", seed_pc, 200, "uniform", 400),
        ("em", em, 400, "uniform", 400),
        ("pc per-sample (nnh)", nnh_pc, 200, "edm", 400),
        ("pc batch-mean (seed)", seed_pc, 200, "edm", 400),
        ("em", em, 400, "edm", 400),
        ("pc per-sample (nnh)", nnh_pc, long_steps, "uniform", 2 * long_steps),
        ("pc batch-mean (seed)", seed_pc, long_steps, "uniform", 2 * long_steps),
    ]
    rows = []
    for name, run, steps, grid, calls in configs:
        start = time.perf_counter()
        per_seed = []
        for seed in range(seeds):
            x = run(steps, grid, seed)
            per_seed.append(signed_std_errors(x, sde))
            if seed == 0:
                w0, s0 = mixture_errors(x, sde)
        modes = [sum(v) / seeds for v in zip(*per_seed, strict=True)]
        means = [sum(v) / len(v) for v in per_seed]
        bias = sum(means) / seeds
        se = (
            math.sqrt(sum((m - bias) ** 2 for m in means) / (seeds - 1) / seeds)
            if seeds > 1
            else float("nan")
        )
        row = {
            "sampler": name,
            "grid": grid,
            "calls": calls,
            "std_err_per_mode": [round(v, 4) for v in modes],
            "std_bias": round(bias, 4),
            "std_bias_se": round(se, 4),
            "seed0_max_std_err": round(s0, 4),
            "seed0_max_weight_err": round(w0, 4),
            "seconds_per_run": round((time.perf_counter() - start) / seeds, 2),
        }
        rows.append(row)
        print(
            f"  {name:21s} {grid:7s} {calls:5d} | {' '.join(f'{v:+.4f}' for v in modes)} | "
            f"{bias:+.4f} ± {se:.4f} | {s0:.4f} {w0:.4f} | {row['seconds_per_run']:.1f}",
            flush=True,
        )
    return rows
