"""Adaptive likelihood (issue 20): ``method='dopri5'`` with error control, ``divergence='exact'``,
and named errors before any model call.

Ground truth: the 4-mode mixture's exact score (``MixtureExactScore``) and its exact marginal
density at ``t0``, and the exact Gaussian score with its closed-form flow likelihood.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gen_models import FOUR_MODES, CallRecorder, ExactGaussianScore, MixtureExactScore
from hypothesis import given, settings
from hypothesis import strategies as st

from nnh import NNHandler
from nnh.generative import VESDE, VPSDE, SubVPSDE, log_likelihood_ode

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]


def handler(model_class=MixtureExactScore, sde_class=VPSDE, **kwargs) -> NNHandler:
    h = NNHandler(model_class, model_type="score_based", sde_config=sde_class().config(), **kwargs)
    h.set_sde(sde_class)
    return h


def mixture_points(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    means = torch.tensor(FOUR_MODES["means"])
    k = torch.multinomial(torch.tensor(FOUR_MODES["weights"]), n, True, generator=g)
    return means[k] + FOUR_MODES["std"] * torch.randn(n, 2, generator=g)


def mixture_log_p(sde, x: torch.Tensor, t: float) -> torch.Tensor:
    """The exact log-density of the mixture's marginal at time ``t``."""
    tt = torch.tensor(t, dtype=torch.float64)
    mu, sigma = sde.mu(tt), sde.sigma(tt)
    var = mu**2 * FOUR_MODES["std"] ** 2 + sigma**2
    means = torch.tensor(FOUR_MODES["means"], dtype=torch.float64)
    d2 = ((x.double()[:, None] - mu * means[None]) ** 2).sum(-1)
    log_w = torch.tensor(FOUR_MODES["weights"], dtype=torch.float64).log()
    return torch.logsumexp(log_w - 0.5 * d2 / var - torch.log(2 * math.pi * var), dim=1)


# ---------------------------------------------------------------- accuracy and cost
@pytest.mark.parametrize("sde_class", [VPSDE, VESDE])
def test_dopri5_exact_is_unbiased_on_the_mixture_within_200_calls(sde_class):
    h = handler(sde_class=sde_class)
    x = mixture_points(200)
    with CallRecorder(h.module) as rec:
        lp = h.log_likelihood(x, method="dopri5", divergence="exact", rtol=1e-4, atol=1e-4)
    err = lp.double() - mixture_log_p(h.sde, x, h.sde.epsilon)
    # measured (rtol=atol=1e-4, 200 points): |mean| <= 3e-4 nats, max |err| <= 0.05, 140-170 calls
    assert abs(float(err.mean())) < 0.003, float(err.mean())
    assert float(err.abs().max()) < 0.2
    assert rec.calls <= 200 and (rec.calls - 2) % 6 == 0, rec.calls
    # the fixed-step Euler default at about the same cost is far off on the same points
    euler = h.log_likelihood(x, ode_steps=100, noise_type="exact")
    assert abs(float((euler.double() - mixture_log_p(h.sde, x, h.sde.epsilon)).mean())) > 0.05


def test_tighter_tolerance_gives_smaller_error_and_more_calls():
    # against a converged solve (the exact log p0 differs by the prior mismatch at T, ~1e-3 on VE)
    h = handler(sde_class=VESDE)
    x = mixture_points(64, seed=1).double()
    exact = h.log_likelihood(x, method="dopri5", divergence="exact", rtol=1e-10, atol=1e-10)
    errs, calls = [], []
    for tol in (1e-3, 1e-6):
        with CallRecorder(h.module) as rec:
            lp = h.log_likelihood(x, method="dopri5", divergence="exact", rtol=tol, atol=tol)
        errs.append(float((lp.double() - exact).abs().mean()))
        calls.append(rec.calls)
    assert errs[1] < errs[0] / 10, errs
    assert calls[1] > calls[0], calls


@pytest.mark.parametrize("sde_class", [VPSDE, VESDE, SubVPSDE])
def test_dopri5_matches_the_closed_form_gaussian_flow(sde_class):
    from gen_models import exact_flow_log_likelihood

    h = handler(ExactGaussianScore, sde_class=sde_class)
    x = torch.randn(16, 2, dtype=torch.float64) * 0.5 + torch.tensor(
        [1.0, -2.0], dtype=torch.float64
    )
    h.module.double()
    lp = h.log_likelihood(x, method="Dopri5", divergence="EXACT", rtol=1e-7, atol=1e-7)
    ref = exact_flow_log_likelihood(
        h.sde, x, torch.tensor([1.0, -2.0]), 0.5, h.sde.epsilon, h.sde.T
    )
    assert (lp - ref).abs().max() < 1e-4


