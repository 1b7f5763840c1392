"""Pure one-step functions of the new samplers, beside :func:`~nnh.generative.steps.em_sde_step`.

- :func:`langevin_corrector_step`: one Langevin MCMC step at fixed ``t`` (the corrector of
  Song et al. 2021's predictor-corrector sampler), its step size per sample from ``sigma(t)``.
- :func:`probability_flow_step`: one Euler/Heun/RK4 step of the probability-flow ODE
  backwards in time (the deterministic sampler).
- :func:`tweedie_denoise`: the posterior mean ``E[x_0 | x_t]`` from the score.

``score_fn(t, x)`` returns the score (guidance already added, if any); noise comes in as an
argument, so each function is deterministic and leaves its inputs untouched.
"""

from __future__ import annotations

import math

import torch

from nnh.generative.sde import SDE, Time, as_time_tensor, expand_time
from nnh.generative.steps import ScoreFn, _check_dt, check_ode_method

__all__ = ["langevin_corrector_step", "probability_flow_step", "tweedie_denoise"]


def langevin_corrector_step(
    sde: SDE,
    score_fn: ScoreFn,
    t: Time,
    x: torch.Tensor,
    noise: torch.Tensor,
    snr: float,
    dt: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Langevin step ``x + eps s + sqrt(2 eps) z`` at fixed ``t``; returns ``(x_next, x_mean)``.

    The step size is Song et al.'s (2021) ``eps = 2 alpha (snr ||z|| / ||s||)^2`` with both
    norms replaced by their expectations under the marginal ``p_t``, so it is computed per
    sample from ``t`` alone: ``E||z||^2 = d`` and ``E||s||^2 <= d / sigma(t)^2`` (``x_t`` is
    ``mu x_0`` plus ``N(0, sigma^2 I)``, and adding independent noise cannot raise the Fisher
    information above the noise's own), giving ``eps_i = 2 alpha_i snr^2 sigma(t_i)^2``.
    ``snr`` stays the drift-to-noise ratio ``||eps s|| / ||sqrt(2 eps) z||`` of a sample
    whose score has that largest expected size. Why not the sample's own norms: a step that
    depends on ``x`` changes the chain's stationary law from ``p_t`` to ``p_t / eps(x)``
    (a first-order bias), and ``||z_i|| / ||s_i||`` is heavy-tailed in low dimension; the
    batch means of the norms make a sample's step depend on the other samples. With this
    rule a step on the exact score of Gaussian data of variance ``v`` widens its stationary
    std by at most ``snr^2 / 2`` (``eps <= 2 snr^2 v``). ``dt``: the predictor step that
    follows; with it ``alpha = mu(t)^2 / mu(t - dt)^2`` (Song et al.'s ``alpha_i = 1 -
    beta_i`` for VP, 1 for VE), without it ``alpha = 1``. One ``score_fn`` call; no host sync.

    Example:
        >>> from nnh.generative.sde import VESDE
        >>> sde = VESDE(sigma_min=0.01, sigma_max=50.0)
        >>> t = torch.full((4,), 0.0)  # sigma(0) = 0.01, so eps = 2 * 0.1^2 * 0.01^2 = 2e-6
        >>> x, z = torch.ones(4, 2), torch.ones(4, 2)
        >>> x_next, x_mean = langevin_corrector_step(sde, lambda t, y: -y, t, x, z, 0.1)
        >>> round(x_mean[0, 0].item(), 6), round(x_next[0, 0].item(), 6)
        (0.999998, 1.001998)
    """
    if noise.shape != x.shape:
        raise ValueError(f"noise must be shaped like x {tuple(x.shape)}, got {tuple(noise.shape)}")
    if isinstance(snr, bool) or not (
        isinstance(snr, (int, float)) and math.isfinite(snr) and snr > 0
    ):
        raise ValueError(f"snr must be a finite number > 0, got {snr!r}")
    if not isinstance(t, torch.Tensor) and not math.isfinite(t):
        raise ValueError(f"t must be a finite time, got {t!r}")
    tt = as_time_tensor(t, x)
    step = 2 * snr**2 * expand_time(sde.sigma(tt), x) ** 2
    if dt is not None:
        _check_dt(dt)
        step = step * (expand_time(sde.mu(tt), x) / expand_time(sde.mu(tt - dt), x)) ** 2
    score = score_fn(t, x)
    x_mean = x + step * score
    return x_mean + torch.sqrt(2 * step) * noise, x_mean


def _noise_scale(sde: SDE, t: Time, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mu(t), lambda(t) = sigma(t) / mu(t))`` shaped to broadcast against ``x``."""
    tt = as_time_tensor(t, x)
    mu = expand_time(sde.mu(tt), x)
    return mu, expand_time(sde.sigma(tt), x) / mu


def _invert_level(sde: SDE, level: torch.Tensor, lo: Time, hi: Time) -> torch.Tensor:
    """The time in ``[lo, hi]`` where ``lambda = level`` (bisection; ``lambda`` increases in ``t``)."""
    lo_t = torch.as_tensor(lo, dtype=torch.float64).expand_as(level).clone()
    hi_t = torch.as_tensor(hi, dtype=torch.float64).expand_as(level).clone()
    for _ in range(60):
        mid = 0.5 * (lo_t + hi_t)
        above = sde.sigma(mid) / sde.mu(mid) > level
        hi_t = torch.where(above, mid, hi_t)
        lo_t = torch.where(above, lo_t, mid)
    return 0.5 * (lo_t + hi_t)


def _cpu(t: Time) -> Time:
    return t.detach().double().cpu() if isinstance(t, torch.Tensor) else t


def probability_flow_step(
    sde: SDE, score_fn: ScoreFn, t: Time, x: torch.Tensor, dt: float, method: str = "Heun"
) -> torch.Tensor:
    """One step of the probability-flow ODE from ``t`` to ``t - dt`` (``dt > 0``), taken in the noise level.

    The step integrates the same ODE as ``dx/dt = f - g^2 s / 2`` but in the variables of
    Karras et al. (2022): ``x_hat = x / mu(t)`` against ``lambda = sigma(t) / mu(t)``, where
    it reads ``dx_hat / dlambda = -lambda mu s(t, x)`` and the trajectories are nearly
    straight (for VE, ``x_hat = x`` and ``lambda = sigma``). Any SDE works through its
    ``mu``/``sigma``. ``method``: ``"Euler"`` (1 score call), ``"Heun"`` (2: Euler predictor,
    trapezoidal corrector; its result is the predictor's, as in EDM, where ``lambda(t - dt) = 0``)
    or ``"RK4"`` (4; its midpoint is the time where ``lambda`` is halfway, found by
    bisection). Deterministic: the same ``x`` gives the same result.

    Example:
        >>> from nnh.generative.sde import VPSDE
        >>> x = torch.randn(3, 2)
        >>> probability_flow_step(VPSDE(), lambda t, y: -y, torch.full((3,), 0.5), x, 0.01).shape
        torch.Size([3, 2])
    """
    _check_dt(dt)
    method = check_ode_method(method)
    if not isinstance(t, torch.Tensor) and not math.isfinite(t):
        raise ValueError(f"t must be a finite time, got {t!r}")
    t0 = as_time_tensor(t, x) if isinstance(t, torch.Tensor) else float(t)
    t1 = t0 - dt
    mu0, lam0 = _noise_scale(sde, t0, x)
    mu1, lam1 = _noise_scale(sde, t1, x)

    def slope(tt: Time, lam: torch.Tensor, y_hat: torch.Tensor) -> torch.Tensor:
        mu = _noise_scale(sde, tt, y_hat)[0]
        return -lam * mu * score_fn(tt, mu * y_hat)

    x_hat = x / mu0
    h = lam1 - lam0
    d1 = slope(t0, lam0, x_hat)
    if method == "Euler":
        return mu1 * (x_hat + h * d1)
    if method == "Heun":
        x_pred = x_hat + h * d1
        heun = x_hat + 0.5 * h * (d1 + slope(t1, lam1, x_pred))
        return mu1 * torch.where(lam1 == 0, x_pred, heun)  # no host sync; 2 calls always
    lam_mid = 0.5 * (lam0 + lam1)
    level = (lam_mid.reshape(-1) if lam_mid.ndim else lam_mid).double()
    t_mid64 = _invert_level(sde, level.cpu(), _cpu(t1), _cpu(t0)).to(level.device)
    t_mid = t_mid64.to(x.dtype) if isinstance(t, torch.Tensor) else float(t_mid64)
    d2 = slope(t_mid, lam_mid, x_hat + 0.5 * h * d1)
    d3 = slope(t_mid, lam_mid, x_hat + 0.5 * h * d2)
    d4 = slope(t1, lam1, x_hat + h * d3)
    return mu1 * (x_hat + (h / 6.0) * (d1 + 2 * d2 + 2 * d3 + d4))


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
