"""Adaptive Dormand-Prince 5(4) with error control, batched with one step size per sample.

The solved system is an ODE ``dy/ds = F(s, y)`` for a state ``y`` ``[B, ...]`` plus a scalar
per sample ``q`` ``[B]`` with ``dq/ds = D(s, y)`` (the log-density integral of the
likelihood): ``field(s, y) -> (F, D)`` with ``s`` of shape ``[B]``. One call of ``field``
is one model call.

Each sample has its own ``s``, step size and accept/reject decision, so a sample's answer
(and its error) does not depend on the other samples of the batch; every attempt evaluates
the whole batch at once (a finished sample takes steps of size 0). Error norm per sample: the
RMS over the ``D + 1`` components of ``(y, q)`` of ``err / (atol + rtol max(|old|, |new|))``
(the convention of Hairer's DOPRI5, scipy and torchdiffeq; the integral ``q`` is one
component, so its own error is held to ``sqrt(D + 1)`` tolerances at most). A step is accepted
when the norm is <= 1; the next step is ``h * clamp(0.9 norm^(-1/5), 0.2, 10)``.

Cost: the first-same-as-last (FSAL) property makes every attempt, accepted or rejected,
exactly 6 calls of ``field``; a solve costs ``2 + 6 * attempts`` calls (1 for the start's
slope, 1 for the initial step size of Hairer et al., II.4).

Pure: :func:`dopri5_step` maps a :class:`Dopri5State` to the next one; :func:`dopri5_solve`
loops it. Nothing is modified in place.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

__all__ = [
    "AugmentedField",
    "Dopri5State",
    "SolveStats",
    "check_tolerance",
    "dopri5_calls",
    "dopri5_solve",
    "dopri5_start",
    "dopri5_step",
]

AugmentedField = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

# Dormand & Prince (1980), the coefficients of torchdiffeq's and scipy's RK45.
_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_B5 = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
_E = tuple(b5 - b4 for b5, b4 in zip(_B5, _B4))
SAFETY, MIN_FACTOR, MAX_FACTOR = 0.9, 0.2, 10.0


class Dopri5State(NamedTuple):
    """Per-sample solver state: position ``s`` ``[B]``, ``y``, the integral ``q`` ``[B]``, the
    slopes there (``dy``, ``dq``: the FSAL stage), the next step size ``h`` ``[B]`` and ``done`` ``[B]``."""

    s: torch.Tensor
    y: torch.Tensor
    q: torch.Tensor
    dy: torch.Tensor
    dq: torch.Tensor
    h: torch.Tensor
    done: torch.Tensor


class SolveStats(NamedTuple):
    """Counts of one :func:`dopri5_solve`: ``calls`` of the field, step ``attempts`` (of the
    batch), and per sample ``accepted``/``rejected`` steps ``[B]``."""

    calls: int
    attempts: int
    accepted: torch.Tensor
    rejected: torch.Tensor


def dopri5_calls(attempts: int) -> int:
    """Field calls of a solve that made ``attempts`` step attempts: ``2 + 6 * attempts``.

    Example:
        >>> dopri5_calls(10)
        62
    """
    return 2 + 6 * attempts


def check_tolerance(name: str, value: Any) -> float:
    """``value`` as a float when it is a finite real number > 0, else an error naming ``name``.

    Example:
        >>> check_tolerance("rtol", 1e-5)
        1e-05
    """
    if isinstance(value, torch.Tensor) and value.ndim == 0 and not value.is_complex():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"{name} must be a real number > 0 (e.g. 1e-5), got {type(value).__name__} {value!r}"
        )
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0 (e.g. 1e-5), got {value!r}")
    return float(value)


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(v.shape + (1,) * (like.ndim - v.ndim))


def _norm(
    err_y: torch.Tensor,
    err_q: torch.Tensor,
    state: Dopri5State,
    y_new: torch.Tensor,
    q_new: torch.Tensor,
    rtol: float,
    atol: float,
) -> torch.Tensor:
    """The per-sample error norm ``[B]`` (<= 1: accept): the RMS over the ``D + 1`` components."""
    batch = err_y.shape[0]
    scale_y = atol + rtol * torch.maximum(state.y.abs(), y_new.abs())
    sq_y = (err_y / scale_y).reshape(batch, -1).pow(2)
    scale_q = atol + rtol * torch.maximum(state.q.abs(), q_new.abs())
    sq_q = (err_q / scale_q).pow(2)
    return ((sq_y.sum(dim=1) + sq_q) / (sq_y.shape[1] + 1)).sqrt()


def dopri5_start(
    field: AugmentedField,
    s0: torch.Tensor,
    s1: torch.Tensor,
    y0: torch.Tensor,
    q0: torch.Tensor,
    rtol: float,
    atol: float,
) -> Dopri5State:
    """The first state: slopes at ``s0`` and Hairer's initial step size (2 calls of ``field``).

    ``s0``, ``s1``: ``[B]`` start and end of each sample's interval (``s1 > s0``).

    Example:
        >>> f = lambda s, y: (-y, torch.zeros(y.shape[0]))
        >>> st = dopri5_start(f, torch.zeros(2), torch.ones(2), torch.ones(2, 3), torch.zeros(2), 1e-5, 1e-5)
        >>> st.h.shape, bool((st.h > 0).all())
        (torch.Size([2]), True)
    """
    dy0, dq0 = field(s0, y0)
    batch = y0.shape[0]
    scale = atol + rtol * y0.abs()
    d0 = (y0 / scale).reshape(batch, -1).pow(2).mean(1).sqrt()
    d1 = (dy0 / scale).reshape(batch, -1).pow(2).mean(1).sqrt()
    h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1)
    span = s1 - s0
    h0 = torch.minimum(h0, span)
    dy1, _ = field(s0 + h0, y0 + _bcast(h0, y0) * dy0)
    d2 = ((dy1 - dy0) / scale).reshape(batch, -1).pow(2).mean(1).sqrt() / h0
    big = torch.maximum(d1, d2)
    h1 = torch.where(
        big <= 1e-15,
        torch.maximum(torch.full_like(h0, 1e-6), h0 * 1e-3),
        (0.01 / big.clamp_min(1e-300)) ** (1 / 5),
    )
    h = torch.minimum(torch.minimum(100 * h0, h1), span)
    done = torch.zeros(batch, dtype=torch.bool, device=y0.device)
    return Dopri5State(s0, y0, q0, dy0, dq0, h, done)


def dopri5_step(
    field: AugmentedField, state: Dopri5State, s1: torch.Tensor, rtol: float, atol: float
) -> tuple[Dopri5State, torch.Tensor]:
    """One attempt of every sample (6 calls of ``field``): ``(next_state, accepted [B])``.

    Accepted samples move to ``s + h`` (``h`` clipped to end exactly at ``s1``) with the
    5th-order solution; rejected ones stay and retry with a smaller ``h``. Finished samples
    (``done``) do not move. A sample whose error is not finite is accepted with its
    non-finite values and marked done, so it does not stall the batch.

    Example:
        >>> f = lambda s, y: (-y, torch.ones(y.shape[0]))
        >>> st = dopri5_start(f, torch.zeros(1), torch.ones(1), torch.ones(1, 1), torch.zeros(1), 1e-6, 1e-6)
        >>> while not bool(st.done.all()):
        ...     st, _ = dopri5_step(f, st, torch.ones(1), 1e-6, 1e-6)
        >>> abs(st.y.item() - math.exp(-1)) < 1e-5, abs(st.q.item() - 1.0) < 1e-6
        (True, True)
    """
    h = torch.where(state.done, torch.zeros_like(state.h), torch.minimum(state.h, s1 - state.s))
    hy = _bcast(h, state.y)
    ks_y, ks_q = [state.dy], [state.dq]
    for i in range(1, 7):
        y_i, q_i = state.y, state.q
        for a, ky, kl in zip(_A[i], ks_y, ks_q):
            if a != 0.0:
                y_i = y_i + (a * hy) * ky
                q_i = q_i + (a * h) * kl
        if i == 6:
            y_new, q_new = y_i, q_i
        dy, dq = field(state.s + _C[i] * h, y_i)
        ks_y.append(dy)
        ks_q.append(dq)
    err_y = sum((e * hy) * k for e, k in zip(_E, ks_y) if e != 0.0)
    err_q = sum((e * h) * k for e, k in zip(_E, ks_q) if e != 0.0)
    norm = _norm(err_y, err_q, state, y_new, q_new, rtol, atol)
    bad = ~(
        torch.isfinite(norm)
        & torch.isfinite(q_new)
        & torch.isfinite(y_new).reshape(norm.shape[0], -1).all(1)
    )
    accept = ((norm <= 1.0) | bad) & ~state.done
    factor = (SAFETY * norm.clamp_min(1e-10).pow(-0.2)).clamp(MIN_FACTOR, MAX_FACTOR)
    factor = torch.where(accept, factor, factor.clamp(max=1.0))
    s_new = torch.where(accept, state.s + h, state.s)
    reached = accept & ((s_new >= s1) | (h >= s1 - state.s))
    s_new = torch.where(reached, s1, s_new)
    keep = _bcast(accept, state.y)
    next_state = Dopri5State(
        s=s_new,
        y=torch.where(keep, y_new, state.y),
        q=torch.where(accept, q_new, state.q),
        dy=torch.where(keep, ks_y[6], state.dy),
        dq=torch.where(accept, ks_q[6], state.dq),
        h=torch.where(state.done, state.h, torch.where(bad, state.h, h * factor)),
        done=state.done | reached | (bad & ~state.done),
    )
    return next_state, accept


def dopri5_solve(
    field: AugmentedField,
    s0: torch.Tensor,
    s1: torch.Tensor,
    y0: torch.Tensor,
    q0: torch.Tensor | None = None,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_attempts: int = 1000,
    on_attempt: Callable[[int, Dopri5State], None] | None = None,
    limit_name: str = "max_attempts",
) -> tuple[torch.Tensor, torch.Tensor, SolveStats]:
    """``(y(s1), q(s1), stats)`` of ``dy/ds = F``, ``dq/ds = D`` from ``s0`` (``[B]``) to ``s1`` (``[B]``).

    Stops when every sample has reached its ``s1``; raises ``RuntimeError`` naming
    ``max_attempts`` (the number of step attempts allowed, accepted or rejected) when some
    have not by then (``limit_name`` is how the error calls it). ``on_attempt(i, state)`` is called after attempt ``i`` (e.g. a progress
    bar or a ``no_grad`` bookkeeping hook); the loop itself keeps no history.

    Example:
        >>> lin = lambda s, y: (2.0 * y, y.sum(1))  # y = e^(2s) y0, q = int y
        >>> y, q, st = dopri5_solve(lin, torch.zeros(3), torch.ones(3), torch.ones(3, 1), rtol=1e-8, atol=1e-8)
        >>> round(y[0, 0].item(), 4), round(q[0].item(), 4), st.calls == 2 + 6 * st.attempts
        (7.3891, 3.1945, True)
    """
    if q0 is None:
        q0 = torch.zeros(y0.shape[0], dtype=y0.dtype, device=y0.device)
    state = dopri5_start(field, s0, s1, y0, q0, rtol, atol)
    accepted = torch.zeros(y0.shape[0], dtype=torch.long, device=y0.device)
    rejected = torch.zeros_like(accepted)
    attempts = 0
    while not bool(state.done.all()):
        if attempts >= max_attempts:
            left = int((~state.done).sum())
            raise RuntimeError(
                f"dopri5 did not finish within {limit_name}={max_attempts} step attempts: "
                f"{left} of {y0.shape[0]} samples are not at the end (rtol={rtol}, atol={atol}); "
                f"raise {limit_name} or loosen rtol/atol"
            )
        was_done = state.done
        state, accept = dopri5_step(field, state, s1, rtol, atol)
        accepted = accepted + accept.long()
        rejected = rejected + (~accept & ~was_done).long()
        attempts += 1
        if on_attempt is not None:
            on_attempt(attempts - 1, state)
    return state.y, state.q, SolveStats(dopri5_calls(attempts), attempts, accepted, rejected)
