"""Laws of the generative core: SDE identities for any T, divergence estimators, purity,
config round-trips."""

from __future__ import annotations

import io
import json
import math

import torch
from hypothesis import given
from hypothesis import strategies as st

from nnh.generative import (
    SDE,
    VESDE,
    VPSDE,
    SubVPSDE,
    denoising_score_matching_loss,
    em_sde_step,
    exact_divergence,
    hutchinson_divergence,
    ode_likelihood_step,
    sample_probes,
)

F64 = torch.float64
Ts = st.floats(0.1, 10.0, allow_subnormal=False)


@st.composite
def ve_sdes(draw) -> VESDE:
    lo = draw(st.floats(1e-3, 1.0, allow_subnormal=False))
    ratio = draw(st.floats(2.0, 1e4, allow_subnormal=False))
    T = draw(Ts)
    return VESDE(
        sigma_min=lo,
        sigma_max=lo * ratio,
        T=T,
        epsilon=T * draw(st.floats(1e-6, 0.1, allow_subnormal=False)),
    )


@st.composite
def beta_sdes(draw) -> SDE:
    b0 = draw(st.floats(0.01, 1.0, allow_subnormal=False))
    b1 = b0 + draw(st.floats(0.0, 30.0, allow_subnormal=False))
    T = draw(Ts)
    cls = draw(st.sampled_from([VPSDE, SubVPSDE]))
    return cls(
        beta_min=b0, beta_max=b1, T=T, epsilon=T * draw(st.floats(1e-6, 0.1, allow_subnormal=False))
    )


any_sde = st.one_of(ve_sdes(), beta_sdes())


