"""Log-likelihood through the probability-flow ODE (instantaneous change of variables)."""

from __future__ import annotations

import contextlib

import torch

from nnh.generative.checks import check_data, check_time_window
from nnh.generative.divergence import ProbeSource
from nnh.generative.sampling import Progress, check_steps, notify_progress
from nnh.generative.sde import SDE
from nnh.generative.steps import ScoreFn, check_ode_method, ode_likelihood_step
from nnh.warn import warn as nnh_warn

__all__ = ["log_likelihood_ode"]


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
) -> torch.Tensor:
    """``log p_t0(x)`` in nats per sample, shape ``[B]``, by integrating the probability-flow ODE.

    Integrates ``dx/dt = f - g^2 score / 2`` from ``t0`` (default ``sde.epsilon``) to ``t1``
    (default ``sde.T``, at most ``T``) in ``steps`` uniform steps of ``method`` (see
    :func:`~nnh.generative.steps.ode_likelihood_step`) and returns
    ``sde.prior_log_prob(x_t1) + int_t0^t1 div F dt``. This is the density of the model's
    marginal at ``t0`` (not of the noise-free data): for ``t0 = epsilon`` tiny the two agree
    to ``O(sigma(epsilon)^2)``. The answer also assumes the marginal at ``t1`` is the prior.

    ``probes``: a callable ``step -> [K, *x.shape]`` (e.g.
    :func:`~nnh.generative.divergence.fresh_probes`) draws fresh probes at every step, the
    same ones for all stages of a Heun/RK4 step, so the Hutchinson errors of the steps are
    independent (per-point spread ~ 1/sqrt(steps) of reusing one probe, still unbiased); a
    tensor ``[K, *x.shape]`` is reused at every step; ``None`` computes the exact divergence
    (``D`` VJPs, small ``D``). Cost: ``steps`` (Euler), ``2 * steps`` (Heun) or ``4 * steps``
    (RK4) calls of ``score_fn``, each with all probes batched into one vector-Jacobian product.

    Memory is flat in ``steps``: each step runs under ``torch.no_grad()`` (the divergence
    still uses autograd inside the step) and the result carries no graph. With
    ``differentiable=True`` the graph of every step is kept so the result can be
    back-propagated (to the model's parameters or ``x``); memory then grows with ``steps``.

    ``warn_non_finite``: if any value turns NaN/inf, a ``RuntimeWarning`` names the first
    such step and its time (tracked on the device: one host sync at the end, not per step).

    Example:
        >>> from nnh.generative.sde import VPSDE
        >>> x = torch.randn(8, 2)
        >>> log_likelihood_ode(VPSDE(), lambda t, y: -y, x, steps=20, probes=None).shape
        torch.Size([8])
    """
    check_steps(steps)
    method = check_ode_method(method)
    check_data(x)
    t0, t1 = check_time_window(sde, sde.epsilon if t0 is None else t0, sde.T if t1 is None else t1)
    dt = (t1 - t0) / steps
    batch = x.shape[0]
    if not differentiable:
        x = x.detach()
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
            n_bad = int((~torch.isfinite(out)).sum())
            where = (
                f"from ODE step {step + 1}/{steps} (t={t0 + step * dt:.6g} -> "
                f"{t0 + (step + 1) * dt:.6g})"
                if step >= 0
                else "in the prior log-density at t1"
            )
            nnh_warn(
                f"log_likelihood_ode: non-finite values (NaN/inf) {where}; {n_bad} of {batch} "
                f"log-likelihoods are not finite. Check the model's output near those times, "
                f"t0 (sigma(t0) must not be ~0) and the data scale",
                RuntimeWarning,
            )
    return out
