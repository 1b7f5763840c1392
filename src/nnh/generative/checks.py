"""Argument checks shared by the samplers and the likelihood: each error names the argument.

They run before any work is done, so a bad call costs nothing and says what to change.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from nnh.generative.sde import SDE

__all__ = ["check_data", "check_sample_shape", "check_time_window"]


def check_time_window(sde: SDE, t0: Any, t1: Any) -> tuple[float, float]:
    """``(t0, t1)`` as floats when ``0 <= t0 < t1 <= sde.T`` and ``sigma(t0) > 0``, else ``ValueError``.

    ``t1`` past ``T`` has no prior to end on; a ``t0`` where ``sigma(t0) = 0`` (``t0 = 0`` on
    VP and sub-VP) makes the score ``model / sigma`` infinite. A 0-d tensor counts as a number.

    Example:
        >>> from nnh.generative.sde import VPSDE
        >>> check_time_window(VPSDE(), 1e-3, 1.0)
        (0.001, 1.0)
    """
    window = []
    for name, value in (("t0", t0), ("t1", t1)):
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
            value = value.item()  # a 0-d (or one-element) tensor is a number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            got = (
                f"a tensor of shape {tuple(value.shape)}"
                if isinstance(value, torch.Tensor)
                else type(value).__name__
            )
            raise TypeError(
                f"{name} must be a number or a 0-d tensor (a time in [0, T]), got {got}"
            )
        if not math.isfinite(value):
            raise ValueError(f"{name} must be a finite time in [0, T], got {value!r}")
        window.append(float(value))
    t0, t1 = window
    if t1 > sde.T:
        raise ValueError(
            f"t1={t1} is past the SDE's end time T={sde.T}: the prior is the marginal at T only; "
            f"pass t1 <= {sde.T} (default: T)"
        )
    if not (0.0 <= t0 < t1):
        raise ValueError(f"need 0 <= t0 < t1, got t0={t0}, t1={t1}")
    sigma0 = float(sde.sigma(t0))
    if not (math.isfinite(sigma0) and sigma0 > 0):
        raise ValueError(
            f"t0={t0} gives sigma(t0)={sigma0} for {type(sde).__name__}: the score "
            f"model(t, x) / sigma(t) is not finite there; use t0 >= sde.epsilon ({sde.epsilon})"
        )
    return t0, t1


def check_data(x: Any, name: str = "x") -> torch.Tensor:
    """``x`` when it is a floating tensor ``[B, ...]`` with ``B >= 1`` and no empty dimension, else an error.

    Example:
        >>> check_data(torch.zeros(2, 3)).shape
        torch.Size([2, 3])
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor of shape [B, ...], got {type(x).__name__}; "
            f"convert it with torch.as_tensor({name}) or pass a Dataset/DataLoader"
        )
    if x.ndim < 1 or x.shape[0] < 1 or x.numel() == 0:
        raise ValueError(
            f"{name} must hold at least one sample of shape [B, ...] with B >= 1 and no empty "
            f"dimension, got shape {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    return x


def check_sample_shape(shape: Any) -> tuple[int, ...]:
    """``shape`` as a tuple ``(N, ...)`` of positive ints, else a clear error.

    Example:
        >>> check_sample_shape([4, 2])
        (4, 2)
    """
    if isinstance(shape, torch.Size):
        shape = tuple(shape)
    if not isinstance(shape, (tuple, list)):
        raise TypeError(f"shape must be a tuple (N, ...), got {type(shape).__name__}")
    if len(shape) == 0:
        raise ValueError(
            "shape=() has no batch dimension: pass (N, *sample_shape), e.g. (N, 2) for N 2-d samples"
        )
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
        raise ValueError(f"shape must be positive ints (N, ...), got {tuple(shape)!r}")
    return tuple(shape)
