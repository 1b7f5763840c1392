"""Laws of the adaptive Dormand-Prince 5(4) solver and the noise-level likelihood (issue 20):
exact on a linear ODE to its tolerance, the error shrinks with ``rtol``, ``2 + 6 * attempts``
calls (FSAL: 6 per accepted or rejected attempt), a sample's answer does not depend on its
batch, pure (inputs untouched), ``t(lambda)`` inverts ``lambda(t)`` for every SDE, and the
noise-level likelihood equals the closed-form Gaussian flow likelihood."""

from __future__ import annotations

import math

import torch
from hypothesis import given
from hypothesis import strategies as st
from test_sde_laws import any_sde

from nnh.generative import SDE, log_likelihood_ode
from nnh.generative.adaptive import dopri5_solve, dopri5_start, dopri5_step
from nnh.generative.level_ode import noise_level_of, time_of_level

F64 = torch.float64
seeds = st.integers(0, 2**31 - 1)


def linear_problem(seed: int, batch: int, dim: int):
    """``dy/ds = a y`` (a rate per sample and entry), ``dq/ds = c . y``: closed form."""
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(batch, dim, generator=g, dtype=F64) * 4 - 2
    c = torch.randn(batch, dim, generator=g, dtype=F64)
    y0 = torch.randn(batch, dim, generator=g, dtype=F64)
    s0 = torch.rand(batch, generator=g, dtype=F64)
    s1 = s0 + 0.5 + torch.rand(batch, generator=g, dtype=F64)
    calls = [0]

    def field(s, y):
        calls[0] += 1
        return a * y, (c * y).sum(1)

    span = (s1 - s0)[:, None]
    y_end = y0 * torch.exp(a * span)
    q_end = (c * y0 * torch.expm1(a * span) / a).sum(1)
    return field, s0, s1, y0, y_end, q_end, calls


def max_error(y, q, y_end, q_end) -> float:
    return max(float((y - y_end).abs().max()), float((q - q_end).abs().max()))


@given(seed=seeds, batch=st.integers(1, 5), dim=st.integers(1, 4), log_tol=st.integers(-9, -4))
def test_exact_on_a_linear_ode_to_its_tolerance(seed, batch, dim, log_tol):
    field, s0, s1, y0, y_end, q_end, calls = linear_problem(seed, batch, dim)
    tol = 10.0**log_tol
    y, q, stats = dopri5_solve(field, s0, s1, y0, rtol=tol, atol=tol)
    scale = 1 + max(float(y_end.abs().max()), float(q_end.abs().max()))
    assert max_error(y, q, y_end, q_end) < 50 * tol * scale
    assert calls[0] == stats.calls == 2 + 6 * stats.attempts
    assert bool(((stats.accepted + stats.rejected) <= stats.attempts).all())
    assert int((stats.accepted + stats.rejected).max()) == stats.attempts


@given(seed=seeds, batch=st.integers(1, 4))
def test_the_error_shrinks_with_rtol(seed, batch):
    field, s0, s1, y0, y_end, q_end, _ = linear_problem(seed, batch, 3)
    errors, attempts = [], []
    for tol in (1e-4, 1e-7, 1e-10):
        y, q, stats = dopri5_solve(field, s0, s1, y0, rtol=tol, atol=tol)
        errors.append(max_error(y, q, y_end, q_end))
        attempts.append(stats.attempts)
    assert errors[2] < errors[0] and errors[1] < errors[0]
    assert attempts[0] <= attempts[1] <= attempts[2]


@given(seed=seeds, batch=st.integers(2, 6), pick=st.integers(0, 5))
def test_a_sample_does_not_depend_on_its_batch(seed, batch, pick):
    field, s0, s1, y0, *_ = linear_problem(seed, batch, 2)
    i = pick % batch
    y, q, _ = dopri5_solve(field, s0, s1, y0)
    inputs = [v.clone() for v in (s0, s1, y0)]

    def one(s, yy):  # the same field, restricted to sample i
        dy, dq = field(s.expand(batch), yy.expand(batch, -1))
        return dy[i : i + 1], dq[i : i + 1]

    y1, q1, _ = dopri5_solve(one, s0[i : i + 1], s1[i : i + 1], y0[i : i + 1])
    assert torch.equal(y1[0], y[i]) and torch.equal(q1[0], q[i])
    assert all(torch.equal(a, b) for a, b in zip(inputs, (s0, s1, y0)))  # pure