def test_a_sample_answer_does_not_depend_on_the_rest_of_the_batch():
    h = handler(sde_class=VESDE)
    x = mixture_points(12, seed=2)
    together = h.log_likelihood(x, method="dopri5", divergence="exact")
    alone = torch.cat(
        [h.log_likelihood(x[i : i + 1], method="dopri5", divergence="exact") for i in (0, 5)]
    )
    assert torch.allclose(together[[0, 5]], alone, rtol=0, atol=1e-5)


def test_dopri5_hutchinson_draws_one_probe_set_per_solve_and_stays_unbiased():
    # one probe set per solve (a smooth field for the error control): the per-point spread is
    # that of a reused probe, the mean over independent solves is the exact answer
    h = handler(ExactGaussianScore, sde_class=VPSDE)
    x = (torch.randn(2, 2) * 0.5 + torch.tensor([1.0, -2.0])).repeat_interleave(200, dim=0)
    exact = h.log_likelihood(x[::200], method="dopri5", divergence="exact")
    torch.manual_seed(0)
    with CallRecorder(h.module) as rec:
        hutch = h.log_likelihood(x, method="dopri5", n_cotangent_vectors=2, noise_type="gaussian")
    assert (
        set(rec.batch_sizes) == {400} and (rec.calls - 2) % 6 == 0
    )  # probes batched: one forward per call
    runs = hutch.reshape(2, 200)
    se = runs.std(dim=1) / 200**0.5
    assert float(runs.std(dim=1).min()) > 0.5  # the probes are random: the solves differ
    assert ((runs.mean(dim=1) - exact).abs() < 4 * se).all(), (runs.mean(1), exact, se)


def test_ode_steps_caps_the_attempts_with_an_error_naming_it():
    h = handler(sde_class=VESDE)
    with pytest.raises(RuntimeError, match="ode_steps"):
        h.log_likelihood(mixture_points(4), method="dopri5", ode_steps=3, rtol=1e-8, atol=1e-8)
    with pytest.raises(ValueError, match="ode_steps is required for method='Euler'"):
        h.log_likelihood(mixture_points(4))


def test_exact_divergence_for_fixed_steps_matches_noise_type_exact():
    h = handler(sde_class=VPSDE)
    x = mixture_points(8)
    a = h.log_likelihood(x, ode_steps=10, method="heun", divergence="exact")
    b = h.log_likelihood(x, ode_steps=10, method="Heun", noise_type="exact")
    assert torch.equal(a, b)


# ---------------------------------------------------------------- memory
def peak_growth_mb(rtol: str) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tests" / "likelihood_memory_script.py"),
            "1000",
            "dopri5",
            rtol,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def test_dopri5_memory_is_flat_in_the_number_of_steps():
    # measured: 1e-2 -> 1e-7 takes 6 -> 27 attempts (38 -> 164 calls); peak RSS growth 4.4 and 3.2 MB
    loose, tight = peak_growth_mb("1e-2"), peak_growth_mb("1e-7")
    assert tight - loose < 100.0, (loose, tight)


# ---------------------------------------------------------------- named errors before any model call
def no_call_error(h, exc, match, x=None, **kwargs):
    x = mixture_points(4) if x is None else x
    with CallRecorder(h.module) as rec, pytest.raises(exc, match=match):
        h.log_likelihood(x, **kwargs)
    assert rec.calls == 0


def test_bad_options_are_named_before_any_model_call():
    h = handler()
    no_call_error(h, ValueError, r"method='rk45'.*dopri5", method="rk45", ode_steps=2)
    no_call_error(
        h, ValueError, r"divergence='trace'.*hutchinson.*exact", divergence="trace", ode_steps=2
    )
    no_call_error(h, ValueError, r"rtol must be a finite number > 0.*0", method="dopri5", rtol=0.0)
    no_call_error(
        h, ValueError, r"atol must be a finite number > 0.*nan", method="dopri5", atol=float("nan")
    )
    no_call_error(h, TypeError, r"rtol must be a real number.*str", method="dopri5", rtol="1e-5")
    no_call_error(h, ValueError, r"rtol.*-1", method="dopri5", rtol=-1)
    no_call_error(
        h, ValueError, r"ode_steps must be an integer >= 1.*got 0", method="dopri5", ode_steps=0
    )


def test_nan_in_x_is_named_as_the_input_not_the_model():
    h = handler()
    x = mixture_points(4)
    x[2, 1] = float("nan")
    no_call_error(
        h,
        ValueError,
        r"the input x holds NaN/inf values in 1 of 4 samples \(first: row 2\)",
        x=x,
        ode_steps=2,
    )
    with pytest.raises(ValueError, match="the input x holds NaN") as info:
        log_likelihood_ode(h.sde, lambda t, y: -y, x, steps=2, probes=None)
    assert "model's output" not in str(info.value)


