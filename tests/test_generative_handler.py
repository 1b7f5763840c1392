"""Score-based and generative models through the public NNHandler API.

Ground truth: data N(m, s^2 I), m = (1, -2), s = 0.5, and ``ExactGaussianScore``, a model that
outputs sigma(t) times the exact score of the marginal under the handler's SDE. Everything
the handler computes with it (samples, log-likelihoods, posterior under guidance) is known in
closed form, so the tolerances are the ones measured for the core in docs/generative.md.
A small MLP trained by ``handler.train`` on a 2-D mixture checks the whole loop.
"""

from __future__ import annotations

import math
import time
import warnings

import pytest
import torch
from gen_models import (
    CallRecorder,
    ExactGaussianScore,
    NaNAfter,
    ScoreMLP,
    SDESampler,
    exact_flow_log_likelihood,
    fraction_near_modes,
    gaussian_log_density,
    gaussian_marginal_var,
    mixture_data,
    mixture_log_density,
)
from torch import nn
from torch.utils.data import TensorDataset

import nnh
from nnh import NNHandler
from nnh.generative import SDE, VESDE, VPSDE, SubVPSDE, sample_reverse_sde
from nnh.generative.sampler import Sampler

torch.set_num_threads(1)

M = torch.tensor([1.0, -2.0])
S = 0.5
SDE_CLASSES = {"VE": VESDE, "VP": VPSDE, "subVP": SubVPSDE}


def exact_handler(sde_class: type[SDE] = VPSDE, model_class: type[nn.Module] = ExactGaussianScore,
                  **kwargs) -> NNHandler:
    """A SCORE_BASED handler whose model is the exact score of N(M, S^2 I) under its SDE."""
    sde_kwargs = kwargs.pop("sde_kwargs", {})
    sde = sde_class(**sde_kwargs)
    h = NNHandler(model_class, model_type="score_based", mean=M.tolist(), std=S,
                  sde_config=sde.config(), **kwargs)
    h.set_sde(sde_class, **sde_kwargs)
    return h


def exact_score(sde: SDE, t: torch.Tensor, x: torch.Tensor, m: torch.Tensor = M, s: float = S) -> torch.Tensor:
    t = t.to(x.dtype)
    return -(x - sde.mu(t).reshape(-1, 1) * m.to(x.dtype)) / gaussian_marginal_var(sde, t, s).reshape(-1, 1)


