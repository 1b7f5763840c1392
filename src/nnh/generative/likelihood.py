"""Log-likelihood through the probability-flow ODE (instantaneous change of variables)."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch

from nnh.generative.adaptive import Dopri5State, check_tolerance, dopri5_solve
from nnh.generative.checks import check_data, check_time_window
from nnh.generative.divergence import ProbeSource
from nnh.generative.level_ode import level_field, noise_level_of
from nnh.generative.sampling import Progress, check_steps, notify_progress
from nnh.generative.sde import SDE
from nnh.generative.steps import ODE_METHODS, ScoreFn, ode_likelihood_step
from nnh.warn import warn as nnh_warn

__all__ = [
    "DIVERGENCES",
    "LIKELIHOOD_METHODS",
    "MAX_EXACT_DIM",
    "check_divergence",
    "check_finite_input",
    "check_likelihood_method",
    "log_likelihood_ode",
]

LIKELIHOOD_METHODS = (*ODE_METHODS, "dopri5")
DIVERGENCES = ("hutchinson", "exact")
MAX_EXACT_DIM = 256  # the exact trace costs D vector-Jacobian products per evaluation


def check_likelihood_method(method: Any) -> str:
    """The canonical spelling of a likelihood ``method`` (case-insensitive), or a clear error.

    Example:
        >>> check_likelihood_method("DOPRI5"), check_likelihood_method("heun")
        ('dopri5', 'Heun')
    """
    for name in LIKELIHOOD_METHODS:
        if isinstance(method, str) and method.lower() == name.lower():
            return name
    raise ValueError(
        f"method={method!r} is not a likelihood integrator; use one of {LIKELIHOOD_METHODS} "
        f"(fixed steps: Euler/Heun/RK4; adaptive with error control: dopri5; any case)"
    )


def check_divergence(divergence: Any) -> str:
    """``"hutchinson"`` or ``"exact"`` (case-insensitive), or a clear error.

    Example:
        >>> check_divergence("Exact")
        'exact'
    """
    if isinstance(divergence, str) and divergence.lower() in DIVERGENCES:
        return divergence.lower()
    raise ValueError(
        f"divergence={divergence!r}: use 'hutchinson' (unbiased estimate from probe vectors, "
        f"any size) or 'exact' (the trace through D vector-Jacobian products, D <= "
        f"{MAX_EXACT_DIM}); any case"
    )


def check_exact_size(x: torch.Tensor) -> None:
    """Refuse the exact divergence for samples of more than :data:`MAX_EXACT_DIM` entries."""
    d = x[0].numel()
    if d > MAX_EXACT_DIM:
        raise ValueError(
            f"divergence='exact' (probes=None) takes D vector-Jacobian products per model call "
            f"and x's samples have D={d} entries (shape {tuple(x.shape[1:])}); it is allowed for "
            f"D <= {MAX_EXACT_DIM}. Use divergence='hutchinson' (probes) for larger samples"
        )


def check_finite_input(x: torch.Tensor, name: str = "x") -> None:
    """An error naming the INPUT ``x`` when it holds NaN/inf (one host sync; before any model call).

    Example:
        >>> check_finite_input(torch.zeros(2, 2))
    """
    finite = torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1)
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten()
        raise ValueError(
            f"the input {name} holds NaN/inf values in {bad.numel()} of {x.shape[0]} samples "
            f"(first: row {int(bad[0])}): the log-likelihood of a non-finite point is not "
            f"defined; drop or clean those rows of {name} (the model was not called)"
        )


def _checked_score(score_fn: ScoreFn, name: str) -> ScoreFn:
    def checked(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = score_fn(t, y)
        if not isinstance(out, torch.Tensor) or out.shape != y.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"{name} returned {got} for x of shape {tuple(y.shape)}; a score must be shaped "
                f"like x (one value per entry of each sample)"
            )
        return out

    return checked


def _probes_at(probes: ProbeSource, step: int) -> torch.Tensor | None:
    return probes(step) if callable(probes) else probes


def log_likelihood_ode(
    sde: SDE,
    score_fn: ScoreFn,
    x: torch.Tensor,
    *,
    steps: int,
    probes: ProbeSource,
    method: str = "Euler",
    t0: float | None = None,
    t1: float | None = None,
    progress: Progress | None = None,
    differentiable: bool = False,
    warn_non_finite: bool = True,
    rtol: float = 1e-5,
    atol: float = 1e-5,
) -> torch.Tensor:
    """``log p_t0(x)`` in nats per sample, shape ``[B]``, by integrating the probability-flow ODE.

    Integrates ``dx/dt = f - g^2 score / 2`` from ``t0`` (default ``sde.epsilon``) to ``t1``
    (default ``sde.T``, at most ``T``) and returns ``sde.prior_log_prob(x_t1) + int_t0^t1 div F dt``.
    This is the density of the model's marginal at ``t0`` (not of the noise-free data): for
    ``t0 = epsilon`` tiny the two agree to ``O(sigma(epsilon)^2)``. The answer also assumes
    the marginal at ``t1`` is the prior. ``t0``/``t1`` may be numbers or 0-d tensors.

    ``method`` (any case): ``"Euler"``, ``"Heun"``, ``"RK4"`` take ``steps`` uniform steps in
    ``t`` (see :func:`~nnh.generative.steps.ode_likelihood_step`; ``steps``, ``2 * steps``,
    ``4 * steps`` calls of ``score_fn``). ``"dopri5"``: adaptive Dormand-Prince 5(4) in the
    noise level ``(x / mu, lambda = sigma / mu)`` (see :mod:`~nnh.generative.level_ode` and
    :mod:`~nnh.generative.adaptive`) with a step size per sample and the error of both ``x``
    and the log-density held to ``rtol``/``atol``; ``steps`` is then the most step attempts
    allowed (a ``RuntimeError`` naming it when some sample has not reached ``t1`` by then);
    a solve costs ``2 + 6 * attempts`` calls.

    ``probes``: a callable ``step -> [K, *x.shape]`` (e.g.
    :func:`~nnh.generative.divergence.fresh_probes`) draws fresh probes at every fixed step,
    the same ones for all stages of a Heun/RK4 step (dopri5 draws once per solve: a smooth
    field is what its error control needs); a tensor ``[K, *x.shape]`` is used throughout;
    ``None`` computes the exact divergence (``D`` VJPs sharing one forward, ``D <= 256``).
    All probes are batched into one vector-Jacobian product per call of ``score_fn``.

    Memory is flat in ``steps``: each step runs under ``torch.no_grad()`` (the divergence
    still uses autograd inside the step) and the result carries no graph. With
    ``differentiable=True`` the graph of every step is kept so the result can be
    back-propagated (to the model's parameters or ``x``); memory then grows with ``steps``.

    ``warn_non_finite``: if any value turns NaN/inf, a ``RuntimeWarning`` names the first
    such step and its time. NaN/inf in the input ``x`` is refused before any model call.

    Example:
        >>> from nnh.generative.sde import VPSDE
        >>> x = torch.randn(8, 2)
        >>> log_likelihood_ode(VPSDE(), lambda t, y: -y, x, steps=20, probes=None).shape
        torch.Size([8])
        >>> log_likelihood_ode(VPSDE(), lambda t, y: -y, x, steps=100, probes=None, method="dopri5").shape
        torch.Size([8])
    """
    check_steps(steps)
    method = check_likelihood_method(method)
    rtol, atol = check_tolerance("rtol", rtol), check_tolerance("atol", atol)
    check_data(x)
    if probes is None:
        check_exact_size(x)
    check_finite_input(x)
    t0, t1 = check_time_window(sde, sde.epsilon if t0 is None else t0, sde.T if t1 is None else t1)
    score_fn = _checked_score(score_fn, "score_fn")
    if not differentiable:
        x = x.detach()
    if method == "dopri5":
        return _dopri5_log_likelihood(
            sde,
            score_fn,
            x,
            steps,
            _probes_at(probes, 0),
            t0,
            t1,
            progress,
            differentiable,
            warn_non_finite,
            rtol,
            atol,
        )
    dt = (t1 - t0) / steps
    batch = x.shape[0]
    integral = torch.zeros(batch, dtype=x.dtype, device=x.device)
    first_bad = torch.full((), -1, dtype=torch.long, device=x.device)
    for i in range(steps):
        t = torch.full((batch,), t0 + i * dt, dtype=x.dtype, device=x.device)
        grad_mode = contextlib.nullcontext() if differentiable else torch.no_grad()
        with grad_mode:
            x, delta = ode_likelihood_step(sde, score_fn, t, x, dt, _probes_at(probes, i), method)
            integral = integral + delta
            if warn_non_finite:
                bad = ~(torch.isfinite(integral).all() & torch.isfinite(x).all())
                first_bad = torch.where(bad & (first_bad < 0), i, first_bad)
        notify_progress(progress, i)
    out = sde.prior_log_prob(x) + integral
    if warn_non_finite:
        step = int(first_bad)
        if step >= 0 or not bool(torch.isfinite(out).all()):
            where = (
                f"from ODE step {step + 1}/{steps} (t={t0 + step * dt:.6g} -> "
                f"{t0 + (step + 1) * dt:.6g})"
                if step >= 0
                else "in the prior log-density at t1"
            )
            _warn_non_finite(out, where)
    return out


def _warn_non_finite(out: torch.Tensor, where: str) -> None:
    n_bad = int((~torch.isfinite(out)).sum())
    nnh_warn(
        f"log_likelihood_ode: non-finite values (NaN/inf) {where}; {n_bad} of {out.shape[0]} "
        f"log-likelihoods are not finite. The input x was finite: check the model's output "
        f"near those times, t0 (sigma(t0) must not be ~0) and the data scale",
        RuntimeWarning,
    )


def _dopri5_log_likelihood(
    sde: SDE,
    score_fn: ScoreFn,
    x: torch.Tensor,
    max_attempts: int,
    probes: torch.Tensor | None,
    t0: float,
    t1: float,
    progress: Progress | None,
    differentiable: bool,
    warn_non_finite: bool,
    rtol: float,
    atol: float,
) -> torch.Tensor:
    """Adaptive solve of the augmented flow in the noise level (see :mod:`nnh.generative.level_ode`)."""
    batch, d = x.shape[0], x[0].numel()
    times = torch.tensor([t0, t1], dtype=torch.float64, device=x.device)
    mus = sde.mu(times)
    lam0, lam1 = noise_level_of(sde, times).to(x.dtype).unbind()
    first_bad: list[float] = []

    def on_attempt(i: int, state: Dopri5State) -> None:
        if warn_non_finite and not first_bad:
            bad = ~torch.isfinite(state.q)
            if bool(bad.any()):  # one host sync per attempt, only while warnings are on
                first_bad.append(float(state.s[bad][0]))
        notify_progress(progress, i)

    grad_mode = contextlib.nullcontext() if differentiable else torch.no_grad()
    with grad_mode:
        y1, integral, _ = dopri5_solve(
            level_field(sde, score_fn, probes),
            lam0.expand(batch),
            lam1.expand(batch),
            x / mus[0].to(x.dtype),
            rtol=rtol,
            atol=atol,
            max_attempts=max_attempts,
            on_attempt=on_attempt,
            limit_name="steps (ode_steps: the most dopri5 step attempts)",
        )
        log_mu = d * (math.log(float(mus[1])) - math.log(float(mus[0])))
        out = sde.prior_log_prob(mus[1].to(x.dtype) * y1) + log_mu + integral
    if warn_non_finite and (first_bad or not bool(torch.isfinite(out).all())):
        where = (
            f"from the dopri5 step that left lambda={first_bad[0]:.6g}"
            if first_bad
            else "in the prior log-density at t1"
        )
        _warn_non_finite(out, where)
    return out
