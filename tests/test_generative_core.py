"""Ground-truth tests of the generative core on Gaussian data, where everything is exact.

Data ~ N(m, s^2 I). Under any of the linear SDEs the marginal at t is
N(mu(t) m, v(t) I) with v(t) = mu(t)^2 s^2 + sigma(t)^2, so the score is exact:
score(t, x) = -(x - mu(t) m) / v(t). The probability-flow map from t0 to t1 is affine,
x_t1 = mu(t1) m + (x - mu(t0) m) sqrt(v(t1)/v(t0)), so the value the continuous likelihood ODE
must return (with the SDE's prior at t1) is known in closed form:
    prior_log_prob(x_t1) + D/2 log(v(t1)/v(t0)).
That isolates the discretisation error; the gap to log N(x; mu(t0) m, v(t0)) is the prior
mismatch at T (at most 0.071 nats for VE, 0.024 for VP/sub-VP on the test points, defaults).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from nnh.generative import (
    SDE,
    VESDE,
    VPSDE,
    SubVPSDE,
    denoising_score_matching_loss,
    em_sde_step,
    exact_divergence,
    hutchinson_divergence,
    log_likelihood_ode,
    ode_likelihood_step,
    probability_flow_drift,
    sample_probes,
    sample_reverse_sde,
    value_and_divergence,
)

torch.set_num_threads(1)

M = torch.tensor([1.0, -2.0])
S = 0.5
SDES = {"VE": VESDE(), "VP": VPSDE(), "subVP": SubVPSDE()}


# ---------------------------------------------------------------- Gaussian ground truth
def col(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, 1) if v.ndim else v


def marginal_var(sde: SDE, t, s: float = S) -> torch.Tensor:
    return sde.mu(t) ** 2 * s**2 + sde.sigma(t) ** 2


def gaussian_score(sde: SDE, m: torch.Tensor = M, s: float = S):
    """Exact score of the marginal at t of data N(m, s^2 I)."""

    def score(t, x):
        m_ = m.to(x.dtype)
        return -(x - col(sde.mu(t).to(x.dtype)) * m_) / col(marginal_var(sde, t, s).to(x.dtype))

    return score


def gaussian_log_density(
    x: torch.Tensor, mean: torch.Tensor, var: float | torch.Tensor
) -> torch.Tensor:
    var = torch.as_tensor(var, dtype=x.dtype)
    d = x.shape[1]
    return -0.5 * ((x - mean) ** 2).sum(1) / var - 0.5 * d * torch.log(2 * math.pi * var)


def exact_flow_log_likelihood(sde: SDE, x: torch.Tensor, t0: float, t1: float) -> torch.Tensor:
    """What the continuous probability-flow ODE returns with sde's prior at t1 (closed form)."""
    t0_, t1_ = torch.tensor(t0, dtype=x.dtype), torch.tensor(t1, dtype=x.dtype)
    ratio = marginal_var(sde, t1_) / marginal_var(sde, t0_)
    m = M.to(x.dtype)
    x1 = sde.mu(t1_) * m + (x - sde.mu(t0_) * m) * ratio.sqrt()
    return sde.prior_log_prob(x1) + 0.5 * x.shape[1] * torch.log(ratio)


