"""Time grids for the samplers: ``steps + 1`` decreasing times from ``T`` to ``t_end``.

``"uniform"``: equal steps in ``t``. ``"edm"``: the rho = 7 schedule of Karras et al. (2022),
equal steps in ``lambda^(1/rho)`` where ``lambda(t) = sigma(t) / mu(t)`` is the noise level of
the rescaled process ``x / mu(t)``: this is ``sigma`` itself for VE and the EDM noise level
``sqrt(exp(B(t)) - 1)`` for VP (sub-VP likewise), so the same schedule serves every SDE.
The times come from inverting ``lambda`` by bisection (it increases with ``t``).
"""

from __future__ import annotations

import torch

from nnh.generative.sde import SDE

__all__ = ["TIME_GRIDS", "check_time_grid", "edm_grid", "noise_level", "time_grid", "uniform_grid"]

TIME_GRIDS = ("uniform", "edm")


def check_time_grid(name: str) -> str:
    """``name`` when it is a known grid, else a ``ValueError`` naming ``time_grid``.

    Example:
        >>> check_time_grid("edm")
        'edm'
    """
    if name not in TIME_GRIDS:
        raise ValueError(f"time_grid={name!r}: use one of {TIME_GRIDS}")
    return name


def noise_level(sde: SDE, t: torch.Tensor | float) -> torch.Tensor:
    """``lambda(t) = sigma(t) / mu(t)``: the noise-to-signal scale of the marginal at ``t``.

    Example:
        >>> from nnh.generative.sde import VESDE
        >>> round(noise_level(VESDE(), 1.0).item(), 3)
        50.0
    """
    tt = torch.as_tensor(t, dtype=torch.float64)
    return sde.sigma(tt) / sde.mu(tt)


def uniform_grid(sde: SDE, steps: int, t_end: float) -> list[float]:
    """``[T, T - dt, ..., t_end]`` with ``dt = (T - t_end) / steps`` (the EM sampler's times).

    Example:
        >>> from nnh.generative.sde import VPSDE
        >>> uniform_grid(VPSDE(), 4, 0.0)
        [1.0, 0.75, 0.5, 0.25, 0.0]
    """
    dt = (sde.T - t_end) / steps
    return [sde.T - i * dt for i in range(steps)] + [float(t_end)]


def _invert_noise_level(sde: SDE, levels: torch.Tensor, t_end: float) -> torch.Tensor:
    lo = torch.full_like(levels, float(t_end))
    hi = torch.full_like(levels, float(sde.T))
    for _ in range(80):  # 2^-80 of the window: exact to float64
        mid = 0.5 * (lo + hi)
        above = noise_level(sde, mid) > levels
        hi = torch.where(above, mid, hi)
        lo = torch.where(above, lo, mid)
    return 0.5 * (lo + hi)


def edm_grid(sde: SDE, steps: int, t_end: float, rho: float = 7.0) -> list[float]:
    """Karras et al.'s schedule: ``lambda_i^(1/rho)`` equally spaced from ``lambda(T)`` to ``lambda(t_end)``.

    The first and last times are exactly ``T`` and ``t_end``; steps are small at low noise.

    Example:
        >>> from nnh.generative.sde import VESDE
        >>> grid = edm_grid(VESDE(), 4, 1e-5)
        >>> grid[0], grid[-1], all(a > b for a, b in zip(grid, grid[1:]))
        (1.0, 1e-05, True)
    """
    hi, lo = noise_level(sde, sde.T), noise_level(sde, t_end)
    if not (float(lo) > 0):
        raise ValueError(
            f"the edm grid needs sigma(t_end) > 0; t_end={t_end} gives 0 for {type(sde).__name__}"
        )
    frac = torch.arange(steps + 1, dtype=torch.float64) / steps
    levels = (hi ** (1 / rho) + frac * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    times = _invert_noise_level(sde, levels, t_end).tolist()
    times[0], times[-1] = float(sde.T), float(t_end)
    return times


def time_grid(sde: SDE, steps: int, t_end: float, name: str = "uniform") -> list[float]:
    """The ``steps + 1`` times of grid ``name`` (``"uniform"`` or ``"edm"``), from ``T`` down to ``t_end``.

    Example:
        >>> from nnh.generative.sde import VPSDE
        >>> len(time_grid(VPSDE(), 10, 1e-3, "edm"))
        11
    """
    if check_time_grid(name) == "uniform":
        return uniform_grid(sde, steps, t_end)
    return edm_grid(sde, steps, t_end)
