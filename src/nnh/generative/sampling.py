"""Ancestral sampling with the reverse-time SDE (Euler-Maruyama), from the prior at ``T``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from nnh.generative.checks import check_sample_shape
from nnh.generative.sde import SDE
from nnh.generative.steps import ScoreFn, em_sde_step
from nnh.warn import warn as nnh_warn

__all__ = ["Progress", "check_steps", "notify_progress", "sample_reverse_sde"]

Progress = Callable[[int], Any] | Any  # a callable(step_index) or an object with .update(n)


def notify_progress(progress: Progress | None, step: int) -> None:
    """Report a finished step: ``progress.update(1)`` for tqdm-like objects, else ``progress(step)``.

    Example:
        >>> seen = []; notify_progress(seen.append, 3); seen
        [3]
    """
    if progress is None:
        return
    if hasattr(progress, "update"):
        progress.update(1)
    elif callable(progress):
        progress(step)
    else:
        raise TypeError(
            f"progress must be a callable(step) or have .update(n), got {type(progress).__name__}"
        )


def check_steps(steps: int) -> int:
    """``steps`` as an int >= 1, or a clear error.

    Example:
        >>> check_steps(10)
        10
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    return steps


def sample_reverse_sde(
    sde: SDE,
    score_fn: ScoreFn,
    shape: torch.Size | tuple[int, ...],
    steps: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    guidance_fn: ScoreFn | None = None,
    guidance_factor: float = 1.0,
    stop_on_nan: bool = True,
    progress: Progress | None = None,
    t_end: float | None = None,
) -> torch.Tensor:
    """Samples ``[B, ...]`` from ``steps`` Euler-Maruyama steps of the reverse SDE, ``T -> t_end``.

    Starts from ``sde.prior(shape)``; step ``i`` goes from ``t_i = T - i dt`` to ``t_i - dt``
    with ``dt = (T - t_end) / steps`` (``t_end`` defaults to ``sde.epsilon``) and calls
    ``score_fn(t, x)`` exactly once, with ``t`` a tensor of shape ``[B]`` filled with ``t_i``
    (``guidance_fn`` likewise, when given). The last step returns the noise-free mean.

    Randomness: the prior sample and all step noises come from ``generator`` (the device
    defaults to the generator's); with ``generator=None`` they come from torch's default
    generator. The state is detached between steps (no autograd graph across steps; a
    ``guidance_fn`` may still use autograd inside a step). Run under ``torch.no_grad()``
    unless the guidance needs gradients.

    ``stop_on_nan``: after each step the state is checked for NaN/inf; on the first
    non-finite value a ``RuntimeWarning`` names the step and ``t``, and the function returns
    the last all-finite state — i.e. the (still noisy) samples at time ``t_i`` of the failing
    step, not samples of the data distribution. Set ``False`` to skip the check (no device
    sync per step) and return whatever comes out.

    ``progress``: a callable called with the step index after each step, or a tqdm-like
    object whose ``update(1)`` is called.

    Example:
        >>> from nnh.generative.sde import VPSDE
        >>> g = torch.Generator().manual_seed(0)
        >>> x = sample_reverse_sde(VPSDE(), lambda t, x: -x, (16, 2), 50, generator=g)
        >>> x.shape
        torch.Size([16, 2])
    """
    check_steps(steps)
    shape = check_sample_shape(shape)
    t_end = sde.epsilon if t_end is None else float(t_end)
    if not (0.0 <= t_end < sde.T):
        raise ValueError(f"t_end must be in [0, T) = [0, {sde.T}), got {t_end}")
    if device is None and generator is not None:
        device = generator.device
    x = sde.prior(shape, generator=generator, device=device, dtype=dtype)
    dt = (sde.T - t_end) / steps
    batch = shape[0]
    for i in range(steps):
        t_i = sde.T - i * dt
        t = torch.full((batch,), t_i, dtype=x.dtype, device=x.device)
        last = i == steps - 1
        noise = (
            torch.zeros_like(x)
            if last
            else torch.randn(shape, generator=generator, device=x.device, dtype=x.dtype)
        )
        x_next, x_mean = em_sde_step(
            sde, score_fn, t, x, dt, noise, guidance_fn=guidance_fn, guidance_factor=guidance_factor
        )
        x_next = (x_mean if last else x_next).detach()
        if stop_on_nan and not bool(torch.isfinite(x_next).all()):
            nnh_warn(
                f"sample_reverse_sde: non-finite values (NaN/inf) after step {i + 1}/{steps} "
                f"(t={t_i:.6g} -> {t_i - dt:.6g}); returning the last finite state, the noisy "
                f"samples at t={t_i:.6g}",
                RuntimeWarning,
            )
            return x
        x = x_next
        notify_progress(progress, i)
    return x
