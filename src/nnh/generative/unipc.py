"""The pure step of UniPC (Zhao et al. 2023), the B(h) = e^h - 1 ("bh2") variant, data prediction.

UniPC is a multistep predictor (UniP, for order 2 the same update as DPM-Solver++(2M)) plus a
corrector (UniC) that costs no model call: the denoised value ``D(x_t)`` that the next
predictor needs anyway is first used to correct ``x_t`` itself, with the exponential-integrator
quadrature through the history and ``D(x_t)``. A predictor of order ``p`` plus the corrector
is of order ``p + 1``. The history stores ``D`` of the *uncorrected* ``x_t`` (as in the
authors' code), so each step calls the model once.

In the noise level ``lambda = sigma / mu`` with ``h = log(lambda_s / lambda_t)``: the first-order
part is ``(sigma_t / sigma_s) x_s + mu_t (1 - e^{-h}) D_s``; the higher-order part is
``mu_t (1 - e^{-h}) sum_k rho_k D1_k`` with ``D1_k = (D_k - D_s) / r_k`` the divided differences
of the history at ``r_k = (log lambda_s - log lambda_k) / h`` and ``rho`` solved from
UniPC's order conditions ``sum_k rho_k r_k^(i-1) = i! phi_(i+1)(h) / phi_1(h)`` (where
``phi_(i+1)`` here is the ``h``-scaled ``h_phi_k`` of the authors' code).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from nnh.generative.multistep import step_start
from nnh.generative.sde import SDE
from nnh.generative.steps import ScoreFn

__all__ = ["UniPCHistory", "unipc_step"]


class UniPCHistory(NamedTuple):
    """What a UniPC step hands to the next: denoised values and ``log lambda`` (newest first), the
    state the last predictor stepped from, and that predictor's order (0: no step yet).

    Example:
        >>> UniPCHistory().order
        0
    """

    denoised: tuple[torch.Tensor, ...] = ()
    log_levels: tuple[float, ...] = ()
    x_prev: torch.Tensor | None = None
    order: int = 0
    sigma_prev: float = 1.0


def _b_h(h: float, variant: str) -> float:
    """UniPC's ``B(h)`` at the step ``-h``: ``e^{-h} - 1`` (bh2) or ``-h`` (bh1)."""
    return math.expm1(-h) if variant == "bh2" else -h


def _coefficients(h: float, order: int, variant: str) -> list[float]:
    """``(b, B_h)`` of the order conditions: ``b_i = i! h_phi_(i+1)(-h) / B_h`` for ``i < order``."""
    hh = -h
    h_phi_1 = math.expm1(hh)  # e^{-h} - 1
    h_phi_k = h_phi_1 / hh - 1
    b_h = _b_h(h, variant)
    b, factorial = [], 1
    for i in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return b


def _solve(rks: list[float], b: list[float]) -> list[float]:
    n = len(rks)
    r = torch.tensor([[rk ** (i) for rk in rks] for i in range(n)], dtype=torch.float64)
    return torch.linalg.solve(r, torch.tensor(b[:n], dtype=torch.float64)).tolist()


def _update(
    x: torch.Tensor,
    m0: torch.Tensor,
    diffs: list[torch.Tensor],
    rhos: list[float],
    ratio: float,
    mu_t: float,
    h: float,
    variant: str,
) -> torch.Tensor:
    """``ratio x + mu_t (1 - e^{-h}) m0 - mu_t B(h) sum rho_k D1_k``."""
    out = ratio * x + mu_t * -math.expm1(-h) * m0
    scale = -mu_t * _b_h(h, variant)
    for rho, d in zip(rhos, diffs):
        out = out + (scale * rho) * d
    return out


def _differences(
    history: UniPCHistory, m0: torch.Tensor, log_s0: float, h: float, count: int, skip: int
) -> tuple[list[float], list[torch.Tensor]]:
    """``r_k`` and ``(D_k - m0) / r_k`` for the ``count`` history entries after ``skip``."""
    rks, diffs = [], []
    for k in range(skip, skip + count):
        rk = (log_s0 - history.log_levels[k]) / h  # negative: earlier = noisier
        rks.append(rk)
        diffs.append((history.denoised[k] - m0) / rk)
    return rks, diffs


