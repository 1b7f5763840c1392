"""The second-wave samplers through ``NNHandler.sample(..., method=...)`` (issue 10).

``method="em"`` stays bitwise the first-wave sampler; ``"pc"`` and ``"ode"`` make the stated
number of model calls; the ODE sampler is a function of the prior draw; conditions, guidance
and ``denoise`` work with every method; bad options are refused before any work.
"""

from __future__ import annotations

import math

import pytest
import torch
from gen_models import CallRecorder, ExactGaussianScore, NaNAfter, gaussian_marginal_var

from nnh import NNHandler
from nnh.generative import VPSDE, sample_reverse_sde, score_calls, tweedie_denoise
from nnh.generative.sde import SDE

torch.set_num_threads(1)
M, S = torch.tensor([1.0, -2.0]), 0.5
METHODS = [
    {"method": "em"},
    {"method": "em", "time_grid": "edm"},
    {"method": "pc"},
    {"method": "ode", "ode_method": "Euler"},
    {"method": "ode"},
    {"method": "ode", "ode_method": "RK4", "time_grid": "edm"},
]


def exact_handler(model_class=ExactGaussianScore, **kwargs) -> NNHandler:
    h = NNHandler(model_class, model_type="score_based", mean=M.tolist(), std=S,
                  sde_config=VPSDE().config(), **kwargs)
    h.set_sde(VPSDE)
    return h


def exact_score(sde: SDE, t: torch.Tensor, x: torch.Tensor, m: torch.Tensor, s: float) -> torch.Tensor:
    t = t.to(x.dtype)
    return -(x - sde.mu(t).reshape(-1, 1) * m) / gaussian_marginal_var(sde, t, s).reshape(-1, 1)


def test_em_default_is_bitwise_the_first_wave_sampler_with_condition_and_guidance():
    h = exact_handler()
    sde, model = h.sde, h.module
    c = torch.randn(6, 2)
    guide = lambda t, x: -0.1 * x  # noqa: E731

    def score_fn(t, x):
        return model(t, x, c) / sde.sigma(t).reshape(-1, 1)

    h.seed = 5
    a = h.sample((6, 2), 30, condition=[c], likelihood_score_fn=guide, guidance_factor=0.7, bar=False)
    h.seed = 5
    b = h.sample((6, 2), 30, condition=[c], likelihood_score_fn=guide, guidance_factor=0.7,
                 bar=False, method="em", time_grid="uniform")
    torch.manual_seed(5)
    with torch.no_grad():
        ref = sample_reverse_sde(sde, score_fn, (6, 2), 30, guidance_fn=guide, guidance_factor=0.7)
    assert torch.equal(a, ref) and torch.equal(b, ref)


@pytest.mark.parametrize(
    ("options", "per_step"),
    [({"method": "em"}, 1), ({"method": "pc", "corrector_steps": 0}, 1), ({"method": "pc"}, 2),
     ({"method": "pc", "corrector_steps": 3}, 4), ({"method": "ode", "ode_method": "Euler"}, 1),
     ({"method": "ode"}, 2), ({"method": "ode", "ode_method": "RK4"}, 4)],
)
@pytest.mark.parametrize("denoise", [False, True])
def test_model_calls_per_method(options, per_step, denoise):
    h = exact_handler()
    with CallRecorder(h.module) as rec:
        x = h.sample((7, 2), 5, bar=False, denoise=denoise, **options)
    assert rec.calls == 5 * per_step + denoise == score_calls(steps=5, denoise=denoise, **options)
    assert set(rec.batch_sizes) == {7} and x.shape == (7, 2)


def test_the_ode_sampler_draws_only_the_prior():
    h = exact_handler()
    h.seed = 2
    a = h.sample((16, 2), 10, method="ode", bar=False)
    after = torch.randn(3)
    h.seed = 2
    b = h.sample((16, 2), 10, method="ode", bar=False)
    assert torch.equal(a, b)
    torch.manual_seed(2)
    h.sde.prior((16, 2))
    assert torch.equal(torch.randn(3), after)  # exactly one draw: the prior sample


