"""Time grids for the samplers: ``steps + 1`` decreasing times from ``T`` to ``t_end``.

``"uniform"``: equal steps in ``t``. ``"edm"``: the rho = 7 schedule of Karras et al. (2022),
equal steps in ``lambda^(1/rho)`` where ``lambda(t) = sigma(t) / mu(t)`` is the noise level of
the rescaled process ``x / mu(t)``: this is ``sigma`` itself for VE and the EDM noise level
``sqrt(exp(B(t)) - 1)`` for VP (sub-VP likewise), so the same schedule serves every SDE.
The times come from inverting ``lambda`` by bisection (it increases with ``t``).
``"logsnr"``: equal steps in ``log lambda`` (the log signal-to-noise ratio), the grid
DPM-Solver's analysis is written on.

The grid rule for small noise: the noise-level grids run down to
``max(lambda(t_end), min(2e-3, 1e-3 lambda(T)))`` (2e-3 is EDM's ``sigma_min``) and the
last time is always ``t_end``. Below the floor the denoised sample no longer moves, so on an
SDE whose ``lambda(t_end)`` is tiny (sub-VP: ``lambda(1e-5) ~ 1e-6``) the steps are not spent
there; the last step jumps from the floor to ``t_end``.
"""

from __future__ import annotations

import torch

from nnh.generative.sde import SDE

__all__ = [
    "TIME_GRIDS",
    "check_time_grid",
    "edm_grid",
    "logsnr_grid",
    "noise_level",
    "time_grid",
    "uniform_grid",
]

TIME_GRIDS = ("uniform", "edm", "logsnr")
LAMBDA_FLOOR = 2e-3


def check_time_grid(name: str) -> str:
    """``name`` in lower case when it is a known grid (any case), else a ``ValueError`` naming ``time_grid``.

    Example:
        >>> check_time_grid("EDM")
        'edm'
    """
    if not (isinstance(name, str) and name.lower() in TIME_GRIDS):
        raise ValueError(f"time_grid={name!r}: use one of {TIME_GRIDS} (case-insensitive)")
    return name.lower()


def _check_grid_args(sde: SDE, steps: int, t_end: float) -> float:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if isinstance(t_end, bool) or not isinstance(t_end, (int, float)):
        raise ValueError(f"t_end must be a number in [0, T) = [0, {sde.T}), got {t_end!r}")
    if not (0.0 <= t_end < sde.T):
        raise ValueError(f"t_end must be a finite time in [0, T) = [0, {sde.T}), got {t_end!r}")
    return float(t_end)


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
    t_end = _check_grid_args(sde, steps, t_end)
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
    hi, lo = _level_range(sde, steps, t_end)
    frac = torch.arange(steps + 1, dtype=torch.float64) / steps
    levels = (hi ** (1 / rho) + frac * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    return _times_of(sde, levels, t_end)


def _level_range(sde: SDE, steps: int, t_end: float) -> tuple[torch.Tensor, torch.Tensor]:
    t_end = _check_grid_args(sde, steps, t_end)
    hi, lo = noise_level(sde, sde.T), noise_level(sde, t_end)
    if not (float(lo) > 0):
        raise ValueError(
            f"the noise-level grids need sigma(t_end) > 0; t_end={t_end} gives 0 for "
            f"{type(sde).__name__}: use t_end > 0 (e.g. sde.epsilon) or time_grid='uniform'"
        )
    return hi, torch.clamp(lo, min=lambda_floor(float(hi)))


def lambda_floor(top: float) -> float:
    """The lowest noise level the noise-level grids step to: ``min(2e-3, 1e-3 lambda(T))``.

    Example:
        >>> lambda_floor(50.0), lambda_floor(1.0)
        (0.002, 0.001)
    """
    return min(LAMBDA_FLOOR, 1e-3 * top)


def _times_of(sde: SDE, levels: torch.Tensor, t_end: float) -> list[float]:
    times = _invert_noise_level(sde, levels, t_end).tolist()
    times[0], times[-1] = float(sde.T), float(t_end)
    for i in range(len(times) - 2, 0, -1):  # strictly decreasing even where lambda is flat
        times[i] = max(times[i], times[i + 1] + 1e-12 * sde.T)
    return times


def logsnr_grid(sde: SDE, steps: int, t_end: float) -> list[float]:
    """``steps + 1`` times with ``log lambda`` equally spaced from ``lambda(T)`` to ``max(lambda(t_end), 2e-3)``.

    Example:
        >>> from nnh.generative.sde import VESDE
        >>> grid = logsnr_grid(VESDE(), 4, 1e-5)
        >>> grid[0], grid[-1], all(a > b for a, b in zip(grid, grid[1:]))
        (1.0, 1e-05, True)
    """
    hi, lo = _level_range(sde, steps, t_end)
    frac = torch.arange(steps + 1, dtype=torch.float64) / steps
    return _times_of(sde, torch.exp(hi.log() + frac * (lo.log() - hi.log())), t_end)


def time_grid(sde: SDE, steps: int, t_end: float, name: str = "uniform") -> list[float]:
    """The ``steps + 1`` times of grid ``name`` (``"uniform"``, ``"edm"``, ``"logsnr"``), from ``T`` to ``t_end``.

    Example:
        >>> from nnh.generative.sde import VPSDE
        >>> len(time_grid(VPSDE(), 10, 1e-3, "edm"))
        11
    """
    name = check_time_grid(name)
    if name == "uniform":
        return uniform_grid(sde, steps, t_end)
    if name == "logsnr":
        return logsnr_grid(sde, steps, t_end)
    return edm_grid(sde, steps, t_end)
