"""Laws of the unbiased Langevin corrector (issue 20): a sample's step depends on its own
``t`` only, never on the other samples; the step size is ``2 alpha snr^2 sigma(t)^2``; Song
et al.'s ``alpha`` is 1 for VE and ``mu(t)^2 / mu(t - dt)^2`` otherwise; on Gaussian data the
step's stationary variance stays within ``snr^2`` of the target."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_sde_laws import any_sde, score, snapshot, unchanged

from nnh.generative import langevin_corrector_step

F64 = torch.float64
seeds = st.integers(0, 2**31 - 1)
fracs = st.floats(0.0, 1.0)


def draw(seed: int, *shape: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64), torch.randn(*shape, generator=g, dtype=F64)


@settings(max_examples=40)
@given(any_sde, seeds, st.integers(0, 4), st.floats(0.01, 1.0), st.floats(1.0, 1e3))
def test_a_samples_step_does_not_depend_on_the_other_samples(sde, seed, i, snr, scale):
    # perturb every other sample (position, noise, time) by a large factor: sample i is bitwise equal
    x, z = draw(seed, 5, 3)
    t = torch.linspace(0.1, 0.9, 5, dtype=F64) * sde.T
    others = torch.ones(5, 1, dtype=F64).index_fill(0, torch.tensor([i]), 0.0)
    x2, z2 = x + scale * others, z * (1 + scale * others)
    t2 = torch.where(others[:, 0] > 0, 0.05 * sde.T, t)
    for dt in (None, 0.01 * sde.T):
        a = langevin_corrector_step(sde, score, t, x, z, snr, dt)
        b = langevin_corrector_step(sde, score, t2, x2, z2, snr, dt)
        assert all(torch.equal(u[i], v[i]) for u, v in zip(a, b, strict=True))


@settings(max_examples=40)
@given(any_sde, seeds, fracs, st.floats(0.01, 1.0))
def test_the_step_size_is_two_snr_squared_sigma_squared(sde, seed, frac, snr):
    x, z = draw(seed, 4, 2)
    t = torch.full((4,), frac * sde.T, dtype=F64)
    before = snapshot(x, z, t)
    x_next, x_mean = langevin_corrector_step(sde, score, t, x, z, snr)
    assert unchanged(before, x, z, t)
    eps = 2 * snr**2 * sde.sigma(t).reshape(-1, 1) ** 2
    assert torch.allclose(x_mean, x + eps * score(t, x), rtol=1e-12, atol=1e-300)
    assert torch.allclose(x_next, x_mean + torch.sqrt(2 * eps) * z, rtol=1e-12, atol=1e-300)


@settings(max_examples=40)
@given(any_sde, seeds, st.floats(0.05, 1.0), st.floats(1e-4, 0.04), st.floats(0.01, 1.0))
def test_alpha_is_the_ratio_of_squared_means_and_one_for_ve(sde, seed, frac, dt_frac, snr):
    x, z = draw(seed, 3, 2)
    t = torch.full((3,), frac * sde.T, dtype=F64)
    dt = dt_frac * frac * sde.T
    plain = langevin_corrector_step(sde, score, t, x, z, snr)
    scaled = langevin_corrector_step(sde, score, t, x, z, snr, dt)
    alpha = (sde.mu(t) / sde.mu(t - dt)).reshape(-1, 1) ** 2
    eps = 2 * snr**2 * alpha * sde.sigma(t).reshape(-1, 1) ** 2
    assert torch.allclose(scaled[1], x + eps * score(t, x), rtol=1e-12, atol=1e-300)
    assert bool((alpha <= 1).all())  # a shorter step, never longer (VP/sub-VP: 1 - beta dt)
    if float(sde.mu(t[0])) == 1.0:  # VE: alpha = 1 exactly
        assert all(torch.equal(a, b) for a, b in zip(plain, scaled, strict=True))


@settings(max_examples=40)
@given(any_sde, st.floats(0.01, 1.0), st.floats(0.01, 3.0), st.floats(0.01, 0.5))
def test_on_gaussian_data_the_stationary_variance_is_within_snr_squared(sde, frac, s, snr):
    # data N(0, s^2): the marginal is N(0, V), V = mu^2 s^2 + sigma^2; the step maps a variance
    # W to (1 - eps/V)^2 W + 2 eps, whose fixed point is V / (1 - eps / (2 V)), eps <= 2 snr^2 V
    t = torch.full((1,), frac * sde.T, dtype=F64)
    v = sde.mu(t) ** 2 * s**2 + sde.sigma(t) ** 2
    one = torch.ones(1, 1, dtype=F64)
    _, x_mean = langevin_corrector_step(sde, lambda tt, y: -y / v, t, one, 0 * one, snr)
    eps = float((1 - x_mean) * v)  # x_mean = 1 - eps / V
    assert 0 < eps <= 2 * snr**2 * float(v) * (1 + 1e-12)
    stationary = 1 / (1 - eps / (2 * float(v)))
    assert stationary - 1 <= snr**2 / (1 - snr**2) + 1e-12
