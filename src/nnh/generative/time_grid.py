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

The grid rule for large noise (``data_scale``, issue 20): the noise-level grids start at
``lambda(T)``, which the SDE fixes for the largest data it was designed for (VE's
``sigma_max`` >= the data's largest pairwise distance, Song & Ermon 2020). When the data's
per-coordinate std ``s = data_scale`` is known and ``lambda_cap = CAP_FACTOR * s`` is below
``lambda(T)``, the first step jumps from ``lambda(T)`` straight to ``lambda_cap`` and the other
``steps - 1`` follow the grid from ``lambda_cap`` down. Above ``lambda_cap`` the marginal is
within a few per cent of the Gaussian ``N(mean, (s^2 + lambda^2) I)``, on which the
data-prediction step is nearly exact: one first-order step from ``lambda_0`` to ``lambda_1`` for
Gaussian data of std ``s`` errs by ``~ s^2 / (2 lambda_1)`` against a noise of ``lambda_1``, a
relative ``s^2 / (2 lambda_1^2)`` = 2 % at ``lambda_1 = 5 s``. ``CAP_FACTOR = 5`` was chosen by
measurement (``benchmarks/flow_table.py``: VE and VP, the 4-mode mixture and a two-moons
mixture, seeds 0-2; see docs/generative.md). ``data_scale=None`` (the default) keeps the grid
fixed by the SDE alone.
"""

from __future__ import annotations

import math

import torch

from nnh.generative.sde import SDE

__all__ = [
    "CAP_FACTOR",
    "TIME_GRIDS",
    "check_data_scale",
    "check_time_grid",
    "edm_grid",
    "logsnr_grid",
    "noise_level",
    "time_grid",
    "uniform_grid",
]

TIME_GRIDS = ("uniform", "edm", "logsnr")
LAMBDA_FLOOR = 2e-3
CAP_FACTOR = 5.0


def check_time_grid(name: str) -> str:
    """``name`` in lower case when it is a known grid (any case), else a ``ValueError`` naming ``time_grid``.

    Example:
        >>> check_time_grid("EDM")
        'edm'
    """
    if not (isinstance(name, str) and name.lower() in TIME_GRIDS):
        raise ValueError(f"time_grid={name!r}: use one of {TIME_GRIDS} (case-insensitive)")
    return name.lower()


def check_data_scale(data_scale: float | None) -> float | None:
    """``data_scale`` as a float (``None`` passes), else a ``ValueError`` naming ``data_scale``.

    Example:
        >>> check_data_scale(1), check_data_scale(None)
        (1.0, None)
    """
    if data_scale is None:
        return None
    bad = isinstance(data_scale, bool) or not isinstance(data_scale, (int, float))
    if bad or not (math.isfinite(data_scale) and data_scale > 0):
        raise ValueError(
            f"data_scale must be None or a finite number > 0 (the data's per-coordinate "
            f"std), got {data_scale!r}"
        )
    return float(data_scale)


def level_cap(sde: SDE, data_scale: float | None) -> float | None:
    """The level the first step jumps to: ``CAP_FACTOR * data_scale`` when below ``lambda(T)``, else None.

    Example:
        >>> from nnh.generative.sde import VPSDE
        >>> level_cap(VPSDE(), 1.0), level_cap(VPSDE(), 100.0), level_cap(VPSDE(), None)
        (5.0, None, None)
    """
    data_scale = check_data_scale(data_scale)
    if data_scale is None:
        return None
    cap = CAP_FACTOR * data_scale
    return cap if cap < (1 - 1e-6) * float(noise_level(sde, sde.T)) else None  # 1e-6: rounding


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


def edm_grid(
    sde: SDE, steps: int, t_end: float, rho: float = 7.0, data_scale: float | None = None
) -> list[float]:
    """Karras et al.'s schedule: ``lambda_i^(1/rho)`` equally spaced from ``lambda(T)`` to ``lambda(t_end)``.

    The first and last times are exactly ``T`` and ``t_end``; steps are small at low noise.
    With ``data_scale`` (the data's per-coordinate std) the first step jumps to
    :func:`level_cap` and the schedule runs from there (see the module's docstring).

    Example:
        >>> from nnh.generative.sde import VESDE
        >>> grid = edm_grid(VESDE(), 4, 1e-5)
        >>> grid[0], grid[-1], all(a > b for a, b in zip(grid, grid[1:]))
        (1.0, 1e-05, True)
    """
    hi, lo, n = _capped_range(sde, steps, t_end, data_scale)
    frac = torch.arange(n + 1, dtype=torch.float64) / n
    levels = (hi ** (1 / rho) + frac * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    return _times_of(sde, _with_top(sde, levels, n, steps), t_end)


def _capped_range(
    sde: SDE, steps: int, t_end: float, data_scale: float | None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(top, bottom, steps) of the schedule: from ``lambda(T)``, or from the cap in ``steps - 1``."""
    hi, lo = _level_range(sde, steps, t_end)
    cap = level_cap(sde, data_scale)
    if cap is None or steps < 2:
        return hi, lo, steps
    if not cap > float(lo):
        raise ValueError(
            f"data_scale={data_scale!r} puts the first step's target lambda = {CAP_FACTOR} * "
            f"data_scale = {cap:.3g} at or below the grid's lowest level {float(lo):.3g}: "
            f"use a larger data_scale or None"
        )
    return torch.tensor(cap, dtype=torch.float64), lo, steps - 1


def _with_top(sde: SDE, levels: torch.Tensor, n: int, steps: int) -> torch.Tensor:
    if n == steps:
        return levels
    return torch.cat([noise_level(sde, sde.T).reshape(1), levels])


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


def logsnr_grid(sde: SDE, steps: int, t_end: float, data_scale: float | None = None) -> list[float]:
    """``steps + 1`` times with ``log lambda`` equally spaced from ``lambda(T)`` to ``max(lambda(t_end), 2e-3)``.

    ``data_scale``: the first step jumps to :func:`level_cap`, as in :func:`edm_grid`.

    Example:
        >>> from nnh.generative.sde import VESDE
        >>> grid = logsnr_grid(VESDE(), 4, 1e-5)
        >>> grid[0], grid[-1], all(a > b for a, b in zip(grid, grid[1:]))
        (1.0, 1e-05, True)
    """
    hi, lo, n = _capped_range(sde, steps, t_end, data_scale)
    frac = torch.arange(n + 1, dtype=torch.float64) / n
    levels = torch.exp(hi.log() + frac * (lo.log() - hi.log()))
    return _times_of(sde, _with_top(sde, levels, n, steps), t_end)


def time_grid(
    sde: SDE,
    steps: int,
    t_end: float,
    name: str = "uniform",
    data_scale: float | None = None,
) -> list[float]:
    """The ``steps + 1`` times of grid ``name`` (``"uniform"``, ``"edm"``, ``"logsnr"``), from ``T`` to ``t_end``.

    ``data_scale`` (the noise-level grids only): the data's per-coordinate std, which moves
    the grid's high-noise end (see the module's docstring).

    Example:
        >>> from nnh.generative.sde import VPSDE
        >>> len(time_grid(VPSDE(), 10, 1e-3, "edm"))
        11
    """
    name = check_time_grid(name)
    data_scale = check_data_scale(data_scale)
    if name == "uniform":
        if data_scale is not None:
            raise ValueError(
                f"data_scale={data_scale!r} applies to the noise-level grids 'edm' and "
                f"'logsnr', not time_grid='uniform'"
            )
        return uniform_grid(sde, steps, t_end)
    if name == "logsnr":
        return logsnr_grid(sde, steps, t_end, data_scale)
    return edm_grid(sde, steps, t_end, data_scale=data_scale)
