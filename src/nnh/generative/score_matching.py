"""Denoising score matching for a model that outputs ``sigma(t) * score``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from nnh.generative.sde import SDE

__all__ = ["denoising_score_matching_loss"]


def denoising_score_matching_loss(
    model: Callable[..., torch.Tensor],
    sde: SDE,
    x: torch.Tensor,
    *args: Any,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The DSM loss (0-d mean over the batch) for ``model(t, x_t, *args) ~ sigma(t) * score``.

    With ``t ~ U(epsilon, T)`` (shape ``[B]``), ``z ~ N(0, I)`` and
    ``x_t = mu(t) x + sigma(t) z``, the conditional score is ``-z / sigma(t)``, so

        ``loss = mean_b sum_dims (model(t, x_t, *args) + z)^2``,

    which is ``E[lambda(t) ||s_theta - grad log p(x_t | x)||^2]`` with weighting
    ``lambda(t) = sigma(t)^2``. ``t`` and ``noise`` may be passed explicitly (deterministic);
    what is not passed is drawn from ``generator`` (or torch's default generator if ``None``).
    ``*args`` (e.g. a conditioning tensor) are forwarded to the model.

    Example:
        >>> from nnh.generative.sde import VPSDE
        >>> x = torch.randn(16, 2)
        >>> model = lambda t, xt: torch.zeros_like(xt)
        >>> denoising_score_matching_loss(model, VPSDE(), x, generator=torch.Generator().manual_seed(0)).ndim
        0
    """
    if x.ndim < 1:
        raise ValueError("x must have shape [B, ...]")
    batch = x.shape[0]
    if t is None:
        u = torch.rand(batch, generator=generator, device=x.device, dtype=x.dtype)
        t = sde.epsilon + (sde.T - sde.epsilon) * u
    elif t.shape != (batch,):
        raise ValueError(f"t must have shape [B] = [{batch}], got {tuple(t.shape)}")
    if noise is None:
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    elif noise.shape != x.shape:
        raise ValueError(f"noise must be shaped like x {tuple(x.shape)}, got {tuple(noise.shape)}")
    mean, std = sde.marginal_prob(x, t)
    x_t = mean + std * noise
    residual = model(t, x_t, *args) + noise
    return residual.pow(2).reshape(batch, -1).sum(dim=1).mean()
