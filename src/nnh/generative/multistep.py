"""Pure steps of the multistep probability-flow solvers DPM-Solver++(2M) and (3M) (Lu et al. 2022).

Data-prediction form in the noise level ``lambda = sigma / mu``: with the denoiser
``D = (x + sigma^2 s) / mu`` (Tweedie) and ``h = log(lambda_i / lambda_{i+1})``, the step from
``t_i`` to ``t_{i+1}`` is

    x_{i+1} = (sigma_{i+1} / sigma_i) x_i + mu_{i+1} (1 - e^{-h}) D_eff

with ``D_eff = D_i`` (first order), ``D_i + (D_i - D_{i-1}) / (2 r)`` (2M, ``r = h_{i-1} / h``)
or the third-order exponential-integrator correction (3M). The 3M correction is
``phi2 d1 - phi3 d2`` with ``d1 ~ h D'`` and ``d2 ~ h^2 D''`` from the backward differences;
k-diffusion's ``sample_dpmpp_3m_sde`` (and this module's first draft) take ``d2`` half as
large, which measured a global order of 2.3, not 3, on the warm-started correlated Gaussian
(property_tests/test_multistep_laws.py); with ``d2 = 2 (d1_0 - d1_1) / (r0 + r1)`` it is 3.0. One score call per step: earlier denoised values
come in through :class:`MultistepHistory` and a new history goes out, so each call is a pure
function of its arguments. The first steps use the orders the history allows.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from nnh.generative.sde import SDE
from nnh.generative.steps import ScoreFn

__all__ = [
    "LOW_ORDER_FINAL_STEPS",
    "MULTISTEP_METHODS",
    "MultistepHistory",
    "dpm_solver_pp_step",
    "multistep_order",
    "step_order",
]

MULTISTEP_METHODS = {"dpm++2m": 2, "dpm++3m": 3, "unipc": 2}
#: The sampler takes the last this many steps of a second-order multistep method
#: (``"dpm++2m"``, ``"unipc"``) at first order (see :func:`step_order`). On the edm grid the
#: last steps are the longest in ``log lambda`` (h ~ 0.7-2 at 20 steps) and follow shorter
#: ones, so the multistep extrapolation of ``D`` reaches far outside the points it was fitted
#: on; the first-order (exponential Euler) step only contracts each mode towards its denoised
#: value. Measured on the exact 4-mode mixture at 20 calls, seeds 0-2
#: (benchmarks/bench_generative.py --flow): DPM-Solver++(2M)'s within-mode std error
#: 4.4-5.3 % -> 1.3-1.8 % (VE) and 6.1-6.9 % -> 1.1-1.9 % (VP), flow error within 1 %.
#: ``"dpm++3m"`` keeps its orders to the end: there the same rule measured worse (VP std error
#: 18 % -> 58 % at 20 calls).
LOW_ORDER_FINAL_STEPS = 2


class MultistepHistory(NamedTuple):
    """Denoised values and ``log lambda`` of the latest steps, newest first (empty at the start).

    Example:
        >>> MultistepHistory().denoised
        ()
    """

    denoised: tuple[torch.Tensor, ...] = ()
    log_levels: tuple[float, ...] = ()


def multistep_order(method: str) -> int:
    """The order of a multistep method name (case-insensitive), or a ``ValueError`` naming ``ode_method``.

    Example:
        >>> multistep_order("DPM++2M")
        2
    """
    key = method.lower() if isinstance(method, str) else method
    if key not in MULTISTEP_METHODS:
        raise ValueError(
            f"ode_method={method!r}: the multistep methods are {tuple(MULTISTEP_METHODS)}"
        )
    return MULTISTEP_METHODS[key]


def step_order(order: int, index: int, steps: int) -> int:
    """The order the sampler asks for at step ``index`` of ``steps``: ``order``, but 1 on the last
    :data:`LOW_ORDER_FINAL_STEPS` steps when ``order`` is 2 (the step functions lower it
    further while their history is short).

    Example:
        >>> [step_order(2, i, 5) for i in range(5)], step_order(3, 4, 5)
        ([2, 2, 2, 1, 1], 3)
    """
    return 1 if order == 2 and index >= steps - LOW_ORDER_FINAL_STEPS else order


def _level(sde: SDE, t: float) -> tuple[float, float, float]:
    tt = torch.tensor(float(t), dtype=torch.float64)
    mu, sigma = float(sde.mu(tt)), float(sde.sigma(tt))
    return mu, sigma, sigma / mu


class StepStart(NamedTuple):
    """What every one-call multistep step computes first: the levels at both ends and the
    denoised value at ``t`` (the step's one model call)."""

    mu0: float
    sigma0: float
    lam0: float
    mu1: float
    sigma1: float
    lam1: float
    denoised: torch.Tensor
    log_lam: float


def step_start(sde: SDE, score_fn: ScoreFn, t: float, t_next: float, x: torch.Tensor) -> StepStart:
    """Check the step's times, then call ``score_fn`` once at ``t`` for the denoised value
    ``(x + sigma^2 s) / mu``; shared by DPM-Solver++ and UniPC.

    Example:
        >>> from nnh.generative.sde import VESDE
        >>> sde = VESDE()
        >>> start = step_start(sde, lambda t, y: -y / sde.sigma(t).reshape(-1, 1) ** 2, 1.0, 0.5,
        ...                    torch.ones(2, 3))
        >>> start.denoised.abs().max().item() < 1e-6, start.lam1 < start.lam0
        (True, True)
    """
    if not (math.isfinite(t) and math.isfinite(t_next) and t_next < t):
        raise ValueError(f"need finite times t_next < t, got t={t!r}, t_next={t_next!r}")
    mu0, sigma0, lam0 = _level(sde, t)
    mu1, sigma1, lam1 = _level(sde, t_next)
    if not lam0 > 0:
        raise ValueError(f"t={t} gives lambda(t)=sigma/mu={lam0}: need > 0 to step from it")
    tt = torch.full((x.shape[0],), float(t), dtype=x.dtype, device=x.device)
    denoised = (x + sigma0 * sigma0 * score_fn(tt, x)) / mu0
    return StepStart(mu0, sigma0, lam0, mu1, sigma1, lam1, denoised, math.log(lam0))


def dpm_solver_pp_step(
    sde: SDE,
    score_fn: ScoreFn,
    t: float,
    t_next: float,
    x: torch.Tensor,
    history: MultistepHistory | None = None,
    order: int = 2,
) -> tuple[torch.Tensor, MultistepHistory]:
    """One DPM-Solver++ step from time ``t`` to ``t_next < t``; returns ``(x_next, new_history)``.

    Uses order ``min(order, 1 + len(history.denoised))`` (1, 2 or 3). Calls ``score_fn`` once,
    with ``t`` as a tensor of shape ``[B]``. When ``lambda(t_next) = 0`` the step returns the
    denoised value (the ODE's end). Exact in one first-order step when the data are a point
    (the denoiser is then constant).

    Example:
        >>> from nnh.generative.sde import VESDE
        >>> sde = VESDE(); x = torch.ones(2, 3)
        >>> score = lambda t, y: (0.5 - y) / sde.sigma(t).reshape(-1, 1) ** 2  # data = 0.5
        >>> y, h = dpm_solver_pp_step(sde, score, 1.0, 0.5, x)
        >>> torch.allclose(y, 0.5 + (x - 0.5) * float(sde.sigma(0.5) / sde.sigma(1.0))), len(h.denoised)
        (True, 1)
    """
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
    history = MultistepHistory() if history is None else history
    _, sigma0, _, mu1, sigma1, lam1, denoised, log_lam = step_start(sde, score_fn, t, t_next, x)
    if lam1 == 0:
        return denoised, _push(history, denoised, log_lam)
    h = log_lam - math.log(lam1)
    use = min(order, 1 + len(history.denoised))
    phi1 = -math.expm1(-h)  # 1 - e^{-h}
    x_next = (sigma1 / sigma0) * x + mu1 * phi1 * denoised
    if use >= 2:
        h1 = history.log_levels[0] - log_lam
        r0 = h1 / h
        d1_0 = (denoised - history.denoised[0]) / r0
        if use == 2:
            x_next = x_next + mu1 * (phi1 / 2) * d1_0
        else:
            h2 = history.log_levels[1] - history.log_levels[0]
            r1 = h2 / h
            d1_1 = (history.denoised[0] - history.denoised[1]) / r1
            d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
            d2 = 2 * (d1_0 - d1_1) / (r0 + r1)
            phi2 = 1 - phi1 / h
            phi3 = phi2 / h - 0.5
            x_next = x_next + mu1 * (phi2 * d1 - phi3 * d2)
    return x_next, _push(history, denoised, log_lam)


def _push(history: MultistepHistory, denoised: torch.Tensor, log_lam: float) -> MultistepHistory:
    return MultistepHistory((denoised, *history.denoised[:1]), (log_lam, *history.log_levels[:1]))
