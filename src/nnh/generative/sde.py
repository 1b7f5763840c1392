"""Linear forward SDEs of score-based generative modelling: VE, VP and sub-VP.

Every SDE here has the linear form ``dx = a(t) x dt + g(t) dW`` on ``t in [0, T]``, so its
perturbation kernel is Gaussian: ``x_t = mu(t) x_0 + sigma(t) z`` with ``z ~ N(0, I)``.
Time is measured in units of ``T``: the schedules are written in ``s = t / T`` so a process
with ``T = 10`` is the ``T = 1`` process run ten times slower, and every identity (mean,
variance, drift, diffusion) holds for any ``T > 0``.

Conventions (shared by every method):

* ``t`` is a Python number, a 0-d tensor or a tensor of shape ``[B]``; ``x`` has shape
  ``[B, ...]``. Methods that take ``x`` return tensors that broadcast against ``x``
  (``t`` of shape ``[B]`` becomes ``[B, 1, ..., 1]``).
* ``sigma(t)`` and ``mu(t)`` are elementwise in ``t`` and keep its shape.
* Nothing here reads the global RNG when a generator is given; nothing mutates its inputs.

An SDE is described by :meth:`SDE.config` (plain Python values, including the import path of
the class under ``"class"``) and rebuilt with :meth:`SDE.from_config`, so checkpoints record it
without pickling.
"""

from __future__ import annotations

import importlib
import math
from typing import Any

import attrs
import torch

__all__ = ["SDE", "VESDE", "VPSDE", "SubVPSDE", "as_time_tensor", "expand_time"]

Time = float | torch.Tensor


def as_time_tensor(t: Time, like: torch.Tensor | None = None) -> torch.Tensor:
    """``t`` as a floating tensor (on ``like``'s device and dtype when given).

    Example:
        >>> as_time_tensor(0.5).dtype == torch.get_default_dtype()
        True
    """
    if like is not None:
        return torch.as_tensor(t, dtype=like.dtype, device=like.device)
    if isinstance(t, torch.Tensor):
        return t if t.is_floating_point() else t.to(torch.get_default_dtype())
    return torch.tensor(float(t), dtype=torch.get_default_dtype())