def unipc_step(
    sde: SDE,
    score_fn: ScoreFn,
    t: float,
    t_next: float,
    x: torch.Tensor,
    history: UniPCHistory | None = None,
    order: int = 2,
    final_order: int | None = None,
    variant: str = "bh2",
) -> tuple[torch.Tensor, UniPCHistory]:
    """One UniPC step: correct ``x`` at ``t`` (when there is history), then predict ``t_next < t``.

    Returns ``(x_next, new_history)``. Calls ``score_fn`` once, with ``t`` as a tensor of
    shape ``[B]``: its denoised value corrects ``x`` (UniC, of the order the last predictor
    used) and drives the predictor (UniP) of order ``min(order, 1 + len(history.denoised))``,
    or ``final_order`` when given (a lower-order last step). ``variant``: UniPC's ``B(h)``,
    ``"bh2"`` (``e^h - 1``; order 2 is then DPM-Solver++(2M)'s predictor) or ``"bh1"`` (``h``). When ``lambda(t_next) = 0`` the
    step returns the (corrected) denoised value. Exact when the data are a point.

    Example:
        >>> from nnh.generative.sde import VESDE
        >>> sde = VESDE(); x = torch.ones(2, 3)
        >>> score = lambda t, y: (0.5 - y) / sde.sigma(t).reshape(-1, 1) ** 2  # data = 0.5
        >>> y, h = unipc_step(sde, score, 1.0, 0.5, x)
        >>> torch.allclose(y, 0.5 + (x - 0.5) * float(sde.sigma(0.5) / sde.sigma(1.0))), h.order
        (True, 1)
    """
    if isinstance(order, bool) or order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
    if final_order is not None and (isinstance(final_order, bool) or final_order not in (1, 2, 3)):
        raise ValueError(f"final_order must be None, 1, 2 or 3, got {final_order!r}")
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"variant must be 'bh1' or 'bh2', got {variant!r}")
    history = UniPCHistory() if history is None else history
    mu0, sigma0, _, mu1, sigma1, lam1, denoised, log_lam = step_start(sde, score_fn, t, t_next, x)
    if history.x_prev is not None and history.order >= 1:
        x = _correct(history, denoised, log_lam, mu0, sigma0, variant)
    new_history_denoised = (denoised, *history.denoised[:2])
    new_levels = (log_lam, *history.log_levels[:2])
    use = min(order if final_order is None else final_order, 1 + len(history.denoised))
    if lam1 == 0:
        return denoised, UniPCHistory(new_history_denoised, new_levels, x, use, sigma0)
    h = log_lam - math.log(lam1)
    rks, diffs = _differences(history, denoised, log_lam, h, use - 1, 0)
    if use == 1:
        rhos = []
    elif use == 2:
        rhos = [0.5]
    else:
        rhos = _solve(rks, _coefficients(h, use, variant))
    x_next = _update(x, denoised, diffs, rhos, sigma1 / sigma0, mu1, h, variant)
    return x_next, UniPCHistory(new_history_denoised, new_levels, x, use, sigma0)


def _correct(
    history: UniPCHistory,
    model_t: torch.Tensor,
    log_t: float,
    mu_t: float,
    sigma_t: float,
    variant: str,
) -> torch.Tensor:
    """UniC: re-take the last step from ``history.x_prev`` now that ``D(x_t)`` is known."""
    log_s0 = history.log_levels[0]
    h = log_s0 - log_t
    m0 = history.denoised[0]
    rks, diffs = _differences(history, m0, log_s0, h, history.order - 1, 1)
    if history.order == 1:
        rhos = [0.5]
    else:
        rhos = _solve([*rks, 1.0], _coefficients(h, history.order, variant))
    diffs = [*diffs, model_t - m0]  # D1_t, at r = 1
    ratio = sigma_t / history.sigma_prev
    return _update(history.x_prev, m0, diffs, rhos, ratio, mu_t, h, variant)
