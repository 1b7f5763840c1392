"""Pure one-step functions of the new samplers, beside :func:`~nnh.generative.steps.em_sde_step`.

- :func:`langevin_corrector_step`: one Langevin MCMC step at fixed ``t`` (the corrector of
  Song et al. 2021's predictor-corrector sampler).
- :func:`probability_flow_step`: one Euler/Heun/RK4 step of the probability-flow ODE
  backwards in time (the deterministic sampler).
- :func:`tweedie_denoise`: the posterior mean ``E[x_0 | x_t]`` from the score.

``score_fn(t, x)`` returns the score (guidance already added, if any); noise comes in as an
argument, so each function is deterministic and leaves its inputs untouched.
"""

from __future__ import annotations

import torch

from nnh.generative.sde import SDE, Time, as_time_tensor, expand_time
from nnh.generative.steps import ScoreFn, _check_dt, check_ode_method, probability_flow_drift

__all__ = ["langevin_corrector_step", "probability_flow_step", "tweedie_denoise"]


def langevin_corrector_step(
    score_fn: ScoreFn, t: Time, x: torch.Tensor, noise: torch.Tensor, snr: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Langevin step ``x + eps s + sqrt(2 eps) z`` at fixed ``t``; returns ``(x_next, x_mean)``.

    The step size follows Song et al. (2021): ``eps = 2 (snr ||z|| / ||s||)^2`` with the
    norms averaged over the batch (``||.||`` over each sample's entries), so the noise added
    is ``snr`` times the drift's size (zero noise gives a zero step). Calls ``score_fn`` once;
    no host sync.

    Example:
        >>> x, z = torch.ones(4, 2), torch.ones(4, 2)
        >>> x_next, x_mean = langevin_corrector_step(lambda t, y: -y, 0.5, x, z, 0.1)
        >>> round(x_mean[0, 0].item(), 4), round(x_next[0, 0].item(), 4)  # eps = 0.02
        (0.98, 1.18)
    """
    if noise.shape != x.shape:
        raise ValueError(f"noise must be shaped like x {tuple(x.shape)}, got {tuple(noise.shape)}")
    if not (isinstance(snr, (int, float)) and snr > 0):
        raise ValueError(f"snr must be a number > 0, got {snr!r}")
    score = score_fn(t, x)
    batch = x.shape[0]
    grad_norm = score.reshape(batch, -1).norm(dim=-1).mean()
    noise_norm = noise.reshape(batch, -1).norm(dim=-1).mean()
    step = 2 * (snr * noise_norm / grad_norm) ** 2
    x_mean = x + step * score
    return x_mean + torch.sqrt(2 * step) * noise, x_mean


def probability_flow_step(
    sde: SDE, score_fn: ScoreFn, t: Time, x: torch.Tensor, dt: float, method: str = "Heun"
) -> torch.Tensor:
    """One step of the probability-flow ODE ``dx/dt = f - g^2 s / 2`` from ``t`` to ``t - dt`` (``dt > 0``).

    ``method``: ``"Euler"`` (1 score call), ``"Heun"`` (2: Euler predictor, trapezoidal
    corrector) or ``"RK4"`` (4). Deterministic: the same ``x`` gives the same result.

    Example:
        >>> from nnh.generative.sde import VPSDE
        >>> x = torch.randn(3, 2)
        >>> probability_flow_step(VPSDE(), lambda t, y: -y, torch.full((3,), 0.5), x, 0.01).shape
        torch.Size([3, 2])
    """
    _check_dt(dt)
    method = check_ode_method(method)
    t0 = t if isinstance(t, torch.Tensor) else float(t)

    def drift(tt: Time, y: torch.Tensor) -> torch.Tensor:
        return probability_flow_drift(sde, score_fn, tt, y)

    f1 = drift(t0, x)
    if method == "Euler":
        return x - dt * f1
    if method == "Heun":
        f2 = drift(t0 - dt, x - dt * f1)
        return x - 0.5 * dt * (f1 + f2)
    half = 0.5 * dt
    f2 = drift(t0 - half, x - half * f1)
    f3 = drift(t0 - half, x - half * f2)
    f4 = drift(t0 - dt, x - dt * f3)
    return x - (dt / 6.0) * (f1 + 2 * f2 + 2 * f3 + f4)


def tweedie_denoise(sde: SDE, score_fn: ScoreFn, t: Time, x: torch.Tensor) -> torch.Tensor:
    """Tweedie's posterior mean ``E[x_0 | x_t = x] = (x + sigma(t)^2 s(t, x)) / mu(t)``.

    For VE (``mu = 1``) this is ``x + sigma^2 s``; one ``score_fn`` call.

    Example:
        >>> from nnh.generative.sde import VESDE
        >>> x = torch.ones(2, 3)  # the exact score of N(0, sigma^2 I) sends x to 0
        >>> sde = VESDE(); s = lambda t, y: -y / sde.sigma(t).reshape(-1, 1) ** 2
        >>> tweedie_denoise(sde, s, torch.full((2,), 0.3), x).abs().max().item() < 1e-6
        True
    """
    tt = as_time_tensor(t, x)
    sigma, mu = expand_time(sde.sigma(tt), x), expand_time(sde.mu(tt), x)
    return (x + sigma * sigma * score_fn(t, x)) / mu
