"""Issue 10's sampler goals against exact ground truth: the 4-Gaussian 2-D mixture.

Data: weights 0.4/0.3/0.2/0.1, means (2, 0), (-2, 0), (0, 2), (0, -2), std 0.15. The model
is ``MixtureExactScore``: sigma(t) times the exact score of the mixture perturbed by the
SDE's kernel (closed form), so every error below is the sampler's own. 20 000 samples:
Monte-Carlo SE of a weight <= 0.0035, of the 0.1-mode's std ~1.1 %.

Measured on this machine (seed 0, float32, see docs/generative.md):
VP ode Heun 50: weights 0.008, std 2.6 %; pc 200: 0.004, 2.4 %; ode Heun edm 20: 0.011, 2.9 %.
VE ode Heun 50: weights 0.010, std 2.5 %; pc 200: 0.003, 2.4 %; ode Heun edm 20: 0.012, 11.5 %,\nRK4 edm 10 (40 calls): 0.009, 4.1 %.
"""

from __future__ import annotations

import pytest
import torch
from gen_models import MixtureExactScore, mixture_errors

from nnh import NNHandler
from nnh.generative import VESDE, VPSDE

torch.set_num_threads(1)
N = 20_000


def mixture_handler(sde_class) -> NNHandler:
    h = NNHandler(MixtureExactScore, sde_config=sde_class().config(), model_type="score_based")
    h.set_sde(sde_class)
    return h


def sample_and_count(h: NNHandler, **options) -> tuple[torch.Tensor, int]:
    h.seed = 0
    calls = []
    hook = h.module.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        x = h.sample((N, 2), bar=False, **options)
    finally:
        hook.remove()
    return x, len(calls)


@pytest.mark.parametrize("sde_class", [VPSDE, VESDE], ids=["VP", "VE"])
def test_ode_heun_50_steps_meets_the_goal(sde_class):
    h = mixture_handler(sde_class)
    x, calls = sample_and_count(h, steps=50, method="ode", ode_method="Heun")
    w_err, s_err = mixture_errors(x, h.sde)
    assert calls <= 100
    assert w_err <= 0.02 and s_err <= 0.06, (w_err, s_err)


@pytest.mark.parametrize("sde_class", [VPSDE, VESDE], ids=["VP", "VE"])
def test_pc_200_steps_one_corrector_meets_the_goal(sde_class):
    h = mixture_handler(sde_class)
    x, calls = sample_and_count(h, steps=200, method="pc", corrector_steps=1)
    w_err, s_err = mixture_errors(x, h.sde)
    assert calls == 400
    assert w_err <= 0.025 and s_err <= 0.10, (w_err, s_err)


@pytest.mark.parametrize(("sde_class", "ode_method", "steps"),
                         [(VPSDE, "dpm++2m", 40), (VESDE, "RK4", 10), (VESDE, "Heun", 20)],
                         ids=["VP-dpm++2m", "VE-RK4", "VE-Heun"])
def test_edm_grid_ode_reaches_the_moonshot_in_40_calls(sde_class, ode_method, steps):
    # moonshot: weights within 0.02 and std within 5 % in <= 40 model calls (EM needs ~1000).
    # Since the ODE steps are taken in the noise level (issue 20): VE Heun 3.2 % (was 11.5 %),
    # VE RK4 2.8 %, VP dpm++2m 4.6 %. VP Heun-20 measures 5.5 % (was 2.9 % in t) although its
    # flow error fell from 0.134 to 0.090 (benchmarks/bench_generative.py --flow).
    h = mixture_handler(sde_class)
    options = {"method": "ode", "ode_method": ode_method, "steps": steps}
    x, calls = sample_and_count(h, time_grid="edm", **options)
    w_err, s_err = mixture_errors(x, h.sde)
    assert calls <= 40
    assert w_err <= 0.02 and s_err <= 0.05, (w_err, s_err)
    if sde_class is VPSDE:  # on VP the uniform grid at the same cost is far off (11.6 %);
        y, _ = sample_and_count(h, **options)  # on VE RK4 does as well on it (3.6 %)
        assert mixture_errors(y, h.sde)[1] > 2 * s_err
