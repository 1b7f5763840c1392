"""All samplers behind one call: Euler-Maruyama, predictor-corrector and the probability-flow ODE.

:func:`sample_sde` runs ``steps`` steps from the prior at ``T`` down to ``t_end`` on a time
grid (:mod:`nnh.generative.time_grid`), with the pure steps of
:mod:`nnh.generative.steps` and :mod:`nnh.generative.sampler_steps`:

============  ===============================================  ==============================
``method``    one step                                         score calls
============  ===============================================  ==============================
``"em"``      reverse-SDE Euler-Maruyama                       ``steps``
``"pc"``      ``corrector_steps`` Langevin steps, then EM      ``steps * (1 + corrector_steps)``
``"ode"``     probability-flow ODE (``ode_method``)            ``steps * {1, 2, 4}``
============  ===============================================  ==============================

plus one call for ``denoise=True``. ``"em"`` on the uniform grid is exactly
:func:`~nnh.generative.sampling.sample_reverse_sde` (bitwise).
"""

from __future__ import annotations

import math

import torch

from nnh.generative.checks import check_sample_shape
from nnh.generative.multistep import (
    MULTISTEP_METHODS,
    MultistepHistory,
    dpm_solver_pp_step,
    multistep_order,
    step_order,
)
from nnh.generative.sampler_steps import (
    langevin_corrector_step,
    probability_flow_step,
    tweedie_denoise,
)
from nnh.generative.sampling import Progress, check_steps, notify_progress, sample_reverse_sde
from nnh.generative.sde import SDE
from nnh.generative.steps import (
    ODE_METHODS,
    ScoreFn,
    check_ode_method,
    em_sde_step,
    evaluations_per_step,
)
from nnh.generative.time_grid import check_data_scale, check_time_grid
from nnh.generative.time_grid import time_grid as make_time_grid
from nnh.generative.unipc import UniPCHistory, unipc_step
from nnh.warn import warn as nnh_warn

__all__ = [
    "SAMPLE_METHODS",
    "canonical_ode_method",
    "check_sampler_options",
    "sample_sde",
    "score_calls",
]

SAMPLE_METHODS = ("em", "pc", "ode")


def canonical_ode_method(ode_method: str) -> str:
    """``"Euler"``/``"Heun"``/``"RK4"`` or ``"dpm++2m"``/``"dpm++3m"``/``"unipc"``, any case; else a named error.

    Example:
        >>> canonical_ode_method("DPM++2M"), canonical_ode_method("rk4")
        ('dpm++2m', 'RK4')
    """
    if isinstance(ode_method, str) and ode_method.lower() in MULTISTEP_METHODS:
        return ode_method.lower()
    try:
        return check_ode_method(ode_method)
    except ValueError:
        allowed = (*ODE_METHODS, *MULTISTEP_METHODS)
        raise ValueError(
            f"ode_method={ode_method!r}: use one of {allowed} (case-insensitive)"
        ) from None