@given(sde=any_sde, frac=st.lists(st.floats(0.001, 1.0), min_size=1, max_size=5))
def test_time_of_level_inverts_the_noise_level(sde, frac):
    t = torch.tensor(frac, dtype=F64) * sde.T
    back = time_of_level(sde, noise_level_of(sde, t))
    assert torch.allclose(back, t, rtol=1e-6, atol=1e-9 * sde.T)


class Custom(SDE):
    """A VP-like SDE that only gives sigma/mu (the bisection path of ``time_of_level``)."""

    T, epsilon = 1.0, 1e-5

    def sigma(self, t):
        return torch.sqrt(-torch.expm1(-8.0 * torch.as_tensor(t)))

    def mu(self, t):
        return torch.exp(-4.0 * torch.as_tensor(t))


@given(frac=st.lists(st.floats(0.001, 1.0), min_size=1, max_size=5))
def test_time_of_level_bisects_for_any_sde(frac):
    t = torch.tensor(frac, dtype=F64)
    back = time_of_level(Custom(), noise_level_of(Custom(), t))
    assert torch.allclose(back, t, rtol=1e-9, atol=1e-12)


@given(sde=any_sde, seed=seeds, std=st.floats(0.2, 2.0))
def test_noise_level_dopri5_equals_the_gaussian_flow_likelihood(sde, seed, std):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 2, generator=g, dtype=F64) * std

    def score(t, y):
        tt = torch.as_tensor(t, dtype=F64).reshape(-1, 1)
        return -y / (sde.mu(tt) ** 2 * std**2 + sde.sigma(tt) ** 2)

    t0, t1 = sde.epsilon, sde.T
    lp = log_likelihood_ode(
        sde, score, x, steps=500, probes=None, method="dopri5", rtol=1e-8, atol=1e-8
    )
    tt = torch.tensor([t0, t1], dtype=F64)
    v = sde.mu(tt) ** 2 * std**2 + sde.sigma(tt) ** 2
    x1 = x * torch.sqrt(v[1] / v[0])
    ref = sde.prior_log_prob(x1) + 0.5 * 2 * torch.log(v[1] / v[0])
    assert torch.allclose(lp, ref, rtol=0, atol=1e-5 * (1 + float(ref.abs().max())))
    assert math.isfinite(float(lp.sum()))


@given(seed=seeds, batch=st.integers(1, 4))
def test_a_too_long_step_is_rejected_without_moving_and_retried_shorter(seed, batch):
    g = torch.Generator().manual_seed(seed)
    a = -(5 + 5 * torch.rand(batch, 3, generator=g, dtype=F64))  # fast decay: a long step fails

    def field(s, y):
        return a * y, y.sum(1)

    s0, s1 = torch.zeros(batch, dtype=F64), torch.full((batch,), 2.0, dtype=F64)
    y0 = 1 + torch.rand(batch, 3, generator=g, dtype=F64)
    start = dopri5_start(field, s0, s1, y0, torch.zeros(batch, dtype=F64), 1e-8, 1e-8)
    state, accepted = dopri5_step(field, start._replace(h=s1 - s0), s1, 1e-8, 1e-8)
    assert not bool(accepted.any())
    assert torch.equal(state.s, s0) and torch.equal(state.y, y0) and torch.equal(state.q, start.q)
    assert bool((state.h <= 0.2 * (s1 - s0) + 1e-12).all())  # shrunk by the largest factor
    ok, accepted = dopri5_step(field, start, s1, 1e-8, 1e-8)  # Hairer's first step is accepted
    assert bool(accepted.all()) and bool((ok.s > s0).all())


@given(seed=seeds, batch=st.integers(1, 4), log_tol=st.integers(-9, -5))
def test_the_integral_is_held_to_its_tolerance_where_y_stands_still(seed, batch, log_tol):
    g = torch.Generator().manual_seed(seed)
    w = 2 + 6 * torch.rand(batch, generator=g, dtype=F64)  # dq/ds = w cos(w s), y constant

    def field(s, y):
        return torch.zeros_like(y), w * torch.cos(w * s)

    s0, s1 = torch.zeros(batch, dtype=F64), torch.full((batch,), 3.0, dtype=F64)
    tol = 10.0**log_tol
    y, q, _ = dopri5_solve(field, s0, s1, torch.ones(batch, 2, dtype=F64), rtol=tol, atol=tol)
    assert torch.equal(y, torch.ones(batch, 2, dtype=F64))
    assert float((q - torch.sin(w * s1)).abs().max()) < 50 * tol
