"""Importable helpers for the generative handler tests (checkpoints record classes by path).

- :class:`ExactGaussianScore`: ``sigma(t)`` times the exact score of data ``N(m, s^2 I)``
  under a given SDE, with one learnable scale (1 = exact), so it is a model NNHandler can
  train, sample from and compute likelihoods with, and every answer is known in closed form.
- :class:`NaNAfter`: the exact Gaussian model that turns to NaN after ``k`` calls.
- :func:`mixture_data`, :func:`mixture_modes`, :func:`mixture_log_density`: a 2-D mixture of
  Gaussians on a circle; :class:`ScoreMLP`: a small time-conditioned score network.
- :class:`SDESampler`: a :class:`nnh.generative.sampler.Sampler` that samples through its handler.
- :class:`CallRecorder`: counts and records the calls of a module's forward.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from nnh.generative.sampler import Sampler
from nnh.generative.sde import SDE, VPSDE, expand_time

__all__ = [
    "FOUR_MODES",
    "CallRecorder",
    "CorrelatedGaussianScore",
    "ExactGaussianScore",
    "MixtureExactScore",
    "NaNAfter",
    "SDESampler",
    "ScoreMLP",
    "exact_flow_log_likelihood",
    "fraction_near_modes",
    "gaussian_log_density",
    "gaussian_marginal_var",
    "mixture_data",
    "mixture_errors",
    "mixture_log_density",
    "mixture_modes",
]


# ---------------------------------------------------------------- Gaussian ground truth
def gaussian_marginal_var(sde: SDE, t: torch.Tensor | float, std: float) -> torch.Tensor:
    """Variance ``mu(t)^2 s^2 + sigma(t)^2`` of the marginal at ``t`` of data ``N(m, s^2 I)``.

    Example:
        >>> round(gaussian_marginal_var(VPSDE(), 0.0, 0.5).item(), 4)
        0.25
    """
    return sde.mu(t) ** 2 * std**2 + sde.sigma(t) ** 2


def gaussian_log_density(x: torch.Tensor, mean: torch.Tensor, var: float | torch.Tensor) -> torch.Tensor:
    """``log N(x; mean, var I)`` per row of ``x`` ``[B, D]``.

    Example:
        >>> round(gaussian_log_density(torch.zeros(1, 2), torch.zeros(2), 1.0).item(), 4)
        -1.8379
    """
    var = torch.as_tensor(var, dtype=x.dtype)
    d = x.shape[1]
    return -0.5 * ((x - mean.to(x.dtype)) ** 2).sum(1) / var - 0.5 * d * torch.log(2 * math.pi * var)


def exact_flow_log_likelihood(
    sde: SDE, x: torch.Tensor, mean: torch.Tensor, std: float, t0: float, t1: float
) -> torch.Tensor:
    """What the continuous probability-flow ODE gives for data ``N(mean, std^2 I)`` (closed form).

    The flow map from ``t0`` to ``t1`` is affine, ``x1 = mu1 m + (x - mu0 m) sqrt(v1 / v0)``,
    so the ODE's answer with the SDE's prior at ``t1`` is
    ``prior_log_prob(x1) + D/2 log(v1 / v0)``; its gap to the data density is the prior
    mismatch at ``t1`` only.

    Example:
        >>> x = torch.zeros(2, 2, dtype=torch.float64)
        >>> exact_flow_log_likelihood(VPSDE(), x, torch.zeros(2), 1.0, 1e-5, 1.0).shape
        torch.Size([2])
    """
    t0_, t1_ = torch.tensor(t0, dtype=x.dtype), torch.tensor(t1, dtype=x.dtype)
    ratio = gaussian_marginal_var(sde, t1_, std) / gaussian_marginal_var(sde, t0_, std)
    m = mean.to(x.dtype)
    x1 = sde.mu(t1_) * m + (x - sde.mu(t0_) * m) * ratio.sqrt()
    return sde.prior_log_prob(x1) + 0.5 * x.shape[1] * torch.log(ratio)


class ExactGaussianScore(nn.Module):
    """``scale * sigma(t) * score(t, x)`` for data ``N(mean, std^2 I)`` under the SDE ``sde_config``.

    The marginal at ``t`` is ``N(mu(t) m, v(t) I)`` with ``v = mu^2 s^2 + sigma^2``, so the
    exact score is ``-(x - mu(t) m) / v(t)``. ``sde_config`` is ``sde.config()`` of the SDE
    the handler uses (plain values, so the model's kwargs go into checkpoints). An optional
    condition ``c`` ``[B, D]`` replaces the mean per sample: ``model(t, x, c)``. ``scale`` is
    the one learnable parameter (the DSM optimum is ``scale = 1``). Computes in ``x``'s dtype.

    Example:
        >>> m = ExactGaussianScore(mean=[1.0, -2.0], std=0.5, sde_config=VPSDE().config())
        >>> t, x = torch.full((3,), 0.5), torch.zeros(3, 2)
        >>> m(t, x).shape
        torch.Size([3, 2])
    """

    def __init__(
        self,
        mean: Sequence[float] = (1.0, -2.0),
        std: float = 0.5,
        sde_config: dict[str, Any] | None = None,
        scale: float = 1.0,
    ):
        super().__init__()
        self.mean = [float(v) for v in mean]
        self.std = float(std)
        self.sde_config = dict(sde_config) if sde_config is not None else VPSDE().config()
        self.sde = SDE.from_config(self.sde_config)
        self.scale = nn.Parameter(torch.tensor(float(scale)))

    def exact_score(self, t: torch.Tensor, x: torch.Tensor, mean: torch.Tensor | None = None) -> torch.Tensor:
        """The exact score of the marginal at ``t`` (``t`` of shape ``[B]``)."""
        m = torch.tensor(self.mean, dtype=x.dtype, device=x.device) if mean is None else mean.to(x.dtype)
        t = t.to(x.dtype)
        mu = expand_time(self.sde.mu(t), x)
        var = expand_time(gaussian_marginal_var(self.sde, t, self.std), x)
        return -(x - mu * m) / var

    def forward(self, t: torch.Tensor, x: torch.Tensor, *condition: torch.Tensor) -> torch.Tensor:
        mean = condition[0] if condition else None
        sigma = expand_time(self.sde.sigma(t.to(x.dtype)), x)
        return self.scale.to(x.dtype) * sigma * self.exact_score(t, x, mean)


class CorrelatedGaussianScore(nn.Module):
    """``sigma(t)`` times the exact score of data ``N(0, C)`` with ``C_ij = rho^|i-j|`` (``dim``-d).

    The marginal at ``t`` is ``N(0, mu^2 C + sigma^2 I)``; with ``C = Q diag(lam) Q^T`` the
    score is ``-Q diag(1 / (mu^2 lam + sigma^2)) Q^T x``. Its Jacobian is far from diagonal,
    so a Hutchinson probe has a real error (unlike the isotropic models).

    Example:
        >>> m = CorrelatedGaussianScore(dim=4, rho=0.9)
        >>> m(torch.full((3,), 0.5), torch.zeros(3, 4)).shape
        torch.Size([3, 4])
    """

    def __init__(self, dim: int = 16, rho: float = 0.95, sde_config: dict[str, Any] | None = None):
        super().__init__()
        self.dim, self.rho = int(dim), float(rho)
        self.sde_config = dict(sde_config) if sde_config is not None else VPSDE().config()
        self.sde = SDE.from_config(self.sde_config)
        idx = torch.arange(self.dim, dtype=torch.float64)
        cov = self.rho ** (idx[:, None] - idx[None, :]).abs()
        lam, q = torch.linalg.eigh(cov)
        self.register_buffer("lam", lam)
        self.register_buffer("q", q)
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        t = t.to(x.dtype)
        mu, sigma = self.sde.mu(t)[:, None], self.sde.sigma(t)[:, None]
        q, lam = self.q.to(x.dtype), self.lam.to(x.dtype)
        y = (x @ q) / (mu**2 * lam + sigma**2)
        return -self.w * sigma * (y @ q.T)


# weights, means and std of the 4-Gaussian 2-D mixture of issue 10's sampler goals
FOUR_MODES = {
    "weights": [0.4, 0.3, 0.2, 0.1],
    "means": [[2.0, 0.0], [-2.0, 0.0], [0.0, 2.0], [0.0, -2.0]],
    "std": 0.15,
}


class MixtureExactScore(nn.Module):
    """``sigma(t)`` times the exact score of a Gaussian mixture perturbed by the SDE's kernel.

    Component ``k`` of the data, ``N(m_k, s^2 I)`` with weight ``w_k``, is ``N(mu m_k, v I)``
    at time ``t`` with ``v = mu^2 s^2 + sigma^2``, so the marginal's score is the
    responsibility-weighted ``-(x - mu m_k) / v`` (closed form, no learning). Computes in
    float64 and returns ``x``'s dtype.

    Example:
        >>> m = MixtureExactScore()
        >>> m(torch.full((3,), 0.5), torch.zeros(3, 2)).shape
        torch.Size([3, 2])
    """

    def __init__(
        self,
        weights: Sequence[float] = tuple(FOUR_MODES["weights"]),
        means: Sequence[Sequence[float]] = tuple(map(tuple, FOUR_MODES["means"])),
        std: float = FOUR_MODES["std"],
        sde_config: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.weights = [float(w) for w in weights]
        self.means = [[float(v) for v in m] for m in means]
        self.std = float(std)
        self.sde_config = dict(sde_config) if sde_config is not None else VPSDE().config()
        self.sde = SDE.from_config(self.sde_config)
        self.w = nn.Parameter(torch.ones((), dtype=torch.float64))

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        y, tt = x.double(), t.double()
        means = torch.tensor(self.means, dtype=torch.float64, device=x.device)
        log_w = torch.tensor(self.weights, dtype=torch.float64, device=x.device).log()
        mu, sigma = self.sde.mu(tt)[:, None], self.sde.sigma(tt)[:, None]
        var = mu**2 * self.std**2 + sigma**2  # [B, 1]
        diff = y[:, None, :] - mu[:, :, None] * means[None]  # [B, K, D]
        logits = log_w - 0.5 * (diff**2).sum(-1) / var
        resp = torch.softmax(logits, dim=1)
        score = -(resp[:, :, None] * diff).sum(1) / var
        return (self.w * sigma * score).to(x.dtype)


def mixture_errors(x: torch.Tensor, sde: SDE, t_end: float | None = None) -> tuple[float, float]:
    """``(max |weight error|, max relative within-mode std error)`` of samples of :data:`FOUR_MODES`.

    Samples go to their nearest mean; the target std is the data std perturbed to
    ``t_end`` (default ``sde.epsilon``): ``sqrt(mu^2 s^2 + sigma^2) / mu``-free, i.e.
    ``sqrt(s^2 + (sigma / mu)^2)`` scaled by ``mu``. The std per mode pools both coordinates.

    Example:
        >>> from nnh.generative import VESDE
        >>> g = torch.Generator().manual_seed(0)
        >>> means = torch.tensor(FOUR_MODES["means"])
        >>> x = means[torch.multinomial(torch.tensor(FOUR_MODES["weights"]), 40000, True, generator=g)]
        >>> x = x + 0.15 * torch.randn(40000, 2, generator=g)
        >>> w_err, s_err = mixture_errors(x, VESDE(sigma_min=1e-4))
        >>> w_err < 0.01 and s_err < 0.03
        True
    """
    t = torch.tensor(sde.epsilon if t_end is None else t_end, dtype=torch.float64)
    mu, sigma = float(sde.mu(t)), float(sde.sigma(t))
    target_std = math.sqrt(mu**2 * FOUR_MODES["std"] ** 2 + sigma**2)
    means = mu * torch.tensor(FOUR_MODES["means"], dtype=torch.float64)
    y = x.double()
    nearest = torch.cdist(y, means).argmin(dim=1)
    w_err, s_err = 0.0, 0.0
    for k, w in enumerate(FOUR_MODES["weights"]):
        part = y[nearest == k]
        w_err = max(w_err, abs(part.shape[0] / y.shape[0] - w))
        std = float(((part - means[k]) ** 2).mean().sqrt()) if part.shape[0] else 0.0
        s_err = max(s_err, abs(std / target_std - 1))
    return w_err, s_err


class NaNAfter(ExactGaussianScore):
    """:class:`ExactGaussianScore` whose output is NaN from call ``k + 1`` on.

    Example:
        >>> m = NaNAfter(k=1)
        >>> t, x = torch.full((2,), 0.5), torch.zeros(2, 2)
        >>> bool(m(t, x).isnan().any()), bool(m(t, x).isnan().all())
        (False, True)
    """

    def __init__(self, k: int = 3, **kwargs: Any):
        super().__init__(**kwargs)
        self.k = int(k)
        self.calls = 0

    def forward(self, t: torch.Tensor, x: torch.Tensor, *condition: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = super().forward(t, x, *condition)
        return out * float("nan") if self.calls > self.k else out


# ---------------------------------------------------------------- 2-D mixture
def mixture_modes(n_modes: int = 4, radius: float = 2.0) -> torch.Tensor:
    """``[n_modes, 2]`` centres evenly spaced on a circle, the first at angle 0.

    Example:
        >>> mixture_modes(4, 2.0).round().tolist()
        [[2.0, 0.0], [0.0, 2.0], [-2.0, 0.0], [-0.0, -2.0]]
    """
    angles = torch.arange(n_modes, dtype=torch.float64) * (2 * math.pi / n_modes)
    return (radius * torch.stack([angles.cos(), angles.sin()], dim=1)).to(torch.get_default_dtype())


def mixture_data(
    n: int, seed: int, n_modes: int = 4, radius: float = 2.0, std: float = 0.15
) -> torch.Tensor:
    """``n`` samples ``[n, 2]`` of the equal-weight Gaussian mixture around :func:`mixture_modes`.

    Example:
        >>> mixture_data(5, seed=0).shape
        torch.Size([5, 2])
    """
    g = torch.Generator().manual_seed(seed)
    which = torch.randint(0, n_modes, (n,), generator=g)
    return mixture_modes(n_modes, radius)[which] + std * torch.randn(n, 2, generator=g)


def mixture_log_density(
    x: torch.Tensor, n_modes: int = 4, radius: float = 2.0, std: float = 0.15
) -> torch.Tensor:
    """Exact ``log p(x)`` ``[B]`` of the mixture of :func:`mixture_data`.

    Example:
        >>> mixture_log_density(mixture_modes()[:1]).shape
        torch.Size([1])
    """
    modes = mixture_modes(n_modes, radius).to(x.dtype)
    d2 = ((x[:, None, :] - modes[None]) ** 2).sum(-1)
    log_comp = -0.5 * d2 / std**2 - math.log(2 * math.pi * std**2)
    return torch.logsumexp(log_comp, dim=1) - math.log(n_modes)


def fraction_near_modes(x: torch.Tensor, within: float = 0.5, n_modes: int = 4, radius: float = 2.0
                        ) -> tuple[float, list[float]]:
    """(fraction of samples within ``within`` of some mode, fraction assigned to each mode).

    A sample is assigned to its nearest mode.

    Example:
        >>> near, share = fraction_near_modes(mixture_modes())
        >>> near, share
        (1.0, [0.25, 0.25, 0.25, 0.25])
    """
    modes = mixture_modes(n_modes, radius).to(x.dtype)
    dist = torch.cdist(x, modes)
    nearest = dist.min(dim=1)
    near = float((nearest.values < within).float().mean())
    share = [float((nearest.indices == k).float().mean()) for k in range(n_modes)]
    return near, share


class ScoreMLP(nn.Module):
    """A small score network ``model(t, x) ~ sigma(t) * score`` for 2-D data.

    Input: ``x`` and Fourier features of ``t`` (``t``, ``sin(k pi t)``, ``cos(k pi t)`` for
    ``k = 1..n_freq``, ``t`` in units of ``T``); SiLU MLP; output shaped like ``x``.

    Example:
        >>> ScoreMLP()(torch.rand(5), torch.randn(5, 2)).shape
        torch.Size([5, 2])
    """

    def __init__(self, dim: int = 2, hidden: int = 128, n_freq: int = 4, T: float = 1.0):
        super().__init__()
        self.T = float(T)
        self.register_buffer("freqs", math.pi * torch.arange(1, n_freq + 1, dtype=torch.float32))
        self.net = nn.Sequential(
            nn.Linear(dim + 1 + 2 * n_freq, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, dim),
        )

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        s = (t / self.T).to(x.dtype).reshape(-1, 1)
        angles = s * self.freqs.to(x.dtype)
        return self.net(torch.cat([x, s, angles.sin(), angles.cos()], dim=1))


# ---------------------------------------------------------------- samplers and counters
class SDESampler(Sampler):
    """Draws ``N`` samples of shape ``[N, dim]`` through its handler's ``sample`` (reverse SDE).

    ``drawn`` counts the samples drawn so far and is kept in checkpoints (``state_dict``).

    Example:
        >>> s = SDESampler(dim=2, steps=10)
        >>> s.config()
        {'dim': 2, 'steps': 10}
    """

    def __init__(self, dim: int = 2, steps: int = 50):
        super().__init__()
        self.dim = int(dim)
        self.steps = int(steps)
        self.drawn = 0

    def sample(self, N: int, device: torch.device | str | None = None) -> torch.Tensor:
        if self.handler is None:
            raise RuntimeError("SDESampler has no handler: give it to one with handler.set_sampler")
        x = self.handler.sample((N, self.dim), self.steps, bar=False)
        self.drawn += N
        return x.to(device) if device is not None else x

    def state_dict(self) -> dict[str, Any]:
        return {"drawn": self.drawn}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.drawn = int(state["drawn"])


class CallRecorder:
    """Counts the calls of ``module``'s forward (a forward pre-hook) and records what it saw.

    ``calls``: number of calls; ``batch_sizes``: ``x.shape[0]`` per call (the second
    positional input, score-model convention ``model(t, x, *condition)``); ``extras``: the
    positional inputs after ``x``; ``params``: clones of the parameters at each call when
    ``record_params``. Use as a context manager to remove the hook afterwards.

    Example:
        >>> m = ExactGaussianScore()
        >>> with CallRecorder(m) as rec:
        ...     _ = m(torch.rand(3), torch.zeros(3, 2))
        >>> rec.calls, rec.batch_sizes
        (1, [3])
    """

    def __init__(self, module: nn.Module, record_params: bool = False):
        self.calls = 0
        self.batch_sizes: list[int] = []
        self.extras: list[tuple[Any, ...]] = []
        self.params: list[list[torch.Tensor]] = []
        self._record_params = record_params
        self._handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self.calls += 1
        if len(args) >= 2:
            self.batch_sizes.append(int(args[1].shape[0]))
            self.extras.append(tuple(args[2:]))
        if self._record_params:
            self.params.append([p.detach().clone() for p in module.parameters()])

    def remove(self) -> None:
        self._handle.remove()

    def __enter__(self) -> CallRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
