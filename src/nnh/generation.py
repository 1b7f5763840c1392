"""The shell side of ``NNHandler.sample`` and ``NNHandler.log_likelihood``.

Everything stateful lives here: the handler's device, EMA weights, eval mode, progress bars,
the global RNG and the DDP split. The computations are the pure functions of
:mod:`nnh.generative`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

from nnh.generative.checks import check_data
from nnh.generative.divergence import PROBE_KINDS, fresh_probes
from nnh.generative.likelihood import log_likelihood_ode

__all__ = ["handler_log_likelihood", "progress_flag"]


def progress_flag(pbar: bool, verbose: int | bool | None) -> bool:
    """Whether to show a progress bar: ``verbose`` (score_models' keyword) wins when given.

    Example:
        >>> progress_flag(True, 0), progress_flag(False, 1), progress_flag(True, None)
        (False, True, True)
    """
    if verbose is None:
        return bool(pbar)
    if isinstance(verbose, int):  # bool is an int
        return bool(verbose)
    raise TypeError(f"verbose must be an int or bool (0 = silent), got {type(verbose).__name__}")


class _EvalSession:
    """Eval mode and (optionally) EMA weights for the duration of a ``with`` block."""

    def __init__(self, handler: Any, apply_ema: bool):
        self.handler, self.apply_ema = handler, apply_ema

    def __enter__(self) -> None:
        self.was_training = self.handler.module.training
        self.handler.module.eval()
        self.ema = self.handler._ema_weights(self.apply_ema)
        self.ema.__enter__()

    def __exit__(self, *exc: object) -> None:
        try:
            self.ema.__exit__(*exc)
        finally:
            if self.was_training:
                self.handler._train_mode()


def _check_likelihood_options(n_cotangent_vectors: Any, noise_type: Any) -> None:
    if (
        isinstance(n_cotangent_vectors, bool)
        or not isinstance(n_cotangent_vectors, int)
        or n_cotangent_vectors < 1
    ):
        raise ValueError(f"n_cotangent_vectors must be an int >= 1, got {n_cotangent_vectors!r}")
    if noise_type not in PROBE_KINDS:
        raise ValueError(f"noise_type={noise_type!r}: use 'rademacher' or 'gaussian'")


def _likelihood_of_batch(
    handler: Any,
    x: torch.Tensor,
    args: tuple[Any, ...],
    *,
    ode_steps: int,
    n_cotangent_vectors: int,
    noise_type: str,
    fresh: bool,
    method: str,
    t0: float | None,
    t1: float | None,
    differentiable: bool,
    progress: Callable[[int], Any] | Any | None,
) -> torch.Tensor:
    shape = (n_cotangent_vectors, *x.shape)
    if fresh:
        probes: Any = fresh_probes(shape, noise_type, device=x.device, dtype=x.dtype)
    else:
        probes = fresh_probes(shape, noise_type, device=x.device, dtype=x.dtype)(0)
    return log_likelihood_ode(
        handler.sde,
        lambda t, y: handler.score(t, y, *args),
        x,
        steps=ode_steps,
        probes=probes,
        method=method,
        t0=t0,
        t1=t1,
        progress=progress,
        differentiable=differentiable,
    )


def handler_log_likelihood(
    handler: Any,
    x: Any,
    args: tuple[Any, ...],
    *,
    ode_steps: int,
    n_cotangent_vectors: int = 1,
    noise_type: str = "rademacher",
    method: str = "Euler",
    t0: float | None = None,
    t1: float | None = None,
    apply_ema: bool = True,
    pbar: bool = False,
    verbose: int | bool | None = None,
    fresh_probes: bool = True,
    differentiable: bool = False,
) -> torch.Tensor | None:
    """``NNHandler.log_likelihood``: see its docstring. Checks every argument before any work."""
    handler._require_sde("log_likelihood")
    _check_likelihood_options(n_cotangent_vectors, noise_type)
    show = progress_flag(pbar, verbose)
    check_data(x)
    if not handler._dist.is_main:
        return None
    device = handler.device
    x = x.to(device)
    args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
    progress = tqdm(total=ode_steps, desc="Log-likelihood", disable=not show, dynamic_ncols=True)
    try:
        with _EvalSession(handler, apply_ema):
            out = _likelihood_of_batch(
                handler,
                x,
                args,
                ode_steps=ode_steps,
                n_cotangent_vectors=n_cotangent_vectors,
                noise_type=noise_type,
                fresh=fresh_probes,
                method=method,
                t0=t0,
                t1=t1,
                differentiable=differentiable,
                progress=progress,
            )
    finally:
        progress.close()
    return out if differentiable else out.detach()
