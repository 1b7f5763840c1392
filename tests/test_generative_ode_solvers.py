"""The third-wave ODE samplers through ``NNHandler.sample`` and the core (issue 20).

DPM-Solver++ multistep makes one model call per step and converges to the same flow as
RK4; the noise-level Heun beats its old t-space self on VE; option names are
case-insensitive; every bad argument is named before any model call; the grids refuse bad
arguments and stay strictly decreasing.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from gen_models import CallRecorder, ExactGaussianScore, MixtureExactScore, mixture_errors

from nnh import NNHandler
from nnh.generative import (
    VESDE,
    VPSDE,
    SubVPSDE,
    dpm_solver_pp_step,
    edm_grid,
    probability_flow_step,
    sample_sde,
    score_calls,
    time_grid,
)

torch.set_num_threads(1)


def exact_handler(model_class=ExactGaussianScore, sde_class=VPSDE, **kwargs) -> NNHandler:
    h = NNHandler(model_class, model_type="score_based", sde_config=sde_class().config(), **kwargs)
    h.set_sde(sde_class)
    return h


@pytest.mark.parametrize(
    ("ode_method", "per_step"), [("dpm++2m", 1), ("DPM++3M", 1), ("heun", 2), ("Rk4", 4)]
)
def test_every_ode_method_makes_the_stated_number_of_model_calls(ode_method, per_step):
    h = exact_handler()
    with CallRecorder(h.module) as rec:
        x = h.sample(
            (5, 2), 7, method="ODE", ode_method=ode_method, time_grid="EDM", bar=False, denoise=True
        )
    assert rec.calls == 7 * per_step + 1 == score_calls("ode", 7, ode_method, denoise=True)
    assert x.shape == (5, 2) and torch.isfinite(x).all()


@pytest.mark.parametrize("sde_class", [VESDE, VPSDE, SubVPSDE])
@pytest.mark.parametrize("ode_method", ["dpm++2m", "dpm++3m"])
def test_multistep_converges_to_the_flow_of_rk4(sde_class, ode_method):
    sde = sde_class()
    model = MixtureExactScore(sde_config=sde.config())

    def score(t, x):
        with torch.no_grad():
            return model(t, x) / sde.sigma(t.to(x.dtype)).reshape(-1, 1)

    def run(method, steps):
        g = torch.Generator().manual_seed(1)
        return sample_sde(sde, score, (400, 2), steps, method="ode", ode_method=method,
                          time_grid="edm", generator=g, dtype=torch.float64)  # fmt: skip

    ref = run("RK4", 200)
    errs = [float((run(ode_method, n) - ref).norm(dim=1).mean()) for n in (20, 80)]
    assert errs[1] < 0.2 * errs[0] and errs[1] < 0.02, errs


def test_dpm_solver_at_20_calls_samples_the_mixture():
    # the benchmark's goal at 20k samples is weights 0.02 / std 5 %; here 4000 samples (std SE ~2.4 %)
    h = exact_handler(MixtureExactScore, VESDE)
    h.seed = 0
    x = h.sample((4000, 2), 20, method="ode", ode_method="dpm++2m", time_grid="edm", bar=False)
    w_err, s_err = mixture_errors(x, h.sde)
    assert w_err < 0.02 and s_err < 0.12, (w_err, s_err)


def test_noise_level_heun_beats_the_t_space_heun_on_ve():
    # issue 20: Heun in t on the edm grid gave 14.4 % std error at 40 calls on VE; in lambda ~3 %
    h = exact_handler(MixtureExactScore, VESDE)
    h.seed = 0
    x = h.sample((4000, 2), 20, method="ode", ode_method="Heun", time_grid="edm", bar=False)
    assert mixture_errors(x, h.sde)[1] < 0.09


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (
            {"guidance_factor": math.nan, "likelihood_score_fn": lambda t, x: x},
            r"guidance_factor must be a finite number, got nan",
        ),
        ({"method": "pc", "snr": math.inf}, r"snr must be a finite number, got inf"),
        ({"denoise": "no"}, r"denoise must be True or False, got 'no'"),
        ({"steps": -2}, r"steps must be an integer >= 1, got -2"),
        ({"method": "ode", "ode_method": "dpm++9m"}, r"ode_method='dpm\+\+9m': use one of"),
        ({"time_grid": "karras"}, r"time_grid='karras': use one of \('uniform', 'edm', 'logsnr'\)"),
        (
            {"condition": [torch.zeros(3, 2)]},
            r"condition\[0\] has batch 3 \(shape \(3, 2\)\) but shape\[0\]=4",
        ),
    ],
)
def test_bad_arguments_are_named_before_any_model_call(options, match):
    h = exact_handler()
    kwargs = {"shape": (4, 2), "steps": 3, "bar": False, **options}
    with CallRecorder(h.module) as rec, pytest.raises(ValueError, match=match):
        h.sample(**kwargs)
    assert rec.calls == 0


@pytest.mark.parametrize("method", ["em", "ode"])
def test_a_shape_that_does_not_fit_the_model_is_named(method):
    h = exact_handler()  # a 2-d model
    with pytest.raises(ValueError, match=r"shape=\(4, 3\) does not fit the model"):
        h.sample((4, 3), 3, method=method, bar=False)


def test_names_are_case_insensitive_and_edm_means_edm():
    h = exact_handler()
    outs = []
    for grid, method, ode in (("EDM", "ODE", "DPM++2M"), ("edm", "ode", "dpm++2m")):
        h.seed = 3
        outs.append(h.sample((4, 2), 5, method=method, ode_method=ode, time_grid=grid, bar=False))
    assert torch.equal(*outs)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: time_grid(VPSDE(), 0, 1e-3, "edm"), r"steps must be an integer >= 1, got 0"),
        (lambda: time_grid(VPSDE(), 0, 1e-3), r"steps must be an integer >= 1, got 0"),
        (
            lambda: edm_grid(VPSDE(), 5, 2.0),
            r"t_end must be a finite time in \[0, T\) = \[0, 1.0\), got 2.0",
        ),
        (lambda: time_grid(VPSDE(), 5, math.nan, "logsnr"), r"t_end must be a finite time"),
        (lambda: time_grid(VPSDE(), 5, 1e-3, "EDMX"), r"time_grid='EDMX'"),
    ],
)
def test_core_grids_refuse_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize(
    "sde", [VESDE(), VPSDE(), SubVPSDE(), VESDE(sigma_min=1e-3, sigma_max=2e-3)]
)
@pytest.mark.parametrize("name", ["edm", "logsnr"])
def test_noise_level_grids_are_strictly_decreasing_and_skip_the_flat_end(sde, name):
    grid = time_grid(sde, 12, sde.epsilon, name.upper())
    assert grid[0] == sde.T and grid[-1] == sde.epsilon
    assert all(a > b for a, b in itertools.pairwise(grid))
    # sub-VP: lambda(1e-5) ~ 1e-6; the next-to-last time sits at the floor 2e-3, not at ~1e-6
    level = lambda t: float(sde.sigma(torch.tensor(t)) / sde.mu(torch.tensor(t)))  # noqa: E731
    assert level(grid[-2]) >= min(2e-3, 1e-3 * level(sde.T)) * 0.999


@pytest.mark.parametrize("method", ["em", "ode", "pc"])
def test_a_score_of_another_shape_is_named_not_broadcast(method):
    # [B, 1] would broadcast silently against x [B, 2]
    with pytest.raises(
        ValueError, match=r"shape=\(4, 2\) does not fit the model: .* shape \(4, 1\)"
    ):
        sample_sde(VPSDE(), lambda t, x: x[:, :1], (4, 2), 3, method=method)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (
            lambda: probability_flow_step(
                VPSDE(), lambda t, x: -x, math.nan, torch.ones(2, 2), 0.1
            ),
            r"t must be a finite time, got nan",
        ),
        (
            lambda: dpm_solver_pp_step(VPSDE(), lambda t, x: -x, math.inf, 0.5, torch.ones(2, 2)),
            r"need finite times t_next < t, got t=inf",
        ),
        (
            lambda: dpm_solver_pp_step(VPSDE(), lambda t, x: -x, 0.5, 0.6, torch.ones(2, 2)),
            r"t_next < t",
        ),
    ],
)
def test_core_steps_refuse_non_finite_or_backward_times(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_heun_ending_at_zero_noise_keeps_two_calls_and_stays_finite():
    # VP on the uniform grid down to t_end = 0 (lambda = 0): the last corrector is dropped
    # without a host sync, the call count stays 2 per step and the result finite
    sde, calls = VPSDE(), []
    def score(t, x):
        calls.append(1)
        return -x / (sde.mu(t) ** 2 * 0.25 + sde.sigma(t) ** 2).reshape(-1, 1)

    x = sample_sde(
        sde, score, (6, 2), 5, method="ode", t_end=0.0, generator=torch.Generator().manual_seed(0)
    )
    assert len(calls) == 10 and torch.isfinite(x).all()