def data_points(n: int = 8, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return (M + S * torch.randn(n, 2, generator=g)).to(dtype)


class Counter:
    def __init__(self, fn):
        self.fn, self.calls, self.shapes, self.times = fn, 0, [], []

    def __call__(self, t, x):
        self.calls += 1
        self.shapes.append(tuple(x.shape))
        self.times.append(t)
        return self.fn(t, x)


# ---------------------------------------------------------------- sampling
@pytest.mark.parametrize("name", list(SDES))
def test_reverse_sde_reproduces_gaussian_data(name):
    # 4000 samples, 500 steps: standard errors are 0.008 (mean) and 0.0056 (std); the
    # measured deviations are <= 0.013 (mean) and <= 0.011 (std) for all three SDEs.
    sde = SDES[name]
    x = sample_reverse_sde(
        sde, gaussian_score(sde), (4000, 2), 500, generator=torch.Generator().manual_seed(0)
    )
    target_std = math.sqrt(S**2 + sde.sigma(sde.epsilon).item() ** 2)
    assert torch.allclose(x.mean(0), M, atol=0.04), x.mean(0)
    assert torch.allclose(x.std(0), torch.full((2,), target_std), atol=0.025), x.std(0)


def test_reverse_sde_wrong_score_is_detected():
    # the moment checks above have power: a score for N(0, s^2) gives a visibly wrong mean
    sde = SDES["VP"]
    x = sample_reverse_sde(
        sde,
        gaussian_score(sde, m=torch.zeros(2)),
        (2000, 2),
        200,
        generator=torch.Generator().manual_seed(0),
    )
    assert (x.mean(0) - M).abs().max() > 0.5


def test_sampler_is_the_plain_em_loop_with_one_score_call_per_step():
    sde, steps, shape = VPSDE(), 7, (5, 2)
    counted = Counter(gaussian_score(sde))
    out = sample_reverse_sde(sde, counted, shape, steps, generator=torch.Generator().manual_seed(3))
    assert counted.calls == steps
    assert all(s == shape for s in counted.shapes)
    assert all(t.shape == (5,) for t in counted.times)
    dt = (sde.T - sde.epsilon) / steps
    assert [round(t[0].item(), 6) for t in counted.times] == [
        round(sde.T - i * dt, 6) for i in range(steps)
    ]

    g = torch.Generator().manual_seed(3)
    x = sde.prior(shape, generator=g)
    for i in range(steps):
        t = torch.full((5,), sde.T - i * dt)
        noise = torch.randn(shape, generator=g) if i < steps - 1 else torch.zeros(shape)
        x_next, x_mean = em_sde_step(sde, gaussian_score(sde), t, x, dt, noise)
        x = x_mean if i == steps - 1 else x_next
    assert torch.equal(out, x)


def test_sampler_uses_only_the_given_generator():
    sde = VESDE()
    state = torch.get_rng_state()
    a = sample_reverse_sde(
        sde, gaussian_score(sde), (6, 2), 10, generator=torch.Generator().manual_seed(5)
    )
    b = sample_reverse_sde(
        sde, gaussian_score(sde), (6, 2), 10, generator=torch.Generator().manual_seed(5)
    )
    c = sample_reverse_sde(
        sde, gaussian_score(sde), (6, 2), 10, generator=torch.Generator().manual_seed(6)
    )
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_sampler_stops_on_nan_with_a_clear_warning():
    sde, steps = VPSDE(), 10
    base = gaussian_score(sde)

    def bad(t, x):
        out = base(t, x)
        return out * float("nan") if t[0] < 0.55 else out

    counted = Counter(bad)
    with pytest.warns(RuntimeWarning, match=r"step 6/10 \(t=0\.5"):
        out = sample_reverse_sde(
            sde, counted, (4, 2), steps, generator=torch.Generator().manual_seed(0)
        )
    assert counted.calls == 6 and torch.isfinite(out).all()
    # what is returned: the noisy state after 5 good steps (same as a 5-step run to t=0.5...)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        raw = sample_reverse_sde(
            sde, bad, (4, 2), steps, generator=torch.Generator().manual_seed(0), stop_on_nan=False
        )
    assert torch.isnan(raw).all()


def test_progress_accepts_callables_and_tqdm_like_objects():
    sde, seen = VPSDE(), []

    class Bar:
        n = 0

        def update(self, k):
            self.n += k

    bar = Bar()
    sample_reverse_sde(
        sde, gaussian_score(sde), (2, 2), 4, generator=torch.Generator(), progress=seen.append
    )
    sample_reverse_sde(
        sde, gaussian_score(sde), (2, 2), 4, generator=torch.Generator(), progress=bar
    )
    log_likelihood_ode(sde, gaussian_score(sde), data_points(2), steps=3, probes=None, progress=bar)
    assert seen == [0, 1, 2, 3] and bar.n == 7


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"steps": 0}, "steps must be an integer >= 1"),
        ({"steps": 3, "t_end": 1.0}, r"t_end must be in \[0, T\)"),
    ],
)
def test_sampler_argument_errors(kwargs, match):
    sde = VPSDE()
    with pytest.raises(ValueError, match=match):
        sample_reverse_sde(sde, gaussian_score(sde), (2, 2), **kwargs)