def _check_number(name: str, value: object, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if positive and not value > 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_sampler_options(
    method: str,
    ode_method: str,
    corrector_steps: int,
    snr: float,
    grid: str,
    denoise: bool = False,
    guidance_factor: float = 1.0,
) -> tuple[str, str]:
    """Validate the sampler options; returns ``(method, canonical ode_method)`` (names case-insensitive).

    Example:
        >>> check_sampler_options("ODE", "heun", 1, 0.16, "EDM")
        ('ode', 'Heun')
    """
    if not (isinstance(method, str) and method.lower() in SAMPLE_METHODS):
        raise ValueError(f"method={method!r}: use one of {SAMPLE_METHODS} (case-insensitive)")
    method = method.lower()
    ode_method = canonical_ode_method(ode_method)
    if not isinstance(denoise, bool):
        raise ValueError(f"denoise must be True or False, got {denoise!r}")
    _check_number("guidance_factor", guidance_factor, positive=False)
    if (
        isinstance(corrector_steps, bool)
        or not isinstance(corrector_steps, int)
        or corrector_steps < 0
    ):
        raise ValueError(f"corrector_steps must be an int >= 0, got {corrector_steps!r}")
    _check_number("snr", snr, positive=True)
    check_time_grid(grid)
    return method, ode_method


def score_calls(
    method: str,
    steps: int,
    ode_method: str = "Heun",
    corrector_steps: int = 1,
    denoise: bool = False,
) -> int:
    """How many times :func:`sample_sde` calls ``score_fn`` (each guidance call comes with one).

    Example:
        >>> score_calls("ode", 50, "Heun"), score_calls("pc", 200, corrector_steps=1, denoise=True)
        (100, 401)
    """
    per_step = {
        "em": 1,
        "pc": 1 + corrector_steps,
        "ode": _ode_calls(ode_method) if method == "ode" else 0,
    }[method.lower()]
    return steps * per_step + int(bool(denoise))


def _ode_calls(ode_method: str) -> int:
    name = canonical_ode_method(ode_method)
    return 1 if name in MULTISTEP_METHODS else evaluations_per_step(name)


def _first_call_checked(score_fn: ScoreFn, shape: tuple[int, ...]) -> ScoreFn:
    """``score_fn`` whose first call names ``shape`` when the model cannot take it or answers another shape."""
    checked = []

    def score(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if checked:
            return score_fn(t, x)
        try:
            out = score_fn(t, x)
        except RuntimeError as exc:
            raise ValueError(
                f"shape={shape} does not fit the model: its first call on x of shape "
                f"{tuple(x.shape)} failed ({exc}); pass (N, *the model's sample shape)"
            ) from exc
        if out.shape != x.shape:
            raise ValueError(
                f"shape={shape} does not fit the model: the score for x of shape "
                f"{tuple(x.shape)} came back with shape {tuple(out.shape)}; pass "
                f"(N, *the model's sample shape)"
            )
        checked.append(True)
        return out

    return score


def _guided(score_fn: ScoreFn, guidance_fn: ScoreFn | None, factor: float) -> ScoreFn:
    if guidance_fn is None:
        return score_fn
    return lambda t, x: score_fn(t, x) + factor * guidance_fn(t, x)


def sample_sde(
    sde: SDE,
    score_fn: ScoreFn,
    shape: torch.Size | tuple[int, ...],
    steps: int,
    *,
    method: str = "em",
    ode_method: str = "Heun",
    corrector_steps: int = 1,
    snr: float = 0.16,
    denoise: bool = False,
    time_grid: str = "uniform",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    guidance_fn: ScoreFn | None = None,
    guidance_factor: float = 1.0,
    stop_on_nan: bool = True,
    progress: Progress | None = None,
    t_end: float | None = None,
    data_scale: float | None = None,
) -> torch.Tensor:
    """Samples ``[B, ...]`` with ``method`` in ``steps`` steps from ``T`` down to ``t_end`` (default ``epsilon``).

    ``method``: ``"em"`` (reverse-SDE Euler-Maruyama; the last step returns its noise-free
    mean), ``"pc"`` (at each time ``corrector_steps`` Langevin steps with signal-to-noise
    ratio ``snr``, then the EM predictor; Song et al. 2021), ``"ode"`` (the probability-flow
    ODE with ``ode_method`` ``"Euler"``/``"Heun"``/``"RK4"`` or the one-call-per-step
    ``"dpm++2m"``/``"dpm++3m"``/``"unipc"``, whose order-2 methods take their last two steps
    at first order: deterministic given the prior sample). ``time_grid``: ``"uniform"``, ``"edm"``
    (:func:`~nnh.generative.time_grid.edm_grid`) or ``"logsnr"``. ``data_scale`` (noise-level grids
    only): the data's per-coordinate std; the first step then jumps from ``lambda(T)`` to
    ``5 * data_scale`` (:func:`~nnh.generative.time_grid.level_cap`; best with ``"unipc"``).
    ``denoise``: finish with Tweedie's step :func:`~nnh.generative.sampler_steps.tweedie_denoise`
    at ``t_end``. ``guidance_fn(t, x)`` times ``guidance_factor`` is added to every score.

    Randomness (prior, step and corrector noise) comes from ``generator`` when given, else
    torch's default generator; per step the corrector noises are drawn before the predictor's.
    ``stop_on_nan`` and ``progress`` work as in
    :func:`~nnh.generative.sampling.sample_reverse_sde`. Score calls: :func:`score_calls`.

    Example:
        >>> from nnh.generative.sde import VPSDE
        >>> g = torch.Generator().manual_seed(0)
        >>> x = sample_sde(VPSDE(), lambda t, x: -x, (16, 2), 10, method="ode", generator=g)
        >>> x.shape
        torch.Size([16, 2])
    """
    check_steps(steps)
    shape = check_sample_shape(shape)
    method, ode_method = check_sampler_options(
        method, ode_method, corrector_steps, snr, time_grid, denoise, guidance_factor
    )
    time_grid = check_time_grid(time_grid)
    t_end = sde.epsilon if t_end is None else float(t_end)
    if not (0.0 <= t_end < sde.T):
        raise ValueError(f"t_end must be in [0, T) = [0, {sde.T}), got {t_end}")
    if check_data_scale(data_scale) is not None:  # its named errors before any model call
        make_time_grid(sde, steps, t_end, time_grid, data_scale)
    score = _first_call_checked(_guided(score_fn, guidance_fn, guidance_factor), shape)
    if method == "em" and time_grid == "uniform":
        x = sample_reverse_sde(
            sde,
            _first_call_checked(score_fn, shape),
            shape,
            steps,
            generator=generator,
            device=device,
            dtype=dtype,
            guidance_fn=guidance_fn,
            guidance_factor=guidance_factor,
            stop_on_nan=stop_on_nan,
            progress=progress,
            t_end=t_end,
        )
    else:
        times = make_time_grid(sde, steps, t_end, time_grid, data_scale)
        x = _integrate(
            sde, score, shape, times, method, ode_method, corrector_steps, snr,
            generator, device, dtype, stop_on_nan, progress,
        )  # fmt: skip
    if denoise:
        t = torch.full((shape[0],), t_end, dtype=x.dtype, device=x.device)
        x = tweedie_denoise(sde, score, t, x).detach()
    return x


def _detached(history: MultistepHistory | UniPCHistory) -> MultistepHistory | UniPCHistory:
    denoised = tuple(d.detach() for d in history.denoised)
    if isinstance(history, UniPCHistory) and history.x_prev is not None:
        return history._replace(denoised=denoised, x_prev=history.x_prev.detach())
    return history._replace(denoised=denoised)


def _integrate(
    sde: SDE,
    score: ScoreFn,
    shape: tuple[int, ...],
    times: list[float],
    method: str,
    ode_method: str,
    corrector_steps: int,
    snr: float,
    generator: torch.Generator | None,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
    stop_on_nan: bool,
    progress: Progress | None,
) -> torch.Tensor:
    if device is None and generator is not None:
        device = generator.device
    x = sde.prior(shape, generator=generator, device=device, dtype=dtype)
    steps = len(times) - 1

    def noise() -> torch.Tensor:
        return torch.randn(shape, generator=generator, device=x.device, dtype=x.dtype)

    history = UniPCHistory() if ode_method == "unipc" else MultistepHistory()
    for i in range(steps):
        t_i, dt = times[i], times[i] - times[i + 1]
        t = torch.full((shape[0],), t_i, dtype=x.dtype, device=x.device)
        last = i == steps - 1
        if method == "ode" and ode_method in MULTISTEP_METHODS:
            order = step_order(multistep_order(ode_method), i, steps)
            step = unipc_step if ode_method == "unipc" else dpm_solver_pp_step
            x_next, history = step(sde, score, t_i, times[i + 1], x, history, order)
            history = _detached(history)
        elif method == "ode":
            x_next = probability_flow_step(sde, score, t, x, dt, ode_method)
        else:
            y = x
            for _ in range(corrector_steps if method == "pc" else 0):
                y, _ = langevin_corrector_step(sde, score, t, y, noise(), snr, dt)
            z = torch.zeros_like(y) if last else noise()
            y_next, y_mean = em_sde_step(sde, score, t, y, dt, z)
            x_next = y_mean if last else y_next
        x_next = x_next.detach()
        if stop_on_nan and not bool(torch.isfinite(x_next).all()):
            nnh_warn(
                f"sample_sde ({method}): non-finite values (NaN/inf) after step {i + 1}/{steps} "
                f"(t={t_i:.6g} -> {times[i + 1]:.6g}); returning the last finite state, the "
                f"noisy samples at t={t_i:.6g}",
                RuntimeWarning,
            )
            return x
        x = x_next
        notify_progress(progress, i)
    return x