def expand_time(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape per-sample ``values`` (0-d or ``[B]``) so they broadcast against ``x`` ``[B, ...]``.

    Example:
        >>> expand_time(torch.ones(3), torch.zeros(3, 2, 5)).shape
        torch.Size([3, 1, 1])
    """
    if values.ndim == 0:
        return values
    if values.ndim > x.ndim:
        raise ValueError(
            f"time tensor of shape {tuple(values.shape)} has more dimensions than x of shape "
            f"{tuple(x.shape)}; pass t as a scalar or a tensor of shape [B]"
        )
    return values.reshape(values.shape + (1,) * (x.ndim - values.ndim))


def _check_positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


class SDE:
    """Base class of the forward SDEs ``dx = f(t, x) dt + g(t) dW`` on ``[0, T]``.

    Subclasses implement :meth:`sigma`, :meth:`mu`, :meth:`drift_coefficient`,
    :meth:`diffusion_coefficient` and :attr:`prior_std`; the rest is shared.

    Example:
        >>> sde = VPSDE()
        >>> mean, std = sde.marginal_prob(torch.ones(4, 2), torch.full((4,), 0.5))
        >>> mean.shape, std.shape
        (torch.Size([4, 2]), torch.Size([4, 1]))
    """

    T: float
    epsilon: float

    # -- schedule (elementwise in t) -------------------------------------------------------
    def sigma(self, t: Time) -> torch.Tensor:
        """Marginal standard deviation of the perturbation kernel at ``t``."""
        raise NotImplementedError

    def mu(self, t: Time) -> torch.Tensor:
        """Mean coefficient of the perturbation kernel: ``E[x_t | x_0] = mu(t) x_0``."""
        raise NotImplementedError

    def drift_coefficient(self, t: Time) -> torch.Tensor:
        """``a(t)`` in the linear drift ``f(t, x) = a(t) x``."""
        raise NotImplementedError

    def diffusion_coefficient(self, t: Time) -> torch.Tensor:
        """``g(t)``, the diffusion coefficient."""
        raise NotImplementedError

    @property
    def prior_std(self) -> float:
        """Standard deviation of the isotropic Gaussian prior ``N(0, prior_std^2 I)`` at ``T``."""
        raise NotImplementedError

    # -- shared API ---------------------------------------------------------------------------
    def drift(self, t: Time, x: torch.Tensor) -> torch.Tensor:
        """``f(t, x)``, same shape as ``x``.

        Example:
            >>> VPSDE().drift(0.0, torch.ones(2, 3))[0, 0].item()  # -beta_min / 2
            -0.05...
        """
        return expand_time(self.drift_coefficient(as_time_tensor(t, x)), x) * x

    def diffusion(self, t: Time, x: torch.Tensor) -> torch.Tensor:
        """``g(t)`` shaped to broadcast against ``x`` (``[B, 1, ..., 1]`` for ``t`` of shape ``[B]``).

        Example:
            >>> VESDE().diffusion(torch.zeros(2), torch.ones(2, 3)).shape
            torch.Size([2, 1])
        """
        return expand_time(self.diffusion_coefficient(as_time_tensor(t, x)), x)

    def marginal_prob(self, x: torch.Tensor, t: Time) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, std)`` of ``x_t`` given ``x_0 = x``; ``std`` broadcasts against ``x``.

        Example:
            >>> mean, std = VESDE().marginal_prob(torch.ones(2, 3), 1.0)
            >>> mean.tolist()[0], round(std.item(), 3)
            ([1.0, 1.0, 1.0], 50.0)
        """
        tt = as_time_tensor(t, x)
        return expand_time(self.mu(tt), x) * x, expand_time(self.sigma(tt), x)

    def prior(
        self,
        shape: torch.Size | tuple[int, ...],
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """A sample of ``N(0, prior_std^2 I)`` of the given shape.

        The noise comes from ``generator`` when given (and the device defaults to the
        generator's), otherwise from torch's default generator.

        Example:
            >>> g = torch.Generator().manual_seed(0)
            >>> VPSDE().prior((5, 2), generator=g).shape
            torch.Size([5, 2])
        """
        if device is None and generator is not None:
            device = generator.device
        z = torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
        return z * self.prior_std

    def prior_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Log density of the prior at ``x`` ``[B, ...]``, summed over non-batch dims: shape ``[B]``.

        Example:
            >>> round(VPSDE().prior_log_prob(torch.zeros(1, 2)).item(), 4)  # -log(2 pi)
            -1.8379
        """
        if x.ndim == 0:
            raise ValueError("prior_log_prob expects x of shape [B, ...], got a 0-d tensor")
        s = self.prior_std
        flat = x.reshape(x.shape[0], -1)
        d = flat.shape[1]
        return -0.5 * (flat * flat).sum(dim=1) / s**2 - 0.5 * d * math.log(2 * math.pi * s**2)

    # -- serialisation --------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """Plain-Python description: the constructor arguments plus ``"class"`` (import path).

        Example:
            >>> VPSDE(T=2.0).config()["class"]
            'nnh.generative.sde.VPSDE'
        """
        cls = type(self)
        out: dict[str, Any] = {"class": f"{cls.__module__}.{cls.__qualname__}"}
        for field in attrs.fields(cls):
            out[field.name] = float(getattr(self, field.name))
        return out

    @staticmethod
    def from_config(config: dict[str, Any]) -> SDE:
        """Rebuild an SDE from :meth:`config`'s dict (the class is found by its import path).

        Only subclasses of :class:`SDE` are accepted, so a checkpoint cannot name an
        arbitrary callable.

        Example:
            >>> SDE.from_config(VPSDE(T=2.0).config()) == VPSDE(T=2.0)
            True
        """
        if not isinstance(config, dict) or "class" not in config:
            raise ValueError(
                f"an SDE config must be a dict with a 'class' key (import path), got {config!r}"
            )
        kwargs = {k: v for k, v in config.items() if k != "class"}
        cls = _resolve_sde_class(str(config["class"]))
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise ValueError(
                f"cannot rebuild {config['class']} from config {config!r}: {exc}"
            ) from exc


def _resolve_sde_class(path: str) -> type[SDE]:
    builtin = {f"{__name__}.{c.__name__}": c for c in (VESDE, VPSDE, SubVPSDE)}
    if path in builtin:
        return builtin[path]
    module_name, _, name = path.rpartition(".")
    if not module_name:
        raise ValueError(f"SDE class path {path!r} is not of the form 'package.module.ClassName'")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot import SDE class {path!r}: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, SDE)):
        raise ValueError(f"{path!r} is not a subclass of nnh.generative.sde.SDE")
    return cls


def _check_time_window(T: float, epsilon: float) -> None:
    _check_positive("T", T)
    if not (math.isfinite(epsilon) and 0 < epsilon < T):
        raise ValueError(f"epsilon must be in (0, T) = (0, {T}), got {epsilon!r}")


def _check_beta(beta_min: float, beta_max: float) -> None:
    _check_positive("beta_min", beta_min)
    _check_positive("beta_max", beta_max)
    if beta_min > beta_max:
        raise ValueError(
            f"beta_min must be <= beta_max, got beta_min={beta_min}, beta_max={beta_max}"
        )


@attrs.frozen
class VESDE(SDE):
    """Variance exploding SDE: ``dx = g(t) dW``, ``sigma(t) = sigma_min (sigma_max/sigma_min)^(t/T)``.

    ``g(t) = sigma(t) sqrt(2 log(sigma_max/sigma_min) / T)``, ``mu(t) = 1``, prior
    ``N(0, sigma_max^2 I)``. ``sigma(t)^2 = sigma_min^2 + int_0^t g^2``: the kernel treats
    ``x_0`` as already perturbed with ``sigma_min`` (the usual convention).

    Example:
        >>> sde = VESDE(sigma_min=0.01, sigma_max=50.0)
        >>> round(sde.sigma(1.0).item(), 3), sde.mu(0.3).item()
        (50.0, 1.0)
    """

    sigma_min: float = attrs.field(default=0.01, converter=float)
    sigma_max: float = attrs.field(default=50.0, converter=float)
    T: float = attrs.field(default=1.0, converter=float)
    epsilon: float = attrs.field(default=1e-5, converter=float)

    def __attrs_post_init__(self) -> None:
        _check_positive("sigma_min", self.sigma_min)
        _check_positive("sigma_max", self.sigma_max)
        if self.sigma_min >= self.sigma_max:
            raise ValueError(
                f"sigma_min must be < sigma_max, got sigma_min={self.sigma_min}, sigma_max={self.sigma_max}"
            )
        _check_time_window(self.T, self.epsilon)

    @property
    def _log_ratio(self) -> float:
        return math.log(self.sigma_max / self.sigma_min)

    def sigma(self, t: Time) -> torch.Tensor:
        tt = as_time_tensor(t)
        return torch.exp(math.log(self.sigma_min) + (tt / self.T) * self._log_ratio)

    def mu(self, t: Time) -> torch.Tensor:
        return torch.ones_like(as_time_tensor(t))

    def drift_coefficient(self, t: Time) -> torch.Tensor:
        return torch.zeros_like(as_time_tensor(t))

    def diffusion_coefficient(self, t: Time) -> torch.Tensor:
        return self.sigma(t) * math.sqrt(2 * self._log_ratio / self.T)

    @property
    def prior_std(self) -> float:
        return self.sigma_max


class _BetaSchedule:
    """Linear ``beta(t) = beta_min + (beta_max - beta_min) t / T`` and its integral."""

    beta_min: float
    beta_max: float
    T: float

    def beta(self, t: Time) -> torch.Tensor:
        """``beta(t)``; ``beta(0) = beta_min`` and ``beta(T) = beta_max``.

        Example:
            >>> VPSDE(T=4.0).beta(4.0).item()
            20.0
        """
        return self.beta_min + (self.beta_max - self.beta_min) * (as_time_tensor(t) / self.T)

    def integrated_beta(self, t: Time) -> torch.Tensor:
        """``B(t) = int_0^t beta(s) ds = beta_min t + (beta_max - beta_min) t^2 / (2 T)``.

        Example:
            >>> round(VPSDE().integrated_beta(1.0).item(), 4)
            10.05
        """
        tt = as_time_tensor(t)
        return self.beta_min * tt + 0.5 * (self.beta_max - self.beta_min) * tt * tt / self.T

    def mu(self, t: Time) -> torch.Tensor:
        return torch.exp(-0.5 * self.integrated_beta(t))

    def drift_coefficient(self, t: Time) -> torch.Tensor:
        return -0.5 * self.beta(t)

    @property
    def prior_std(self) -> float:
        return 1.0

    def _validate(self) -> None:
        _check_beta(self.beta_min, self.beta_max)
        _check_time_window(self.T, self.epsilon)  # type: ignore[attr-defined]


@attrs.frozen
class VPSDE(_BetaSchedule, SDE):
    """Variance preserving SDE: ``dx = -beta(t)/2 x dt + sqrt(beta(t)) dW``.

    ``beta(t) = beta_min + (beta_max - beta_min) t / T``, ``B(t) = int_0^t beta``,
    ``mu(t) = exp(-B/2)``, ``sigma(t) = sqrt(1 - exp(-B))``, prior ``N(0, I)``.

    Example:
        >>> sde = VPSDE()
        >>> sde.mu(0.0).item(), sde.sigma(0.0).item()
        (1.0, 0.0)
    """

    beta_min: float = attrs.field(default=0.1, converter=float)
    beta_max: float = attrs.field(default=20.0, converter=float)
    T: float = attrs.field(default=1.0, converter=float)
    epsilon: float = attrs.field(default=1e-5, converter=float)

    def __attrs_post_init__(self) -> None:
        self._validate()

    def sigma(self, t: Time) -> torch.Tensor:
        return torch.sqrt(-torch.expm1(-self.integrated_beta(t)))

    def diffusion_coefficient(self, t: Time) -> torch.Tensor:
        return torch.sqrt(self.beta(t))


@attrs.frozen
class SubVPSDE(_BetaSchedule, SDE):
    """Sub-variance preserving SDE: ``dx = -beta/2 x dt + sqrt(beta (1 - exp(-2 B(t)))) dW``.

    Same ``beta``/``B`` as :class:`VPSDE`; ``mu(t) = exp(-B/2)``, ``sigma(t) = 1 - exp(-B)``
    (its variance is below VP's at every ``t``), prior ``N(0, I)``.

    Example:
        >>> round(SubVPSDE().sigma(1.0).item(), 4)
        1.0
    """

    beta_min: float = attrs.field(default=0.1, converter=float)
    beta_max: float = attrs.field(default=20.0, converter=float)
    T: float = attrs.field(default=1.0, converter=float)
    epsilon: float = attrs.field(default=1e-5, converter=float)

    def __attrs_post_init__(self) -> None:
        self._validate()

    def sigma(self, t: Time) -> torch.Tensor:
        return -torch.expm1(-self.integrated_beta(t))

    def diffusion_coefficient(self, t: Time) -> torch.Tensor:
        return torch.sqrt(self.beta(t) * -torch.expm1(-2.0 * self.integrated_beta(t)))