# ---------------------------------------------------------------- guidance
def test_guidance_reproduces_the_exact_gaussian_posterior():
    # prior N(m, s^2 I), likelihood N(y; x, r^2 I) -> posterior N(mp, sp^2 I)
    sde, y, r = VPSDE(), torch.tensor([2.0, 0.0]), 0.5
    mp = (S**2 * y + r**2 * M) / (S**2 + r**2)  # (1.5, -1.0)
    sp = math.sqrt(S**2 * r**2 / (S**2 + r**2))  # 0.3536
    prior_score = gaussian_score(sde)
    post_score = gaussian_score(sde, m=mp, s=sp)

    def guidance(t, x):  # exact likelihood score of the noisy x_t
        return post_score(t, x) - prior_score(t, x)

    kw = {"generator": torch.Generator().manual_seed(0)}
    x = sample_reverse_sde(sde, prior_score, (4000, 2), 500, guidance_fn=guidance, **kw)
    assert torch.allclose(x.mean(0), mp, atol=0.03), x.mean(0)  # SE 0.0056
    assert torch.allclose(x.std(0), torch.full((2,), sp), atol=0.02), x.std(0)  # SE 0.004
    # factor 0 is exactly unguided sampling
    a = sample_reverse_sde(
        sde,
        prior_score,
        (8, 2),
        20,
        guidance_fn=guidance,
        guidance_factor=0.0,
        generator=torch.Generator().manual_seed(1),
    )
    b = sample_reverse_sde(sde, prior_score, (8, 2), 20, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_em_step_formula_and_guidance_is_additive():
    sde = VPSDE()
    g = torch.Generator().manual_seed(0)
    x, noise = torch.randn(3, 2, generator=g), torch.randn(3, 2, generator=g)
    t, dt = torch.full((3,), 0.4), 0.01
    h = lambda t, x: torch.ones_like(x)  # noqa: E731
    x1, m1 = em_sde_step(
        sde, gaussian_score(sde), t, x, dt, noise, guidance_fn=h, guidance_factor=2.5
    )
    beta = sde.beta(0.4).item()
    score = gaussian_score(sde)(t, x) + 2.5
    mean = x - (-0.5 * beta * x - beta * score) * dt
    assert torch.allclose(m1, mean, atol=1e-6)
    assert torch.allclose(x1, mean + math.sqrt(beta * dt) * noise, atol=1e-6)
    x2, m2 = em_sde_step(sde, lambda t, x: gaussian_score(sde)(t, x) + 2.5, t, x, dt, noise)
    assert torch.allclose(x1, x2) and torch.allclose(m1, m2)


# ---------------------------------------------------------------- likelihood
# (sde, method, steps, tol): tol on max |error| against the exact-flow value, 1.5-2.5x the
# error measured in float64 on the 8 test points: VE Heun 200: 4.1e-3, VE RK4 50: 7.9e-5,
# VP Euler 200: 1.9e-2, VP Heun 100: 1.2e-3, VP RK4 25: 1.1e-5, subVP Euler 200: 2.5e-2,
# subVP Heun 100: 7.4e-4.
LIKELIHOOD_CASES = [
    ("VE", "Heun", 200, 8e-3),
    ("VE", "RK4", 50, 2e-4),
    ("VP", "Euler", 200, 4e-2),
    ("VP", "Heun", 100, 2.5e-3),
    ("VP", "RK4", 25, 3e-5),
    ("subVP", "Euler", 200, 5e-2),
    ("subVP", "Heun", 100, 1.5e-3),
]


@pytest.mark.parametrize(("name", "method", "steps", "tol"), LIKELIHOOD_CASES)
def test_log_likelihood_matches_the_exact_flow(name, method, steps, tol):
    sde, x = SDES[name], data_points()
    probes = torch.ones(1, *x.shape, dtype=x.dtype)  # Rademacher; exact here (diagonal Jacobian)
    lp = log_likelihood_ode(sde, gaussian_score(sde), x, steps=steps, probes=probes, method=method)
    ref = exact_flow_log_likelihood(sde, x, sde.epsilon, sde.T)
    assert (lp - ref).abs().max() < tol
    # and against the data density itself: discretisation + the prior mismatch at T, which
    # is 0.071 nats (VE) and 0.024 (VP, sub-VP) at most on these points (see module doc)
    data_lp = gaussian_log_density(x, M.double(), S**2)
    mismatch = {"VE": 0.08, "VP": 0.03, "subVP": 0.03}[name]
    assert (lp - data_lp).abs().max() < tol + mismatch


def test_log_likelihood_equals_the_data_density_when_the_prior_matches():
    # VP with T=3: mu(T)^2 = 7e-14, so the prior N(0, I) is the true marginal at T
    sde = VPSDE(T=3.0)
    x = data_points()
    lp = log_likelihood_ode(sde, gaussian_score(sde), x, steps=100, probes=None, method="RK4")
    assert (lp - gaussian_log_density(x, M.double(), S**2)).abs().max() < 1e-4


def loglog_slope(steps: list[int], errors: list[float]) -> float:
    return -float(np.polyfit(np.log(steps), np.log(errors), 1)[0])


# measured log-log slopes: VP Euler 1.00, subVP Euler 0.99, VE Heun 1.97, VP Heun 2.04,
# subVP Heun 2.11, VP RK4 4.04, VE RK4 3.93 (VE Euler is still at 0.90 between 200 and 400
# steps: the VE drift grows like sigma(t)^2 near T, so Euler leaves its pre-asymptotic regime late)
ORDER_CASES = [
    ("VP", "Euler", [50, 100, 200], 1.0),
    ("subVP", "Euler", [50, 100, 200], 1.0),
    ("VE", "Heun", [100, 200, 400], 2.0),
    ("VP", "Heun", [25, 50, 100], 2.0),
    ("subVP", "Heun", [25, 50, 100], 2.0),
    ("VP", "RK4", [25, 50, 100], 4.0),
    ("VE", "RK4", [50, 100, 200], 4.0),
]


@pytest.mark.parametrize(("name", "method", "steps", "order"), ORDER_CASES)
def test_likelihood_error_shrinks_at_the_method_order(name, method, steps, order):
    sde, x = SDES[name], data_points()
    probes = torch.ones(1, *x.shape, dtype=x.dtype)
    ref = exact_flow_log_likelihood(sde, x, sde.epsilon, sde.T)
    errors = [
        (
            log_likelihood_ode(sde, gaussian_score(sde), x, steps=n, probes=probes, method=method)
            - ref
        )
        .abs()
        .max()
        .item()
        for n in steps
    ]
    assert abs(loglog_slope(steps, errors) - order) < 0.2 * order, errors


@pytest.mark.parametrize(("method", "per_step"), [("Euler", 1), ("Heun", 2), ("RK4", 4)])
def test_likelihood_cost_is_one_score_call_per_evaluation_with_probes_batched(method, per_step):
    sde, x = VPSDE(), data_points(dtype=torch.float32)
    calls = {}
    results = {}
    for k in (1, 6):
        probes = sample_probes((k, *x.shape), "gaussian", torch.Generator().manual_seed(0))
        counted = Counter(gaussian_score(sde))
        results[k] = log_likelihood_ode(sde, counted, x, steps=5, probes=probes, method=method)
        calls[k] = counted.calls
        assert all(s == tuple(x.shape) for s in counted.shapes)  # never a per-probe batch
    assert calls[1] == calls[6] == 5 * per_step


def test_all_probes_are_used_in_one_call():
    # the K-probe estimate is the mean of the single-probe estimates, from one score call
    sde, x = SDES["VP"], data_points(4)
    probes = sample_probes((5, *x.shape), "gaussian", torch.Generator().manual_seed(0))

    def mixture_drift(y):
        return probability_flow_drift(sde, lambda t, z: -torch.tanh(z) * z, 0.3, y)

    counted = Counter(lambda t, y: mixture_drift(y))
    est = hutchinson_divergence(lambda y: counted(None, y), x, probes)
    singles = torch.stack(
        [hutchinson_divergence(mixture_drift, x, probes[k : k + 1]) for k in range(5)]
    )
    assert counted.calls == 1
    assert torch.allclose(est, singles.mean(0), atol=1e-10)


def test_likelihood_argument_errors():
    sde, x = VPSDE(), data_points(2)
    with pytest.raises(
        ValueError,
        match=r"method='Midpoint' is not a likelihood integrator; use one of "
        r"\('Euler', 'Heun', 'RK4', 'dopri5'\)",
    ):
        log_likelihood_ode(sde, gaussian_score(sde), x, steps=3, probes=None, method="Midpoint")
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        log_likelihood_ode(sde, gaussian_score(sde), x, steps=0, probes=None)
    with pytest.raises(ValueError, match="t0 < t1"):
        log_likelihood_ode(sde, gaussian_score(sde), x, steps=3, probes=None, t0=0.5, t1=0.5)
    with pytest.raises(ValueError, match=r"probes must have shape \[K, \*x.shape\]"):
        log_likelihood_ode(sde, gaussian_score(sde), x, steps=3, probes=torch.ones(1, 3, 2))
    assert log_likelihood_ode(
        sde, gaussian_score(sde), x, steps=2, probes=None, method="heun"
    ).shape == (2,)


def test_ode_step_goes_forward_in_time():
    sde, x = VPSDE(), data_points(3)
    counted = Counter(gaussian_score(sde))
    ode_likelihood_step(sde, counted, torch.full((3,), 0.2, dtype=x.dtype), x, 0.1, None, "RK4")
    assert [round(float(t[0]), 6) for t in counted.times] == [0.2, 0.25, 0.25, 0.3]


# ---------------------------------------------------------------- divergence
def anisotropic_precision() -> torch.Tensor:
    cov = torch.tensor([[2.0, 0.9, 0.0], [0.9, 1.0, -0.3], [0.0, -0.3, 0.25]], dtype=torch.float64)
    return torch.linalg.inv(cov)


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_probes_average_to_the_divergence_of_an_anisotropic_gaussian_score(kind):
    P = anisotropic_precision()  # score(x) = -P (x - m): divergence -tr(P) everywhere
    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    K = 20000
    probes = sample_probes(
        (K, *x.shape), kind, torch.Generator().manual_seed(1), dtype=torch.float64
    )
    est = hutchinson_divergence(lambda y: -(y - 1.0) @ P.T, x, probes)
    frob2 = (P**2).sum().item()
    var = 2 * frob2 if kind == "gaussian" else 2 * (frob2 - (P.diag() ** 2).sum().item())
    assert torch.allclose(
        est, torch.full((4,), -P.trace().item(), dtype=torch.float64), atol=5 * math.sqrt(var / K)
    )
    # and it is noisy (not accidentally exact) with one probe
    one = hutchinson_divergence(lambda y: -(y - 1.0) @ P.T, x, probes[:1])
    assert (one + P.trace()).abs().max() > 1e-3


def mixture_score(y: torch.Tensor) -> torch.Tensor:
    """Score of 0.5 N(a, I) + 0.5 N(-a, I) in 2-d (nonlinear, non-diagonal Jacobian)."""
    a = torch.tensor([1.5, 0.5], dtype=y.dtype)
    w = torch.sigmoid(2 * (y @ a))[:, None]
    return -y + (2 * w - 1) * a


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_probes_average_to_the_exact_divergence_of_a_mixture_score(kind):
    x = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    exact = exact_divergence(mixture_score, x)
    jac = torch.func.vmap(torch.func.jacrev(lambda v: mixture_score(v[None])[0]))(x)
    assert torch.allclose(exact, jac.diagonal(dim1=1, dim2=2).sum(-1), atol=1e-12)
    K = 20000
    probes = sample_probes(
        (K, *x.shape), kind, torch.Generator().manual_seed(3), dtype=torch.float64
    )
    est = hutchinson_divergence(mixture_score, x, probes)
    sym = 0.5 * (jac + jac.transpose(1, 2))
    frob2 = (sym**2).sum((1, 2))
    var = (
        2 * frob2
        if kind == "gaussian"
        else 2 * (frob2 - (sym.diagonal(dim1=1, dim2=2) ** 2).sum(-1))
    )
    assert ((est - exact).abs() <= 5 * (var / K).sqrt() + 1e-12).all()


def test_value_and_divergence_returns_the_field_value():
    x = torch.randn(3, 2, dtype=torch.float64)
    fx, div = value_and_divergence(mixture_score, x)
    assert torch.allclose(fx, mixture_score(x)) and torch.allclose(
        div, exact_divergence(mixture_score, x)
    )


def test_probe_errors():
    with pytest.raises(
        ValueError, match=r"unknown probe kind 'uniform'; use one of \('rademacher', 'gaussian'\)"
    ):
        sample_probes((2, 3), "uniform")
    with pytest.raises(ValueError, match="probes must have shape"):
        hutchinson_divergence(lambda y: y, torch.ones(3, 2), torch.ones(4, 2, 2))


# ---------------------------------------------------------------- denoising score matching
def test_dsm_loss_formula_with_explicit_t_and_noise():
    sde = VESDE()
    g = torch.Generator().manual_seed(0)
    x, z = torch.randn(6, 2, generator=g), torch.randn(6, 2, generator=g)
    t = torch.linspace(0.1, 0.9, 6)
    cond = torch.arange(6.0)[:, None]
    model = lambda t, xt, c: 0.1 * xt + c  # noqa: E731
    loss = denoising_score_matching_loss(model, sde, x, cond, t=t, noise=z)
    xt = x + sde.sigma(t)[:, None] * z
    assert torch.allclose(loss, ((0.1 * xt + cond + z) ** 2).sum(1).mean())
    assert loss.ndim == 0


@pytest.mark.parametrize("name", list(SDES))
def test_dsm_loss_is_minimised_by_sigma_times_the_exact_score(name):
    # at fixed t the optimum value is D mu^2 s^2 / v(t) (Gaussian data); MC over 20000 samples
    sde, n, t0 = SDES[name], 20000, 0.3
    g = torch.Generator().manual_seed(0)
    x = M + S * torch.randn(n, 2, generator=g)
    t = torch.full((n,), t0)
    score = gaussian_score(sde)

    def model(scale):
        return lambda t, xt: scale * col(sde.sigma(t)) * score(t, xt)

    z = torch.randn(n, 2, generator=g)
    losses = {
        c: denoising_score_matching_loss(model(c), sde, x, t=t, noise=z).item()
        for c in (0.8, 1.0, 1.2)
    }
    expected = 2 * (sde.mu(t0) ** 2 * S**2 / marginal_var(sde, torch.tensor(t0))).item()
    assert losses[1.0] < losses[0.8] and losses[1.0] < losses[1.2]
    assert abs(losses[1.0] - expected) < 0.05 * expected + 1e-3


def test_dsm_loss_randomness_comes_from_the_generator():
    sde, x = VPSDE(), torch.randn(8, 2)
    model = lambda t, xt: xt  # noqa: E731
    state = torch.get_rng_state()
    a = denoising_score_matching_loss(model, sde, x, generator=torch.Generator().manual_seed(4))
    b = denoising_score_matching_loss(model, sde, x, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and torch.equal(torch.get_rng_state(), state)
    with pytest.raises(ValueError, match="t must have shape"):
        denoising_score_matching_loss(model, sde, x, t=torch.ones(3))


# ---------------------------------------------------------------- SDE construction
@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: VESDE(sigma_min=1.0, sigma_max=1.0), "sigma_min must be < sigma_max"),
        (lambda: VESDE(sigma_min=-1.0), "sigma_min must be a finite number > 0"),
        (lambda: VPSDE(T=0.0), "T must be a finite number > 0"),
        (lambda: VPSDE(epsilon=0.0), r"epsilon must be in \(0, T\)"),
        (lambda: SubVPSDE(T=2.0, epsilon=2.0), r"epsilon must be in \(0, T\) = \(0, 2.0\)"),
        (lambda: VPSDE(beta_min=5.0, beta_max=1.0), "beta_min must be <= beta_max"),
        (
            lambda: SDE.from_config({"class": "builtins.dict"}),
            "is not a subclass of nnh.generative.sde.SDE",
        ),
        (lambda: SDE.from_config({"beta_min": 1.0}), "'class' key"),
        (
            lambda: SDE.from_config({"class": "nnh.generative.sde.VPSDE", "sigma": 1.0}),
            "cannot rebuild",
        ),
    ],
)
def test_sde_argument_errors(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_prior_sample_and_log_prob():
    sde = VESDE()
    x = sde.prior((20000, 2), generator=torch.Generator().manual_seed(0))
    assert abs(x.std().item() - 50.0) < 1.0
    ref = torch.distributions.Normal(0.0, 50.0).log_prob(x[:5]).sum(1)
    assert torch.allclose(sde.prior_log_prob(x[:5]), ref, rtol=1e-5)
    img = torch.randn(3, 2, 4, 4)
    assert torch.allclose(
        VPSDE().prior_log_prob(img),
        torch.distributions.Normal(0.0, 1.0).log_prob(img).sum((1, 2, 3)),
    )


# ---------------------------------------------------------------- real modules, images, no_grad
class TinyScoreNet(torch.nn.Module):
    """A small MLP over flattened images with a time input: the shape of a real score model."""

    def __init__(self, d: int):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(d + 1, 16), torch.nn.SiLU(), torch.nn.Linear(16, d)
        )

    def forward(self, t, x):
        flat = x.reshape(x.shape[0], -1)
        tt = torch.as_tensor(t, dtype=x.dtype).expand(x.shape[0])[:, None]
        return self.net(torch.cat([flat, tt], 1)).reshape(x.shape)


