"""The likelihood's augmented probability-flow ODE in the noise level ``(x_hat = x / mu, lambda = sigma / mu)``.

In these variables (Karras et al. 2022) the flow reads ``dx_hat / dlambda = G = -lambda mu s(t, mu x_hat)``
and its trajectories are nearly straight for every SDE; the log-density follows
``d log p_hat / dlambda = -div_x_hat G``, with ``p_hat_lambda(x_hat) = p_t(mu x_hat) mu^D``, so

``log p_t0(x) = log p_T(x_T) + D log(mu(T) / mu(t0)) + int_{lambda(t0)}^{lambda(T)} div G dlambda``.

The adaptive likelihood integrates this field with one ``lambda`` per sample, so it needs the
time ``t(lambda)`` of any level: closed form for :class:`VESDE`, :class:`VPSDE` and
:class:`SubVPSDE`, bisection (on the device, float64) for any other SDE.
"""

from __future__ import annotations

import math

import torch

from nnh.generative.divergence import value_and_divergence
from nnh.generative.sde import SDE, VESDE, VPSDE, SubVPSDE, expand_time
from nnh.generative.steps import ScoreFn

__all__ = ["level_field", "noise_level_of", "time_of_level"]


def noise_level_of(sde: SDE, t: torch.Tensor) -> torch.Tensor:
    """``lambda(t) = sigma(t) / mu(t)`` in ``t``'s dtype.

    Example:
        >>> round(noise_level_of(VESDE(), torch.tensor(1.0)).item(), 3)
        50.0
    """
    return sde.sigma(t) / sde.mu(t)


def _time_of_integrated_beta(sde: VPSDE | SubVPSDE, big_b: torch.Tensor) -> torch.Tensor:
    """The ``t`` with ``B(t) = beta_min t + (beta_max - beta_min) t^2 / (2T) = big_b`` (stable root)."""
    a = 0.5 * (sde.beta_max - sde.beta_min) / sde.T
    b = sde.beta_min
    return 2 * big_b / (b + torch.sqrt(b * b + 4 * a * big_b))


def time_of_level(sde: SDE, level: torch.Tensor) -> torch.Tensor:
    """The time ``t`` in ``[0, T]`` where ``lambda(t) = level`` (elementwise; float64 inside).

    Example:
        >>> sde = VPSDE()
        >>> t = time_of_level(sde, noise_level_of(sde, torch.tensor([0.1, 0.5, 1.0], dtype=torch.float64)))
        >>> [round(v, 6) for v in t.tolist()]
        [0.1, 0.5, 1.0]
    """
    lam = level.double()
    kind = type(sde)
    if kind is VESDE:
        t = sde.T * torch.log(lam / sde.sigma_min) / math.log(sde.sigma_max / sde.sigma_min)
    elif kind is VPSDE:  # lambda^2 = e^B - 1
        t = _time_of_integrated_beta(sde, torch.log1p(lam * lam))
    elif kind is SubVPSDE:  # lambda = e^(B/2) - e^(-B/2) = 2 sinh(B/2)
        t = _time_of_integrated_beta(sde, 2 * torch.asinh(lam / 2))
    else:
        lo, hi = torch.zeros_like(lam), torch.full_like(lam, float(sde.T))
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            above = noise_level_of(sde, mid) > lam
            hi, lo = torch.where(above, mid, hi), torch.where(above, lo, mid)
        t = 0.5 * (lo + hi)
    return t.clamp(0.0, float(sde.T)).to(level.dtype)


def level_field(sde: SDE, score_fn: ScoreFn, probes: torch.Tensor | None):  # -> AugmentedField
    """``(lambda [B], x_hat) -> (G, div G)``: the augmented field in the noise level, one ``score_fn`` call.

    ``probes`` ``[K, *x.shape]``: Hutchinson's estimate of ``div G`` (the same probes at
    every call: the field stays smooth, as an error-controlled solver needs); ``None``: the
    exact divergence (``D`` vector-Jacobian products sharing the one forward).

    Example:
        >>> f = level_field(VESDE(), lambda t, y: -y / VESDE().sigma(t)[:, None] ** 2, None)
        >>> g, div = f(torch.full((2,), 3.0), torch.ones(2, 2))  # a point mass at 0: G = x_hat / lambda
        >>> [round(v, 4) for v in g[0].tolist()], [round(v, 4) for v in div.tolist()]
        ([0.3333, 0.3333], [0.6667, 0.6667])
    """

    def field(lam: torch.Tensor, x_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = time_of_level(sde, lam)
        mu = expand_time(sde.mu(t), x_hat)
        scale = -expand_time(lam, x_hat) * mu

        def g(z: torch.Tensor) -> torch.Tensor:
            return scale * score_fn(t, mu * z)

        return value_and_divergence(g, x_hat, probes)

    return field
