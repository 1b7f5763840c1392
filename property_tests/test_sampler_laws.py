"""Laws of the second-wave sampler steps (issue 10): purity, the Langevin step's size, the
probability-flow step's accuracy on a Gaussian, Tweedie's exact posterior mean, EDM grids."""

from __future__ import annotations

import itertools
import math

import torch
from hypothesis import given
from hypothesis import strategies as st
from test_sde_laws import any_sde, score, snapshot, unchanged

from nnh.generative import (
    SDE,
    edm_grid,
    langevin_corrector_step,
    probability_flow_step,
    sample_sde,
    tweedie_denoise,
    uniform_grid,
)
from nnh.generative.time_grid import lambda_floor, noise_level

F64 = torch.float64
seeds = st.integers(0, 2**31 - 1)


def gaussian_var(sde: SDE, t: torch.Tensor, s: float) -> torch.Tensor:
    return sde.mu(t) ** 2 * s**2 + sde.sigma(t) ** 2


@given(any_sde, seeds, st.sampled_from(["Euler", "Heun", "RK4"]))
def test_sampler_steps_are_pure_and_deterministic(sde, seed, method):
    g = torch.Generator().manual_seed(seed)
    x, noise = torch.randn(3, 2, generator=g), torch.randn(3, 2, generator=g)
    t = torch.full((3,), 0.5 * sde.T)
    before = snapshot(x, noise, t)
    state = torch.get_rng_state()
    runs = [
        (
            *langevin_corrector_step(sde, score, t, x, noise, 0.16),
            probability_flow_step(sde, score, t, x, 0.01 * sde.T, method),
            tweedie_denoise(sde, score, t, x),
        )
        for _ in range(2)
    ]
    assert unchanged(before, x, noise, t)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))
    assert all(out is not x for out in runs[0])


@given(any_sde, seeds, st.floats(0.05, 0.95), st.floats(0.1, 3.0))
def test_flow_step_follows_the_exact_gaussian_flow_at_its_order(sde, seed, frac, s):
    # data N(0, s^2 I): the flow map from t to t - dt is x * sqrt(v(t - dt) / v(t)) exactly
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 2, generator=g, dtype=F64)
    t = torch.full((4,), frac * sde.T, dtype=F64)

    def exact_score(tt, y):
        return -y / gaussian_var(sde, tt, s).reshape(-1, 1)

    dt = 1e-3 * sde.T
    exact = x * torch.sqrt(gaussian_var(sde, t - dt, s) / gaussian_var(sde, t, s)).reshape(-1, 1)
    err = {
        m: (probability_flow_step(sde, exact_score, t, x, dt, m) - exact).abs().max().item()
        for m in ("Euler", "Heun", "RK4")
    }
    scale = x.abs().max().item()
    assert err["RK4"] <= err["Heun"] + 1e-12 * scale
    assert err["Heun"] <= err["Euler"] + 1e-12 * scale
    assert err["RK4"] <= 1e-7 * scale


@given(any_sde, seeds, st.floats(0.0, 1.0), st.floats(0.1, 3.0))
def test_tweedie_gives_the_exact_gaussian_posterior_mean(sde, seed, frac, s):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(2, generator=g, dtype=F64)
    x = torch.randn(4, 2, generator=g, dtype=F64)
    t = torch.full((4,), sde.epsilon + frac * (sde.T - sde.epsilon), dtype=F64)
    mu, v = sde.mu(t).reshape(-1, 1), gaussian_var(sde, t, s).reshape(-1, 1)

    def exact_score(tt, y):
        return -(y - mu * m) / v

    posterior_mean = m + (s**2 * mu / v) * (x - mu * m)
    # (x + sigma^2 s) / mu cancels to ~1e-16 of |x| / mu: tiny mu near T costs digits
    atol = 1e-12 * (x.abs() / mu).max().item() + 1e-12
    torch.testing.assert_close(
        tweedie_denoise(sde, exact_score, t, x), posterior_mean, rtol=1e-9, atol=atol
    )


@given(any_sde, st.integers(1, 60))
def test_edm_grid_is_equally_spaced_in_noise_level_to_the_one_over_rho(sde, steps):
    grid = edm_grid(sde, steps, sde.epsilon)
    assert len(grid) == steps + 1 and grid[0] == sde.T and grid[-1] == sde.epsilon
    assert all(a > b for a, b in itertools.pairwise(grid))
    # the schedule runs from lambda(T) to max(lambda(t_end), floor); the last time is t_end
    top, low = float(noise_level(sde, sde.T)), float(noise_level(sde, sde.epsilon))
    low = max(low, lambda_floor(top))
    frac = torch.arange(steps + 1, dtype=F64) / steps
    want = (top ** (1 / 7) + frac * (low ** (1 / 7) - top ** (1 / 7))) ** 7
    got = noise_level(sde, torch.tensor(grid, dtype=F64))
    torch.testing.assert_close(got[:-1] ** (1 / 7), want[:-1] ** (1 / 7), rtol=1e-6, atol=1e-9)
    uni = uniform_grid(sde, steps, sde.epsilon)
    assert uni[0] == sde.T and math.isclose(uni[-1], sde.epsilon)


@given(
    any_sde, seeds, st.sampled_from(["Euler", "Heun", "RK4"]), st.sampled_from(["uniform", "edm"])
)
def test_the_ode_sampler_is_a_function_of_the_prior_draw(sde, seed, method, grid):
    runs = [
        sample_sde(
            sde,
            score,
            (3, 2),
            4,
            method="ode",
            ode_method=method,
            time_grid=grid,
            generator=torch.Generator().manual_seed(seed),
            dtype=F64,
        )
        for _ in range(2)
    ]
    assert torch.equal(*runs)
