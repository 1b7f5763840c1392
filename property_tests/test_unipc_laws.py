"""Laws of the UniPC step (issue 20): exact when the data are a point, one score call per step,
pure (inputs untouched, no RNG), the corrector raising the predictor's order by one on the
correlated Gaussian at no extra call, and a lower-order final step."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_multistep_laws import DIM, SDES, _observed_order, correlated, gaussian_score
from test_sde_laws import any_sde, snapshot, unchanged

from nnh.generative import VESDE
from nnh.generative.time_grid import logsnr_grid, noise_level
from nnh.generative.unipc import UniPCHistory, unipc_step

F64 = torch.float64
BH = ("bh1", "bh2")
seeds = st.integers(0, 2**31 - 1)


def solve(
    sde, score, x, times, order: int, final_order: int | None = None, variant: str = "bh2"
) -> torch.Tensor:
    history = UniPCHistory()
    for i, (a, b) in enumerate(itertools.pairwise(times)):
        last = final_order if i == len(times) - 2 else None
        x, history = unipc_step(sde, score, a, b, x, history, order, last, variant)
    return x


@settings(max_examples=25, deadline=None)
@given(
    any_sde, seeds, st.sampled_from([1, 2, 3]), st.integers(2, 8), st.sampled_from(["bh1", "bh2"])
)
def test_unipc_is_exact_when_the_data_are_a_point(sde, seed, order, steps, variant):
    m = torch.tensor([0.7, -1.3], dtype=F64)

    def score(t, x):
        tt = torch.as_tensor(t, dtype=F64).reshape(-1, 1)
        return -(x - sde.mu(tt) * m) / sde.sigma(tt) ** 2

    times = logsnr_grid(sde, steps, sde.epsilon)
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(seed), dtype=F64)
    x = sde.mu(torch.tensor(sde.T, dtype=F64)) * m + x
    out = solve(sde, score, x, times, order, variant=variant)
    t0, t1 = (torch.tensor(v, dtype=F64) for v in (times[0], times[-1]))
    ratio = noise_level(sde, t1) / noise_level(sde, t0)
    want = sde.mu(t1) * (m + ratio * (x / sde.mu(t0) - m))
    atol = 1e-12 * float((x / sde.mu(torch.tensor(sde.T, dtype=F64))).abs().max()) + 1e-9
    torch.testing.assert_close(out, want, rtol=1e-9, atol=atol)


@settings(max_examples=15, deadline=None)
@given(any_sde, seeds, st.sampled_from([1, 2, 3]))
def test_unipc_step_is_pure_and_calls_the_score_once(sde, seed, order):
    lam, q = correlated()
    counter = [0]
    score = gaussian_score(sde, lam, q, counter)
    g = torch.Generator().manual_seed(seed)
    times = logsnr_grid(sde, 6, sde.epsilon)
    x = torch.randn(3, DIM, generator=g, dtype=F64)
    history = UniPCHistory()
    for a, b in itertools.pairwise(times[:4]):
        x, history = unipc_step(sde, score, a, b, x, history, order)
    calls = counter[0]
    before = snapshot(x, *history.denoised, history.x_prev)
    state = torch.get_rng_state()
    a = unipc_step(sde, score, times[3], times[4], x, history, order)
    b = unipc_step(sde, score, times[3], times[4], x, history, order)
    assert calls == 3 and counter[0] == 5 and torch.equal(a[0], b[0])
    assert unchanged(before, x, *history.denoised, history.x_prev)
    assert torch.equal(torch.get_rng_state(), state)
    assert a[1].order == order and a[1].denoised[1] is history.denoised[0]


@pytest.mark.parametrize("sde", SDES, ids=["VE", "VP", "subVP"])
@pytest.mark.parametrize(("order", "low", "high"), [(1, 1.7, 2.6), (2, 2.6, 3.6)])
def test_the_corrector_raises_the_order_by_one(sde, order, low, high):
    # predictor of order p + corrector: p + 1 from a cold start (its first step is corrected by
    # the trapezoidal rule, so p = 3 is capped at 3 and is not asserted here)
    observed = _observed_order(sde, lambda s, f, x, ts, h: solve(s, f, x, ts, order), 16)
    assert low <= observed <= high, observed


@pytest.mark.parametrize("sde", SDES, ids=["VE", "VP", "subVP"])
def test_unipc_beats_dpm_solver_pp_at_the_same_calls(sde):
    from test_multistep_laws import exact_flow
    from test_multistep_laws import solve as dpm_solve

    lam, q = correlated()
    score = gaussian_score(sde, lam, q)
    x0 = torch.randn(64, DIM, generator=torch.Generator().manual_seed(0), dtype=F64)
    times = logsnr_grid(sde, 40, 0.05 * sde.T)
    x0 = x0 * float(noise_level(sde, torch.tensor(sde.T)) * sde.mu(torch.tensor(sde.T)))
    want = exact_flow(sde, lam, q, x0, times[0], times[-1])
    err_uni = float((solve(sde, score, x0, times, 2) - want).abs().max())
    err_dpm = float((dpm_solve(sde, score, x0, times, 2) - want).abs().max())
    assert err_uni < 0.5 * err_dpm, (err_uni, err_dpm)


@settings(max_examples=10, deadline=None)
@given(any_sde, seeds)
def test_a_first_order_final_step_is_the_exponential_euler_step(sde, seed):
    lam, q = correlated()
    score = gaussian_score(sde, lam, q)
    times = logsnr_grid(sde, 5, sde.epsilon)
    x = torch.randn(2, DIM, generator=torch.Generator().manual_seed(seed), dtype=F64)
    history = UniPCHistory()
    for a, b in itertools.pairwise(times[:-1]):
        x, history = unipc_step(sde, score, a, b, x, history, 3)
    out, _ = unipc_step(sde, score, times[-2], times[-1], x, history, 3, final_order=1)
    corrected, _ = unipc_step(sde, score, times[-2], times[-2] * 0.5, x, history, 3, 1)
    # order 1 from the corrected state: ratio x_c + mu_1 (1 - lambda_1 / lambda_0) D
    x_c = unipc_step(sde, score, times[-2], times[-1], x, history, 1)[1].x_prev
    t0, t1 = (torch.tensor(v, dtype=F64) for v in times[-2:])
    d = (x + sde.sigma(t0) ** 2 * score(times[-2], x)) / sde.mu(t0)
    ratio = sde.sigma(t1) / sde.sigma(t0)
    lam_ratio = noise_level(sde, t1) / noise_level(sde, t0)
    torch.testing.assert_close(out, ratio * x_c + sde.mu(t1) * (1 - lam_ratio) * d)
    assert corrected.shape == out.shape


@settings(max_examples=10, deadline=None)
@given(any_sde, seeds)
def test_the_variants_differ_only_where_unipc_fixes_rho(sde, seed):
    # B(h) cancels wherever rho is solved from the order conditions (order-3 predictor after
    # its warm-up); it shows where UniPC fixes rho = 1/2 (order-2 predictor, order-1 corrector)
    lam, q = correlated()
    score = gaussian_score(sde, lam, q)
    x = torch.randn(3, DIM, generator=torch.Generator().manual_seed(seed), dtype=F64)
    times = logsnr_grid(VESDE(), 6, 1e-5)
    two = [solve(VESDE(), gaussian_score(VESDE(), lam, q), x, times, 2, variant=v) for v in BH]
    assert not torch.allclose(two[0], two[1], rtol=1e-6, atol=0)
    times = logsnr_grid(sde, 6, sde.epsilon)
    x = x * float(noise_level(sde, torch.tensor(sde.T)) * sde.mu(torch.tensor(sde.T)))
    hist = {}
    for v in BH:
        y, h = x, UniPCHistory()
        for a, b in itertools.pairwise(times[:3]):
            y, h = unipc_step(sde, score, a, b, y, h, 2, variant="bh2")
        hist[v] = unipc_step(sde, score, times[2], times[3], y, h, 3, variant=v)[0]
    torch.testing.assert_close(hist["bh1"], hist["bh2"], rtol=1e-10, atol=1e-12)