def coefficients(sde: SDE, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a(t), g(t)) read back through the public drift/diffusion with x = 1."""
    ones = torch.ones(t.shape[0], 1, dtype=t.dtype)
    return sde.drift(t, ones)[:, 0], sde.diffusion(t, ones)[:, 0]


# ---------------------------------------------------------------- SDE identities
@given(any_sde)
def test_marginal_moments_solve_the_forward_moment_odes(sde):
    """sigma(t)^2 and mu(t) solve dVar/dt = 2 a Var + g^2 (Var(0) = sigma(0)^2), dmu/dt = a mu.

    Checked twice: (1) by quadrature of the ODE's solution
    Var(t) = mu(t)^2 [sigma(0)^2 + int_0^t g^2 / mu^2], mu(t) = exp(int_0^t a), on 20001 points;
    (2) by central differences of sigma^2 and mu at interior points.
    """
    t = torch.linspace(0.0, sde.T, 20001, dtype=F64)
    a, g = coefficients(sde, t)
    mu_num = torch.exp(torch.cumulative_trapezoid(a, t, dim=0))
    mu_num = torch.cat([torch.ones(1, dtype=F64), mu_num])
    assert torch.allclose(sde.mu(t), mu_num, rtol=1e-6, atol=1e-12)
    mu = sde.mu(t)
    acc = torch.cat([torch.zeros(1, dtype=F64), torch.cumulative_trapezoid(g**2 / mu**2, t, dim=0)])
    var_num = mu**2 * (sde.sigma(t[:1]) ** 2 + acc)
    var = sde.sigma(t) ** 2
    assert torch.allclose(var, var_num, rtol=1e-4, atol=1e-7 * var.max().item())

    h = 1e-6 * sde.T
    ti = torch.linspace(0.05, 0.95, 7, dtype=F64) * sde.T
    a_i, g_i = coefficients(sde, ti)
    dvar = (sde.sigma(ti + h) ** 2 - sde.sigma(ti - h) ** 2) / (2 * h)
    dmu = (sde.mu(ti + h) - sde.mu(ti - h)) / (2 * h)
    assert torch.allclose(dvar, 2 * a_i * sde.sigma(ti) ** 2 + g_i**2, rtol=1e-5, atol=1e-8)
    assert torch.allclose(dmu, a_i * sde.mu(ti), rtol=1e-5, atol=1e-10)


@given(ve_sdes())
def test_ve_end_points(sde):
    ends = torch.tensor([0.0, sde.T], dtype=F64)
    assert torch.allclose(
        sde.sigma(ends), torch.tensor([sde.sigma_min, sde.sigma_max], dtype=F64), rtol=1e-12
    )
    assert torch.equal(sde.mu(ends), torch.ones(2, dtype=F64))
    assert sde.prior_std == sde.sigma_max


@given(beta_sdes(), st.floats(0.0, 1.0, allow_subnormal=False))
def test_beta_schedule_closed_forms_for_any_T(sde, frac):
    t = torch.tensor([0.0, frac * sde.T, sde.T], dtype=F64)
    beta = sde.beta(t)
    assert torch.allclose(
        beta[[0, 2]], torch.tensor([sde.beta_min, sde.beta_max], dtype=F64), rtol=1e-12
    )
    # B(t) written independently in the unit time s = t/T
    s = frac
    B = sde.T * (sde.beta_min * s + 0.5 * (sde.beta_max - sde.beta_min) * s * s)
    assert math.isclose(sde.integrated_beta(t[1]).item(), B, rel_tol=1e-12)
    assert math.isclose(sde.mu(t[1]).item(), math.exp(-B / 2), rel_tol=1e-12)
    expected_sigma = math.sqrt(-math.expm1(-B)) if isinstance(sde, VPSDE) else -math.expm1(-B)
    assert math.isclose(sde.sigma(t[1]).item(), expected_sigma, rel_tol=1e-10)
    assert sde.mu(t[0]).item() == 1.0 and sde.sigma(t[0]).item() == 0.0
    # T is a unit of time: the process with T equals the T=1 process with betas scaled by T
    unit = type(sde)(
        beta_min=sde.T * sde.beta_min,
        beta_max=sde.T * sde.beta_max,
        T=1.0,
        epsilon=sde.epsilon / sde.T,
    )
    assert torch.allclose(sde.mu(t), unit.mu(t / sde.T), rtol=1e-10)
    assert torch.allclose(sde.sigma(t), unit.sigma(t / sde.T), rtol=1e-10)


@given(beta_sdes())
def test_sub_vp_variance_never_exceeds_vp(sde):
    t = torch.linspace(0.0, sde.T, 50, dtype=F64)
    vp = VPSDE(beta_min=sde.beta_min, beta_max=sde.beta_max, T=sde.T, epsilon=sde.epsilon)
    sub = SubVPSDE(beta_min=sde.beta_min, beta_max=sde.beta_max, T=sde.T, epsilon=sde.epsilon)
    assert (sub.sigma(t) <= vp.sigma(t) + 1e-15).all()
    assert torch.equal(sub.mu(t), vp.mu(t))


@given(any_sde, st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_time_broadcasting_matches_per_sample_scalars(sde, batch, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 2, 3, dtype=F64, generator=g)
    t = torch.rand(batch, dtype=F64, generator=g) * sde.T
    mean, std = sde.marginal_prob(x, t)
    assert mean.shape == x.shape and std.shape == (batch, 1, 1)
    for b in range(batch):
        tb = float(t[b])
        xb = x[b : b + 1]
        assert torch.allclose(sde.drift(t, x)[b], sde.drift(tb, xb)[0])
        assert torch.allclose(
            (sde.diffusion(t, x) * torch.ones_like(x))[b],
            sde.diffusion(tb, xb) * torch.ones_like(xb[0]),
        )
        m_b, s_b = sde.marginal_prob(xb, tb)
        assert torch.allclose(mean[b], m_b[0]) and torch.allclose(std[b], s_b)


# ---------------------------------------------------------------- config round trip
@given(any_sde)
def test_config_round_trip_without_pickle(sde):
    cfg = sde.config()
    assert json.loads(json.dumps(cfg)) == cfg  # plain python values only
    assert cfg["class"] == f"nnh.generative.sde.{type(sde).__name__}"
    buf = io.BytesIO()
    torch.save(cfg, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    rebuilt = SDE.from_config(loaded)
    assert rebuilt == sde and type(rebuilt) is type(sde)
    t = torch.linspace(0, sde.T, 5, dtype=F64)
    assert torch.equal(rebuilt.sigma(t), sde.sigma(t))


# ---------------------------------------------------------------- divergence estimators
@given(st.integers(1, 5), st.integers(1, 3), st.integers(0, 2**31 - 1))
def test_exact_divergence_is_the_trace_of_a_linear_map(d, batch, seed):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, dtype=F64, generator=g)
    x = torch.randn(batch, d, dtype=F64, generator=g)
    div = exact_divergence(lambda y: y @ A.T, x)
    assert torch.allclose(div, A.trace().expand(batch), atol=1e-12)


@given(st.integers(1, 5), st.sampled_from(["gaussian", "rademacher"]), st.integers(0, 2**31 - 1))
def test_hutchinson_converges_to_the_trace_of_a_random_linear_map(d, kind, seed):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, dtype=F64, generator=g)
    x = torch.randn(3, d, dtype=F64, generator=g)
    K = 4000
    probes = sample_probes((K, 3, d), kind, g, dtype=F64)
    est = hutchinson_divergence(lambda y: y @ A.T, x, probes)
    sym = 0.5 * (A + A.T)
    frob2 = (sym**2).sum().item()
    var = 2 * frob2 if kind == "gaussian" else 2 * (frob2 - (sym.diag() ** 2).sum().item())
    assert ((est - A.trace()).abs() <= 6 * math.sqrt(var / K) + 1e-10).all()


@given(st.integers(1, 6), st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_rademacher_is_exact_on_a_diagonal_map(d, k, seed):
    g = torch.Generator().manual_seed(seed)
    diag = torch.randn(2, d, dtype=F64, generator=g)  # a different diagonal per sample
    x = torch.randn(2, d, dtype=F64, generator=g)
    probes = sample_probes((k, 2, d), "rademacher", g, dtype=F64)
    est = hutchinson_divergence(lambda y: diag * y + 3.0, x, probes)
    assert torch.allclose(est, diag.sum(1), rtol=0, atol=1e-12)


# ---------------------------------------------------------------- purity
def snapshot(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.clone() for t in tensors]


def unchanged(before: list[torch.Tensor], *after: torch.Tensor) -> bool:
    return all(torch.equal(b, a) for b, a in zip(before, after, strict=True))


def score(t, x):
    return -torch.tanh(x) * (
        1.0 + torch.as_tensor(t, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    )


@given(any_sde, st.integers(0, 2**31 - 1), st.sampled_from(["Euler", "Heun", "RK4"]))
def test_step_functions_are_pure_and_deterministic(sde, seed, method):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 2, generator=g)
    noise = torch.randn(3, 2, generator=g)
    probes = sample_probes((4, 3, 2), "gaussian", g)
    t = torch.full((3,), 0.5 * sde.T)
    before = snapshot(x, noise, probes, t)
    state = torch.get_rng_state()

    out1 = em_sde_step(
        sde, score, t, x, 0.01 * sde.T, noise, guidance_fn=score, guidance_factor=0.5
    )
    out2 = em_sde_step(
        sde, score, t, x, 0.01 * sde.T, noise, guidance_fn=score, guidance_factor=0.5
    )
    lik1 = ode_likelihood_step(sde, score, t, x, 0.01 * sde.T, probes, method)
    lik2 = ode_likelihood_step(sde, score, t, x, 0.01 * sde.T, probes, method)
    div1 = hutchinson_divergence(lambda y: score(t, y), x, probes)
    div2 = hutchinson_divergence(lambda y: score(t, y), x, probes)
    tt = torch.rand(3, generator=torch.Generator().manual_seed(seed)) * sde.T
    dsm1 = denoising_score_matching_loss(lambda s, y: score(s, y), sde, x, t=tt, noise=noise)
    dsm2 = denoising_score_matching_loss(lambda s, y: score(s, y), sde, x, t=tt, noise=noise)

    assert unchanged(before, x, noise, probes, t)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(
        torch.equal(a, b)
        for a, b in zip((*out1, *lik1, div1, dsm1), (*out2, *lik2, div2, dsm2), strict=True)
    )
    assert out1[0] is not x and lik1[0] is not x