def data_points(n: int = 8, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return (M + S * torch.randn(n, 2, generator=g)).to(dtype)


# ---------------------------------------------------------------- SDE and score
def test_set_sde_and_the_validating_sde_property():
    h = NNHandler(ExactGaussianScore, model_type=NNHandler.ModelType.SCORE_BASED)
    assert h.sde is None
    h.set_sde(VESDE, sigma_min=0.02, sigma_max=10.0)
    assert isinstance(h.sde, VESDE) and h.sde.sigma_max == 10.0
    h.sde = VPSDE(beta_max=15.0)
    assert isinstance(h.sde, VPSDE) and h.sde.beta_max == 15.0
    with pytest.raises(TypeError, match="is not an SDE"):
        h.sde = object()
    assert isinstance(h.sde, VPSDE)  # a rejected value leaves the SDE as it was
    with pytest.raises(TypeError, match="VPSDE cannot be built with"):
        h.set_sde(VPSDE, sigma_max=3.0)
    with pytest.raises(ValueError, match="sigma_min must be < sigma_max"):
        h.set_sde(VESDE, sigma_min=2.0, sigma_max=1.0)
    h.sde = None
    with pytest.raises(RuntimeError, match=r"needs an SDE: call set_sde"):
        h.score(torch.full((2,), 0.5), torch.zeros(2, 2))
    for call in (lambda: h.sample((2, 2), 3, bar=False), lambda: h.log_likelihood(torch.zeros(2, 2), ode_steps=2)):
        with pytest.raises(RuntimeError, match="set_sde"):
            call()


@pytest.mark.parametrize("name", list(SDE_CLASSES))
def test_score_is_model_output_over_sigma(name):
    h = exact_handler(SDE_CLASSES[name])
    sde = h.sde
    t = torch.tensor([1e-3, 0.2, 0.5, 0.9])
    x = torch.randn(4, 2)
    with torch.no_grad():
        out = h.module(t, x)
        assert torch.allclose(h.score(t, x), out / sde.sigma(t).reshape(-1, 1), rtol=1e-6)
        assert torch.allclose(h.score(t, x), exact_score(sde, t, x), rtol=1e-5, atol=1e-6)
        # a 0-d t is expanded to the batch; extra arguments go to the model (here: the mean)
        t0 = torch.tensor(0.3)
        assert torch.allclose(h.score(t0, x), exact_score(sde, t0.expand(4), x), rtol=1e-5, atol=1e-6)
        c = torch.full((4, 2), 3.0)
        assert torch.allclose(h.score(t, x, c), exact_score(sde, t, x, m=torch.tensor([3.0, 3.0])),
                              rtol=1e-5, atol=1e-6)
    with CallRecorder(h.module) as rec, torch.no_grad():
        h.score(t, x, c)
    assert rec.calls == 1 and rec.extras[0][0] is c


# ---------------------------------------------------------------- sampling
@pytest.mark.parametrize("name", list(SDE_CLASSES))
def test_sample_reproduces_the_gaussian_data(name):
    # 4000 samples, 500 steps: SE 0.008 (mean), 0.0056 (std); the core measured <= 0.013 / 0.011
    h = exact_handler(SDE_CLASSES[name])
    h.seed = 0
    with CallRecorder(h.module) as rec:
        x = h.sample((4000, 2), steps=500, bar=False)
    assert rec.calls == 500 and set(rec.batch_sizes) == {4000}  # exactly one model call per step
    target_std = math.sqrt(S**2 + h.sde.sigma(h.sde.epsilon).item() ** 2)
    assert torch.allclose(x.mean(0), M, atol=0.04), x.mean(0)
    assert torch.allclose(x.std(0), torch.full((2,), target_std), atol=0.025), x.std(0)


def test_sample_is_the_reverse_sde_and_the_last_step_is_noise_free():
    h = exact_handler(VPSDE)
    sde, model = h.sde, h.module

    def score_fn(t, x):
        return model(t, x) / sde.sigma(t).reshape(-1, 1)

    # same global seed -> bitwise the core's Euler-Maruyama sampler
    h.seed = 7
    a = h.sample((16, 2), steps=20, bar=False)
    torch.manual_seed(7)
    with torch.no_grad():
        b = sample_reverse_sde(sde, score_fn, (16, 2), 20)
    assert torch.equal(a, b)
    # one step from T to epsilon: the prior draw moved by the drift only, no noise added
    h.seed = 3
    one = h.sample((16, 2), steps=1, bar=False)
    torch.manual_seed(3)
    z = sde.prior((16, 2))
    t = torch.full((16,), sde.T)
    with torch.no_grad():
        g = sde.diffusion(t, z)
        expected = z - (sde.drift(t, z) - g * g * score_fn(t, z)) * (sde.T - sde.epsilon)
    assert torch.equal(one, expected)
    # and it consumed exactly one draw (the prior): the next global draw is the one after it
    torch.manual_seed(3)
    sde.prior((16, 2))
    after = torch.randn(3)
    h.seed = 3
    h.sample((16, 2), steps=1, bar=False)
    assert torch.equal(torch.randn(3), after)


def test_conditions_reach_the_model_in_sampling():
    h = exact_handler(VPSDE)
    n = 2000
    c = torch.cat([torch.full((n // 2, 2), 3.0), torch.tensor([[-3.0, 0.0]]).expand(n // 2, 2)])
    h.seed = 0
    with CallRecorder(h.module) as rec:
        x = h.sample((n, 2), steps=200, condition=[c], bar=False)
    assert rec.calls == 200 and all(e[0] is c for e in rec.extras)
    # the condition is the data mean of the exact model: each half lands around its own mean
    assert torch.allclose(x[: n // 2].mean(0), torch.tensor([3.0, 3.0]), atol=0.06)
    assert torch.allclose(x[n // 2 :].mean(0), torch.tensor([-3.0, 0.0]), atol=0.06)


def test_likelihood_guidance_reaches_the_exact_posterior():
    # prior N(m, s^2 I), likelihood N(y; x, r^2 I) -> posterior N(mp, sp^2 I); the guidance
    # is the exact score of the noisy likelihood p_t(y | x_t) = posterior - prior score
    h = exact_handler(VPSDE)
    sde, y, r = h.sde, torch.tensor([2.0, 0.0]), 0.5
    mp = (S**2 * y + r**2 * M) / (S**2 + r**2)  # (1.5, -1.0)
    sp = math.sqrt(S**2 * r**2 / (S**2 + r**2))  # 0.354
    calls = []

    def likelihood_score(t, x):
        calls.append(x.shape)
        return exact_score(sde, t, x, m=mp, s=sp) - exact_score(sde, t, x)

    h.seed = 0
    with CallRecorder(h.module) as rec:
        x = h.sample((4000, 2), steps=500, likelihood_score_fn=likelihood_score, bar=False)
    assert rec.calls == 500 and len(calls) == 500  # guidance does not add model calls
    assert torch.allclose(x.mean(0), mp, atol=0.03), x.mean(0)  # SE 0.0056; core measured 0.008
    assert torch.allclose(x.std(0), torch.full((2,), sp), atol=0.02), x.std(0)
    # guidance_factor multiplies the likelihood score: factor 0 is unguided, 2 * (h/2) is h
    h.seed = 1
    a = h.sample((8, 2), 20, likelihood_score_fn=likelihood_score, guidance_factor=0.0, bar=False)
    h.seed = 1
    b = h.sample((8, 2), 20, bar=False)
    assert torch.equal(a, b)
    h.seed = 1
    c = h.sample((8, 2), 20, likelihood_score_fn=lambda t, x: likelihood_score(t, x) / 2,
                 guidance_factor=2.0, bar=False)
    h.seed = 1
    d = h.sample((8, 2), 20, likelihood_score_fn=likelihood_score, bar=False)
    assert torch.equal(c, d) and not torch.equal(c, b)


def test_nan_stops_sampling_with_a_warning_naming_the_step():
    h = exact_handler(VPSDE, model_class=NaNAfter, k=3)
    h.seed = 0
    with CallRecorder(h.module) as rec, pytest.warns(RuntimeWarning, match=r"non-finite .* after step 4/10"):
        x = h.sample((5, 2), steps=10, bar=False)
    assert rec.calls == 4  # stopped at the first NaN step
    assert torch.isfinite(x).all()  # the last finite state
    h.module.calls = 0
    with CallRecorder(h.module) as rec, warnings.catch_warnings():
        warnings.simplefilter("error")  # no check, no warning
        y = h.sample((5, 2), steps=10, bar=False, stop_on_NaN=False)
    assert rec.calls == 10 and torch.isnan(y).all()


def test_sample_argument_errors():
    h = exact_handler(VPSDE)
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        h.sample((2, 2), steps=0, bar=False)


# ---------------------------------------------------------------- likelihood
# tolerances: 1.5-2.5x the float64 errors the core measured against the exact flow
# (docs/generative.md): VP Heun 100: 1.2e-3, VE Heun 200: 4.1e-3, subVP Euler 200: 2.5e-2;
# plus the prior mismatch at T against the data density (0.071 VE, 0.024 VP/subVP).
LIKELIHOOD_CASES = [("VP", "Heun", 100, 2.5e-3, 0.03), ("VE", "Heun", 200, 8e-3, 0.08),
                    ("subVP", "Euler", 200, 5e-2, 0.03)]


@pytest.mark.parametrize(("name", "method", "steps", "tol", "mismatch"), LIKELIHOOD_CASES)
def test_log_likelihood_matches_the_exact_gaussian_density(name, method, steps, tol, mismatch):
    h = exact_handler(SDE_CLASSES[name])
    sde, x = h.sde, data_points()
    lp = h.log_likelihood(x, ode_steps=steps, method=method)  # Rademacher: exact (diagonal Jacobian)
    assert lp.shape == (8,) and lp.dtype == torch.float64 and not lp.requires_grad
    ref = exact_flow_log_likelihood(sde, x, M, S, sde.epsilon, sde.T)
    assert (lp - ref).abs().max() < tol
    assert (lp - gaussian_log_density(x, M, S**2)).abs().max() < tol + mismatch


def test_log_likelihood_equals_the_data_density_when_the_prior_matches():
    # VP with T=3: mu(T)^2 = 7e-14, so the prior is the true marginal at T; RK4 100 steps
    h = exact_handler(VPSDE, sde_kwargs={"T": 3.0})
    x = data_points()
    lp = h.log_likelihood(x, ode_steps=100, method="RK4", n_cotangent_vectors=3)
    assert (lp - gaussian_log_density(x, M, S**2)).abs().max() < 1e-4
    # t0 / t1 are passed through: integrating to t1 = 1 (not T = 3) gives the exact-flow value there
    lp1 = h.log_likelihood(x, ode_steps=100, method="RK4", t1=1.0)
    assert (lp1 - exact_flow_log_likelihood(h.sde, x, M, S, h.sde.epsilon, 1.0)).abs().max() < 1e-4
    lp0 = h.log_likelihood(x, ode_steps=100, method="RK4", t0=0.1)  # the density of the marginal at 0.1
    var = gaussian_marginal_var(h.sde, torch.tensor(0.1, dtype=x.dtype), S)
    assert (lp0 - gaussian_log_density(x, h.sde.mu(torch.tensor(0.1, dtype=x.dtype)) * M, var)).abs().max() < 1e-4


def test_log_likelihood_passes_conditions_to_the_model():
    # the condition is the mean of the exact model: points drawn around it score as data
    h = exact_handler(VPSDE)
    m = torch.tensor([3.0, 3.0], dtype=torch.float64)
    x = data_points() - M.double() + m
    c = m.expand(8, 2).clone()
    with CallRecorder(h.module) as rec:
        lp = h.log_likelihood(x, c, ode_steps=100, method="Heun")
    assert rec.calls == 200 and all(e[0] is c for e in rec.extras)
    ref = exact_flow_log_likelihood(h.sde, x, m, S, h.sde.epsilon, h.sde.T)
    assert (lp - ref).abs().max() < 5e-3  # measured 2.5e-3
    assert (lp - gaussian_log_density(x, m, S**2)).abs().max() < 0.1  # measured 0.053: the prior mismatch grows with |m|


@pytest.mark.parametrize(("method", "per_step"), [("Euler", 1), ("Heun", 2), ("RK4", 4)])
def test_log_likelihood_cost_is_one_model_call_per_evaluation_with_probes_batched(method, per_step):
    h = exact_handler(VPSDE)
    x = data_points(dtype=torch.float32)
    for k in (1, 6):
        with CallRecorder(h.module) as rec:
            h.log_likelihood(x, ode_steps=5, n_cotangent_vectors=k, noise_type="gaussian", method=method)
        assert rec.calls == 5 * per_step
        assert set(rec.batch_sizes) == {8}  # the model sees x's batch, never batch * K


def test_noise_types_and_argument_errors():
    h = exact_handler(VPSDE)
    x = data_points()
    exact = h.log_likelihood(x, ode_steps=50, method="Heun", noise_type="rademacher")
    h.seed = 0
    one = h.log_likelihood(x, ode_steps=50, method="Heun", noise_type="gaussian")
    assert (one - exact).abs().max() > 1e-3  # one Gaussian probe is a noisy estimate ...
    h.seed = 0
    many = h.log_likelihood(x, ode_steps=50, method="Heun", noise_type="gaussian", n_cotangent_vectors=4000)
    assert (many - exact).abs().max() < 0.12  # ... which averages out (SE 1.4 nats / sqrt(4000) = 0.022)
    with pytest.raises(ValueError, match=r"noise_type='uniform': use 'rademacher' or 'gaussian'"):
        h.log_likelihood(x, ode_steps=2, noise_type="uniform")
    with pytest.raises(
        ValueError, match=r"method='Midpoint' is not a likelihood integrator; use one of \('Euler', 'Heun', 'RK4', 'dopri5'\)"
    ):
        h.log_likelihood(x, ode_steps=2, method="Midpoint")
    with pytest.raises(ValueError, match="n_cotangent_vectors must be an int >= 1"):
        h.log_likelihood(x, ode_steps=2, n_cotangent_vectors=0)
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        h.log_likelihood(x, ode_steps=0)


# ---------------------------------------------------------------- EMA
def test_sample_and_log_likelihood_use_ema_weights_and_restore_the_live_ones():
    torch.manual_seed(0)
    h = NNHandler(ScoreMLP, model_type="score_based", hidden=16)
    h.set_sde(VPSDE)
    h.set_optimizer(torch.optim.Adam, lr=1e-2)
    h.set_train_loader(TensorDataset(mixture_data(64, seed=0)), batch_size=16)
    h.train(epochs=2, ema_decay=0.5, progress_bar=False, seed=0)
    names = [n for n, _ in h.module.named_parameters()]
    ema = [h.state.ema[n].clone() for n in names]
    live = [p.detach().clone() for p in h.module.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(ema, live, strict=True))  # EMA differs from live

    def same(a, b):
        return all(torch.equal(u, v) for u, v in zip(a, b, strict=True))

    for run in (lambda **kw: h.sample((4, 2), 3, bar=False, **kw),
                lambda **kw: h.log_likelihood(torch.randn(4, 2), ode_steps=2, **kw)):
        with CallRecorder(h.module, record_params=True) as rec:
            run(apply_ema=True)
        assert rec.calls > 0 and all(same(p, ema) for p in rec.params)
        assert same([p.detach() for p in h.module.parameters()], live)  # restored bitwise
        with CallRecorder(h.module, record_params=True) as rec:
            run(apply_ema=False)
        assert rec.calls > 0 and all(same(p, live) for p in rec.params)
    assert h.module.training  # the mode is restored after sampling in eval mode


# ---------------------------------------------------------------- training
def test_score_based_without_a_loss_trains_with_denoising_score_matching():
    # the exact score times a learnable scale: DSM's minimiser is scale = 1 (the true score),
    # so training from scale = 0.5 must move it there; the conditions reach the model too
    torch.manual_seed(0)
    x = M + S * torch.randn(2000, 2)
    c = M.expand(2000, 2).clone()
    h = exact_handler(VPSDE, scale=0.5)
    h.set_optimizer(torch.optim.Adam, lr=0.05)
    h.set_train_loader(TensorDataset(x, c), batch_size=200, shuffle=True)
    with CallRecorder(h.module) as rec:
        h.train(epochs=15, progress_bar=False, seed=0)
    assert rec.calls == 150 and all(e and e[0].shape == (200, 2) for e in rec.extras)
    assert h.module.scale.item() == pytest.approx(1.0, abs=0.05)
    assert h.train_losses[-1] < h.train_losses[0]
    # a SCORE_BASED model with neither an SDE nor a loss cannot train
    g = NNHandler(ScoreMLP, model_type="score_based", hidden=8)
    g.set_optimizer(torch.optim.SGD, lr=0.1)
    g.set_train_loader(TensorDataset(torch.randn(8, 2)), batch_size=4)
    with pytest.raises(RuntimeError, match=r"call set_sde\(VPSDE, \.\.\.\) before train\(\), or set_loss_fn"):
        g.train(epochs=1, progress_bar=False)


def test_a_user_loss_overrides_score_matching():
    x = M + S * torch.randn(40, 2, generator=torch.Generator().manual_seed(0))
    c = torch.ones(40, 1)
    seen = []

    def loss_with_sde(model, x, *extra, sde):
        seen.append((model, x, extra, sde))
        return (model.scale - 3.0) ** 2 + 0.0 * x.sum()

    h = exact_handler(VPSDE)
    h.set_optimizer(torch.optim.SGD, lr=0.2)
    h.set_loss_fn(loss_with_sde)
    h.set_train_loader(TensorDataset(x, c), batch_size=40)
    h.train(epochs=30, progress_bar=False)
    assert h.module.scale.item() == pytest.approx(3.0, abs=1e-3)  # the user loss, not DSM
    model, xb, extra, sde = seen[0]
    assert model is h.model and torch.equal(xb, x) and torch.equal(extra[0], c) and sde is h.sde

    def loss_without_sde(model, x):  # gets no sde= when it does not take it
        seen.append(("plain", x))
        return (model.scale - 2.0) ** 2

    h.set_loss_fn(loss_without_sde)
    h.set_train_loader(TensorDataset(x), batch_size=40)
    h.train(epochs=1, progress_bar=False)
    assert seen[-1][0] == "plain"


def test_generative_model_trains_on_its_inputs_as_targets():
    seen = []

    def mse(output, target):
        seen.append(target)
        return nn.functional.mse_loss(output, target)

    torch.manual_seed(0)
    data = torch.randn(64, 6)
    h = NNHandler(nn.Linear, in_features=6, out_features=6, model_type="generative")
    h.set_optimizer(torch.optim.Adam, lr=5e-2)
    h.set_loss_fn(mse)
    h.set_train_loader(TensorDataset(data), batch_size=64)
    h.train(epochs=30, progress_bar=False)
    assert torch.equal(seen[0], data) and h.train_losses[-1] < 0.5 * h.train_losses[0]


# ---------------------------------------------------------------- custom samplers and checkpoints
def test_custom_sampler_gets_the_handler():
    assert nnh.Sampler is Sampler and issubclass(SDESampler, Sampler)
    h = exact_handler(VPSDE)
    with pytest.raises(RuntimeError, match=r"no sampler: call set_sampler\(SamplerClass"):
        h.get_samples(3)
    with pytest.raises(TypeError, match="SDESampler cannot be built with"):
        h.set_sampler(SDESampler, width=3)
    with pytest.raises(TypeError, match="is not a sampler"):
        h.sampler = object()
    h.set_sampler(SDESampler, dim=2, steps=100)
    assert h.sampler.handler is h
    h.seed = 0
    x = h.get_samples(2000)
    assert x.shape == (2000, 2) and torch.allclose(x.mean(0), M, atol=0.06)
    assert h.get_samples(5, device="cpu").device == torch.device("cpu") and h.sampler.drawn == 2005
    with pytest.raises(NotImplementedError, match="must implement sample"):
        Sampler().sample(3)


def test_sde_and_sampler_are_saved_and_restored(tmp_path):
    h = exact_handler(VESDE, sde_kwargs={"sigma_min": 0.02, "sigma_max": 20.0})
    h.set_sampler(SDESampler, dim=2, steps=30)
    h.seed = 0
    h.get_samples(7)
    path = tmp_path / "score.pth"
    h.save(str(path))
    # the checkpoint records both by import path + plain config, loadable with weights_only
    raw = torch.load(path, weights_only=True)
    assert raw["sde"]["class"] == "nnh.generative.sde.VESDE"
    assert raw["sampler"]["class"] == "gen_models.SDESampler"
    assert raw["sampler"]["config"] == {"dim": 2, "steps": 30} and raw["sampler"]["state"] == {"drawn": 7}
    g = NNHandler.load(str(path))
    assert isinstance(g.sde, VESDE) and g.sde.config() == h.sde.config()
    assert isinstance(g.sampler, SDESampler) and g.sampler.config() == {"dim": 2, "steps": 30}
    assert g.sampler.drawn == 7
    t, x = torch.full((3,), 0.4), torch.randn(3, 2)
    with torch.no_grad():
        assert torch.equal(g.score(t, x), h.score(t, x))
    assert g.sampler.handler is g and g.get_samples(4).shape == (4, 2) and g.sampler.drawn == 11
    skipped = NNHandler.load(str(path), skip_sampler_sde=True)
    assert skipped.sde is None and skipped.sampler is None


def test_a_loaded_sampler_is_attached_to_the_loaded_handler(tmp_path):
    h = exact_handler(VPSDE)
    h.set_sampler(SDESampler, dim=2, steps=10)
    h.save(str(tmp_path / "s.pth"))
    g = NNHandler.load(str(tmp_path / "s.pth"))
    assert g.sampler.handler is g
    assert g.get_samples(4).shape == (4, 2)


# ---------------------------------------------------------------- a trained score model
def test_a_trained_score_model_samples_the_mixture_modes_and_scores_held_out_data(capsys):
    # 4 modes on a circle of radius 2, std 0.15; 512 training points; VPSDE; Adam; EMA
    t_start = time.perf_counter()
    torch.manual_seed(0)
    h = NNHandler(ScoreMLP, model_type="score_based", hidden=128)
    h.set_sde(VPSDE)
    h.set_optimizer(torch.optim.Adam, lr=3e-3)
    h.set_train_loader(TensorDataset(mixture_data(512, seed=1)), batch_size=128, shuffle=True)
    untrained = NNHandler(ScoreMLP, model_type="score_based", hidden=128)
    untrained.set_sde(VPSDE)
    h.train(epochs=400, ema_decay=0.99, progress_bar=False, seed=0)
    t_train = time.perf_counter() - t_start
    assert h.train_losses[-1] < 0.5 * h.train_losses[0]

    h.seed = 100
    x = h.sample((1000, 2), steps=300, bar=False)
    near, share = fraction_near_modes(x, within=0.5)
    assert near >= 0.8 and min(share) >= 0.1, (near, share)

    held_out = mixture_data(256, seed=1000)
    h.seed = 3
    ll = h.log_likelihood(held_out, ode_steps=100, method="Heun", n_cotangent_vectors=4).mean().item()
    untrained.seed = 3
    ll_untrained = untrained.log_likelihood(held_out, ode_steps=100, method="Heun",
                                            n_cotangent_vectors=4).mean().item()
    ll_prior = h.sde.prior_log_prob(held_out).mean().item()
    ll_true = mixture_log_density(held_out).mean().item()
    elapsed = time.perf_counter() - t_start
    with capsys.disabled():
        print(f"\n[mixture] train {t_train:.1f}s, total {elapsed:.1f}s; on modes {near:.3f}, shares "
              f"{[round(s, 3) for s in share]}; held-out log-likelihood {ll:.3f} nats (true density "
              f"{ll_true:.3f}, prior {ll_prior:.3f}, untrained model {ll_untrained:.3f})")
    assert math.isfinite(ll)
    assert ll > ll_prior + 2.0 and ll > ll_untrained + 2.0
    assert abs(ll - ll_true) < 0.3  # the estimate is near the true mean log density


def test_the_generative_demo_runs_quickly(tmp_path, monkeypatch):
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "examples"))
    from generative_demo import run_generative_demo

    result = run_generative_demo(tmp_path, quick=True)
    assert Path(result["checkpoint"]).is_file() and Path(result["plot"]).stat().st_size > 10_000
    assert result["fraction_on_modes"] >= 0.8 and min(result["per_mode_share"]) >= 0.1
    assert result["reloaded_samples_identical"] is True
    assert result["prior_log_density_nats"] + 2.0 < result["log_likelihood_nats"] < result["true_log_density_nats"] + 0.3