def test_a_0d_tensor_t0_is_a_number():
    h = handler(ExactGaussianScore)
    x = torch.randn(3, 2)
    a = h.log_likelihood(x, ode_steps=4, t0=torch.tensor(0.01), noise_type="exact")
    b = h.log_likelihood(x, ode_steps=4, t0=0.01, noise_type="exact")
    assert torch.equal(a, b)
    no_call_error(
        h,
        TypeError,
        r"t0 must be a number or a 0-d tensor.*shape \(2,\)",
        ode_steps=2,
        t0=torch.ones(2),
    )


def test_exact_divergence_above_the_size_limit_is_refused_with_the_fix():
    h = handler(ExactGaussianScore)
    x = torch.randn(2, 300)
    no_call_error(
        h,
        ValueError,
        r"divergence='exact'.*D=300.*D <= 256.*divergence='hutchinson'",
        x=x,
        ode_steps=2,
        divergence="exact",
    )
    with pytest.raises(ValueError, match="D=300"):
        log_likelihood_ode(h.sde, lambda t, y: -y, x, steps=2, probes=None)


class WrongShape(ExactGaussianScore):
    def forward(self, t, x, *condition):
        return super().forward(t, x, *condition)[:, :1]


def test_a_score_of_the_wrong_shape_is_named_at_its_first_call():
    h = handler(WrongShape)
    for method in ("Euler", "dopri5"):
        with (
            CallRecorder(h.module) as rec,
            pytest.raises(ValueError, match=r"model's score.*\(4, 1\).*\(4, 2\)"),
        ):
            h.log_likelihood(mixture_points(4), ode_steps=2, method=method)
        assert rec.calls == 1
    with pytest.raises(ValueError, match=r"score_fn returned \(4, 1\) for x of shape \(4, 2\)"):
        log_likelihood_ode(
            h.sde, lambda t, y: y[:, :1], mixture_points(4), steps=2, probes=None, method="dopri5"
        )


BAD_TOLERANCES = st.one_of(
    st.floats(max_value=0.0),
    st.just(float("nan")),
    st.just(float("inf")),
    st.text(max_size=3),
    st.none(),
    st.booleans(),
    st.lists(st.floats(0.1, 1), max_size=2),
)


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(["rtol", "atol"]),
    value=BAD_TOLERANCES,
    method=st.sampled_from(["dopri5", "euler"]),
)
def test_fuzz_bad_tolerances_are_named(name, value, method):
    h = handler(ExactGaussianScore)
    with pytest.raises((TypeError, ValueError), match=name):
        h.log_likelihood(torch.zeros(2, 2), ode_steps=2, method=method, **{name: value})


@settings(max_examples=30, deadline=None)
@given(
    arg=st.sampled_from(["method", "divergence"]),
    value=st.one_of(st.text(max_size=8), st.integers(), st.none()),
)
def test_fuzz_unknown_names_are_named(arg, value):
    known = {"method": ["euler", "heun", "rk4", "dopri5"], "divergence": ["hutchinson", "exact"]}[
        arg
    ]
    if isinstance(value, str) and value.lower() in known:
        return
    h = handler(ExactGaussianScore)
    with pytest.raises(ValueError, match=arg):
        h.log_likelihood(torch.zeros(2, 2), ode_steps=2, **{arg: value})


def test_a_model_turning_nan_mid_solve_warns_and_ends_the_solve():
    from gen_models import NaNAfter

    h = handler(NaNAfter, sde_class=VPSDE, k=5)
    with (
        CallRecorder(h.module) as rec,
        pytest.warns(RuntimeWarning, match=r"dopri5 step.*input x was finite"),
    ):
        lp = h.log_likelihood(torch.randn(3, 2), method="dopri5", divergence="exact")
    assert bool(torch.isnan(lp).all()) and rec.calls <= 2 + 6 * 2  # no stall until ode_steps


def test_dopri5_is_differentiable_only_when_asked():
    h = handler(ExactGaussianScore)
    x = torch.randn(4, 2)
    assert not h.log_likelihood(x, method="dopri5").requires_grad
    lp = h.log_likelihood(
        x, method="dopri5", differentiable=True, apply_ema=False, rtol=1e-3, atol=1e-3
    )
    lp.sum().backward()
    assert h.module.scale.grad is not None and bool(torch.isfinite(h.module.scale.grad))


def test_dopri5_of_a_dataset_in_batches_is_the_tensor_result():
    from torch.utils.data import DataLoader, TensorDataset

    h = handler(sde_class=VESDE)
    x = mixture_points(10, seed=3)
    whole = h.log_likelihood(x, method="dopri5", divergence="exact")
    batched = h.log_likelihood(
        DataLoader(TensorDataset(x), batch_size=3), method="dopri5", divergence="exact"
    )
    assert torch.allclose(
        batched, whole, rtol=0, atol=1e-5
    )  # per-sample steps: batching does not matter
