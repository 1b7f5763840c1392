"""Log-likelihood through the probability-flow ODE (instantaneous change of variables)."""

from __future__ import annotations

import torch

from nnh.generative.sampling import Progress, check_steps, notify_progress
from nnh.generative.sde import SDE
from nnh.generative.steps import ScoreFn, check_ode_method, ode_likelihood_step

__all__ = ["log_likelihood_ode"]


def log_likelihood_ode(
    sde: SDE,
    score_fn: ScoreFn,
    x: torch.Tensor,
    *,
    steps: int,
    probes: torch.Tensor | None,
    method: str = "Euler",
    t0: float | None = None,
    t1: float | None = None,
    progress: Progress | None = None,
) -> torch.Tensor:
    """``log p_t0(x)`` in nats per sample, shape ``[B]``, by integrating the probability-flow ODE.

    Integrates ``dx/dt = f - g^2 score / 2`` from ``t0`` (default ``sde.epsilon``) to ``t1``
    (default ``sde.T``) in ``steps`` uniform steps of ``method`` (see
    :func:`~nnh.generative.steps.ode_likelihood_step`) and returns
    ``sde.prior_log_prob(x_t1) + int_t0^t1 div F dt``. This is the density of the model's
    marginal at ``t0`` (not of the noise-free data): for ``t0 = epsilon`` tiny the two agree
    to ``O(sigma(epsilon)^2)``. The answer also assumes the marginal at ``t1`` is the prior.

    ``probes`` ``[K, *x.shape]`` (e.g. from :func:`~nnh.generative.divergence.sample_probes`)
    are reused at every step; ``None`` computes the exact divergence (``D`` VJPs, small ``D``).
    Cost: ``steps`` (Euler), ``2 * steps`` (Heun) or ``4 * steps`` (RK4) calls of
    ``score_fn``, each with all probes batched into one vector-Jacobian product. Wrap in
    ``torch.no_grad()`` when no gradient through the result is needed.

    Example:
        >>> from nnh.generative.sde import VPSDE
        >>> x = torch.randn(8, 2)
        >>> log_likelihood_ode(VPSDE(), lambda t, y: -y, x, steps=20, probes=None).shape
        torch.Size([8])
    """
    check_steps(steps)
    method = check_ode_method(method)
    t0 = sde.epsilon if t0 is None else float(t0)
    t1 = sde.T if t1 is None else float(t1)
    if not (0.0 <= t0 < t1):
        raise ValueError(f"need 0 <= t0 < t1 for the likelihood ODE, got t0={t0}, t1={t1}")
    dt = (t1 - t0) / steps
    batch = x.shape[0]
    integral = torch.zeros(batch, dtype=x.dtype, device=x.device)
    for i in range(steps):
        t = torch.full((batch,), t0 + i * dt, dtype=x.dtype, device=x.device)
        x, delta = ode_likelihood_step(sde, score_fn, t, x, dt, probes, method)
        integral = integral + delta
        notify_progress(progress, i)
    return sde.prior_log_prob(x) + integral