def test_divergence_and_likelihood_work_with_a_module_on_images_under_no_grad():
    torch.manual_seed(0)
    net = TinyScoreNet(2 * 3 * 3).double()
    sde = VPSDE()
    x = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    t = torch.tensor(0.3, dtype=torch.float64)  # a 0-d time works as well as [B]
    field = lambda y: probability_flow_drift(sde, net, t, y)  # noqa: E731
    jac = torch.func.vmap(torch.func.jacrev(lambda v: field(v[None])[0]))(x).reshape(4, 18, 18)
    assert torch.allclose(
        exact_divergence(field, x), jac.diagonal(dim1=1, dim2=2).sum(-1), atol=1e-10
    )
    probes = sample_probes(
        (3, *x.shape), "rademacher", torch.Generator().manual_seed(0), dtype=torch.float64
    )
    with torch.no_grad():  # the VJPs are function transforms: they work under an outer no_grad
        lp = log_likelihood_ode(sde, net, x, steps=4, probes=probes, method="Heun")
        samples = sample_reverse_sde(
            sde,
            net,
            (4, 2, 3, 3),
            5,
            generator=torch.Generator().manual_seed(0),
            dtype=torch.float64,
        )
    assert lp.shape == (4,) and torch.isfinite(lp).all() and not lp.requires_grad
    assert samples.shape == (4, 2, 3, 3)
    # by default the result carries no graph; differentiable=True keeps it for backprop
    assert not log_likelihood_ode(sde, net, x, steps=2, probes=probes).requires_grad
    lp_grad = log_likelihood_ode(
        sde, net, x, steps=2, probes=probes, method="Euler", differentiable=True
    )
    lp_grad.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