@pytest.mark.parametrize("options", METHODS, ids=lambda o: "-".join(o.values()))
def test_conditions_reach_the_model_with_every_method(options):
    h = exact_handler()
    n = 1000
    c = torch.cat([torch.full((n // 2, 2), 3.0), torch.tensor([[-3.0, 0.0]]).expand(n // 2, 2)])
    h.seed = 0
    with CallRecorder(h.module) as rec:
        x = h.sample((n, 2), 60, condition=[c], bar=False, **options)
    assert all(e[0] is c for e in rec.extras)
    # the condition is the data mean of the exact model: SE 0.022 per half
    assert torch.allclose(x[: n // 2].mean(0), torch.tensor([3.0, 3.0]), atol=0.1)
    assert torch.allclose(x[n // 2 :].mean(0), torch.tensor([-3.0, 0.0]), atol=0.1)


@pytest.mark.parametrize("options", METHODS, ids=lambda o: "-".join(o.values()))
def test_guidance_reaches_the_exact_posterior_with_every_method(options):
    # prior N(m, s^2 I), likelihood N(y; x, r^2 I): posterior N(mp, sp^2 I); the guidance is
    # the exact score of the noisy likelihood (posterior score minus prior score)
    h = exact_handler()
    sde, y, r = h.sde, torch.tensor([2.0, 0.0]), 0.5
    mp = (S**2 * y + r**2 * M) / (S**2 + r**2)
    sp = math.sqrt(S**2 * r**2 / (S**2 + r**2))

    def likelihood_score(t, x):
        return exact_score(sde, t, x, mp, sp) - exact_score(sde, t, x, M, S)

    h.seed = 0
    x = h.sample((4000, 2), 100, likelihood_score_fn=likelihood_score, bar=False, **options)
    assert torch.allclose(x.mean(0), mp, atol=0.03), x.mean(0)  # SE 0.0056
    assert torch.allclose(x.std(0), torch.full((2,), sp), rtol=0.06), x.std(0)
    h.seed = 1
    a = h.sample((8, 2), 10, likelihood_score_fn=likelihood_score, guidance_factor=0.0, bar=False, **options)
    h.seed = 1
    assert torch.equal(a, h.sample((8, 2), 10, bar=False, **options))  # factor 0: unguided


@pytest.mark.parametrize("method", ["em", "pc", "ode"])
def test_denoise_is_one_tweedie_step_at_the_end(method):
    h = exact_handler()
    h.seed = 3
    plain = h.sample((8, 2), 10, method=method, bar=False)
    h.seed = 3
    denoised = h.sample((8, 2), 10, method=method, denoise=True, bar=False)
    t = torch.full((8,), h.sde.epsilon)
    with torch.no_grad():
        expected = tweedie_denoise(h.sde, h.score, t, plain)
    assert torch.equal(denoised, expected) and not torch.equal(denoised, plain)


@pytest.mark.parametrize("method", ["pc", "ode"])
def test_nan_stops_every_method_with_a_warning_naming_the_step(method):
    h = exact_handler(model_class=NaNAfter, k=4)
    per_step = 2  # pc with one corrector step, Heun
    with pytest.warns(RuntimeWarning, match=rf"sample_sde \({method}\): non-finite .* after step 3/10"):
        x = h.sample((5, 2), 10, method=method, bar=False)
    assert torch.isfinite(x).all() and h.module.calls == 3 * per_step


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [({"method": "ddim"}, ValueError, r"method='ddim': use one of \('em', 'pc', 'ode'\)"),
     ({"method": "ode", "ode_method": "midpoint"}, ValueError, r"ode_method='midpoint': use one of \('Euler', 'Heun', 'RK4', 'dpm\+\+2m'"),
     ({"method": "pc", "corrector_steps": -1}, ValueError, r"corrector_steps must be an int >= 0"),
     ({"method": "pc", "snr": 0.0}, ValueError, r"snr must be a finite number > 0"),
     ({"time_grid": "cosine"}, ValueError, r"time_grid='cosine': use one of \('uniform', 'edm', 'logsnr'\)"),
     ({"shape": ()}, ValueError, r"shape=\(\) has no batch dimension"),
     ({"shape": 5}, TypeError, r"shape must be a tuple"),
     ({"steps": 0}, ValueError, r"steps must be an integer >= 1")],
)
def test_sampler_argument_errors_come_before_any_model_call(options, error, match):
    h = exact_handler()
    kwargs = {"shape": (4, 2), "steps": 3, "bar": False, **options}
    with CallRecorder(h.module) as rec, pytest.raises(error, match=match):
        h.sample(**kwargs)
    assert rec.calls == 0
