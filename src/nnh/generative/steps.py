"""Pure one-step integrators: reverse-time SDE (Euler-Maruyama) and probability-flow ODE.

``score_fn(t, x)`` returns the score ``grad_x log p_t(x)`` (shape of ``x``); ``t`` is passed
through as given (the samplers pass a tensor of shape ``[B]``). Noise and probes come in as
arguments, so every function here is deterministic and leaves its inputs untouched.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from nnh.generative.divergence import value_and_divergence
from nnh.generative.sde import SDE, Time

__all__ = [
    "ODE_METHODS",
    "ScoreFn",
    "check_ode_method",
    "em_sde_step",
    "evaluations_per_step",
    "ode_likelihood_step",
    "probability_flow_drift",
]

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ODE_METHODS = ("Euler", "Heun", "RK4")
_EVALS_PER_STEP = {"Euler": 1, "Heun": 2, "RK4": 4}


def check_ode_method(method: str) -> str:
    """The canonical spelling of an ODE method name (case-insensitive), or a clear error.

    Example:
        >>> check_ode_method("heun")
        'Heun'
    """
    for name in ODE_METHODS:
        if isinstance(method, str) and method.lower() == name.lower():
            return name
    raise ValueError(f"unknown ODE method {method!r}; use one of {ODE_METHODS}")


def evaluations_per_step(method: str) -> int:
    """Drift (and score) evaluations one step of ``method`` makes: Euler 1, Heun 2, RK4 4.

    Example:
        >>> evaluations_per_step("RK4")
        4
    """
    return _EVALS_PER_STEP[check_ode_method(method)]


def _check_dt(dt: float | torch.Tensor) -> None:
    if not isinstance(dt, torch.Tensor) and not (math.isfinite(dt) and dt > 0):
        raise ValueError(f"dt must be a finite number > 0, got {dt!r}")


def em_sde_step(
    sde: SDE,
    score_fn: ScoreFn,
    t: Time,
    x: torch.Tensor,
    dt: float | torch.Tensor,
    noise: torch.Tensor,
    *,
    guidance_fn: ScoreFn | None = None,
    guidance_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Euler-Maruyama step of the reverse-time SDE from ``t`` to ``t - dt`` (``dt > 0``).

    ``dx = [f(t, x) - g(t)^2 (score + guidance_factor * guidance)] dt + g(t) dW`` in reverse
    time, i.e. ``x_mean = x - [f - g^2 s] dt`` and ``x_next = x_mean + g sqrt(dt) noise``.
    ``score_fn`` (and ``guidance_fn`` when given) is called exactly once.

    Returns ``(x_next, x_mean)``; ``x_mean`` is the noise-free part (used for the last step).

    Example:
        >>> from nnh.generative.sde import VPSDE
        >>> sde, x = VPSDE(), torch.randn(4, 2)
        >>> t = torch.full((4,), 0.5)
        >>> x_next, x_mean = em_sde_step(sde, lambda t, x: -x, t, x, 0.01, torch.zeros_like(x))
        >>> torch.equal(x_next, x_mean)
        True
    """
    _check_dt(dt)
    if noise.shape != x.shape:
        raise ValueError(f"noise must be shaped like x {tuple(x.shape)}, got {tuple(noise.shape)}")
    score = score_fn(t, x)
    if guidance_fn is not None:
        score = score + guidance_factor * guidance_fn(t, x)
    g = sde.diffusion(t, x)
    x_mean = x - (sde.drift(t, x) - g * g * score) * dt
    sqrt_dt = dt.sqrt() if isinstance(dt, torch.Tensor) else math.sqrt(dt)
    return x_mean + g * sqrt_dt * noise, x_mean


def probability_flow_drift(sde: SDE, score_fn: ScoreFn, t: Time, x: torch.Tensor) -> torch.Tensor:
    """Drift of the probability-flow ODE ``dx/dt = f(t, x) - g(t)^2 score(t, x) / 2``.

    Example:
        >>> from nnh.generative.sde import VESDE
        >>> probability_flow_drift(VESDE(), lambda t, x: torch.zeros_like(x), 0.5, torch.ones(2, 3)).abs().sum().item()
        0.0
    """
    g = sde.diffusion(t, x)
    return sde.drift(t, x) - 0.5 * g * g * score_fn(t, x)


def _drift_and_div(
    sde: SDE, score_fn: ScoreFn, t: Time, x: torch.Tensor, probes: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    return value_and_divergence(lambda y: probability_flow_drift(sde, score_fn, t, y), x, probes)


def ode_likelihood_step(
    sde: SDE,
    score_fn: ScoreFn,
    t: Time,
    x: torch.Tensor,
    dt: float | torch.Tensor,
    probes: torch.Tensor | None,
    method: str = "Euler",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the augmented probability-flow ODE forward in time, ``t -> t + dt``.

    The augmented state is ``(x, l)`` with ``dx/dt = F(t, x)`` (:func:`probability_flow_drift`)
    and ``dl/dt = div F(t, x)`` (Hutchinson with ``probes`` ``[K, *x.shape]``, exact trace when
    ``probes`` is ``None``). Along a trajectory ``log p_t0(x_t0) = log p_t1(x_t1) + int div F``,
    so ``delta_logp`` (shape ``[B]``) is the step's contribution to that integral: add all of
    them to the prior log density at the end. Pass the same probes at every step.

    ``method``: ``"Euler"`` (1 drift+divergence evaluation, 1st order), ``"Heun"`` (2, 2nd
    order), ``"RK4"`` (4, 4th order). Each evaluation calls ``score_fn`` once with all probes
    batched in one vector-Jacobian product.

    Example:
        >>> from nnh.generative.sde import VPSDE
        >>> x, v = torch.randn(3, 2), torch.ones(1, 3, 2)
        >>> x1, dl = ode_likelihood_step(VPSDE(), lambda t, y: -y, 0.5, x, 0.01, v, "Heun")
        >>> x1.shape, dl.shape
        (torch.Size([3, 2]), torch.Size([3]))
    """
    _check_dt(dt)
    method = check_ode_method(method)
    t0 = t if isinstance(t, torch.Tensor) else float(t)
    f1, d1 = _drift_and_div(sde, score_fn, t0, x, probes)
    if method == "Euler":
        return x + dt * f1, dt * d1
    if method == "Heun":
        f2, d2 = _drift_and_div(sde, score_fn, t0 + dt, x + dt * f1, probes)
        return x + 0.5 * dt * (f1 + f2), 0.5 * dt * (d1 + d2)
    half = 0.5 * dt
    f2, d2 = _drift_and_div(sde, score_fn, t0 + half, x + half * f1, probes)
    f3, d3 = _drift_and_div(sde, score_fn, t0 + half, x + half * f2, probes)
    f4, d4 = _drift_and_div(sde, score_fn, t0 + dt, x + dt * f3, probes)
    sixth = dt / 6.0
    return x + sixth * (f1 + 2 * f2 + 2 * f3 + f4), sixth * (d1 + 2 * d2 + 2 * d3 + d4)
