"""Divergence of a vector field ``fn: [B, ...] -> [B, ...]``: Hutchinson estimate and exact trace.

Both use one forward call of ``fn`` and vector-Jacobian products for all probe vectors at
once (``torch.func.vjp`` then ``torch.func.vmap`` over the probes) — never a Python loop over
probes. ``fn`` must act on each sample independently (no batch statistics), which is what
makes the per-sample trace of the batched Jacobian meaningful.

Pure: ``x`` and ``probes`` are not modified; randomness only enters through the probes, which
the caller draws (e.g. with :func:`sample_probes` and an explicit generator).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.func import vjp, vmap

__all__ = [
    "PROBE_KINDS",
    "ProbeSource",
    "exact_divergence",
    "fresh_probes",
    "hutchinson_divergence",
    "sample_probes",
    "value_and_divergence",
]

PROBE_KINDS = ("rademacher", "gaussian")

VectorField = Callable[[torch.Tensor], torch.Tensor]
# Probes for an ODE integration: one tensor [K, *x.shape] reused at every step, a callable
# step_index -> [K, *x.shape] (fresh probes per step), or None (exact divergence).
ProbeSource = torch.Tensor | Callable[[int], torch.Tensor] | None


def sample_probes(
    shape: torch.Size | tuple[int, ...],
    kind: str = "rademacher",
    generator: torch.Generator | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Probe vectors of shape ``[K, *x.shape]`` with ``E[v v^T] = I``.

    ``"rademacher"``: entries +-1 with equal probability (lowest variance; exact for
    diagonal Jacobians). ``"gaussian"``: standard normal entries. Uses ``generator`` when
    given (the device defaults to the generator's), otherwise torch's default generator.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> v = sample_probes((8, 4, 3), "rademacher", g)
        >>> v.shape, bool((v.abs() == 1).all())
        (torch.Size([8, 4, 3]), True)
    """
    if device is None and generator is not None:
        device = generator.device
    shape = tuple(shape)
    if kind == "rademacher":
        bits = torch.randint(0, 2, shape, generator=generator, device=device)
        return (bits * 2 - 1).to(dtype or torch.get_default_dtype())
    if kind == "gaussian":
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)
    raise ValueError(f"unknown probe kind {kind!r}; use one of {PROBE_KINDS}")


def fresh_probes(
    shape: torch.Size | tuple[int, ...],
    kind: str = "rademacher",
    generator: torch.Generator | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Callable[[int], torch.Tensor]:
    """A probe source for ODE integrations: ``step -> sample_probes(shape, kind, generator)``.

    Each call draws new probes (from ``generator`` when given, otherwise torch's default
    generator), so the Hutchinson errors of successive steps are independent and average out
    along the trajectory instead of adding up. ``kind`` is checked now, not at the first step.

    Example:
        >>> draw = fresh_probes((2, 4, 3), "rademacher", torch.Generator().manual_seed(0))
        >>> a, b = draw(0), draw(1)
        >>> a.shape, torch.equal(a, b)
        (torch.Size([2, 4, 3]), False)
    """
    if kind not in PROBE_KINDS:
        raise ValueError(f"unknown probe kind {kind!r}; use one of {PROBE_KINDS}")
    shape = tuple(shape)

    def draw(step: int) -> torch.Tensor:
        return sample_probes(shape, kind, generator, device=device, dtype=dtype)

    return draw


def _check_probes(x: torch.Tensor, probes: torch.Tensor) -> None:
    if probes.ndim != x.ndim + 1 or probes.shape[1:] != x.shape:
        raise ValueError(
            f"probes must have shape [K, *x.shape] = [K, {', '.join(map(str, x.shape))}], "
            f"got {tuple(probes.shape)}"
        )
    if probes.shape[0] < 1:
        raise ValueError("probes must hold at least one probe vector (K >= 1)")


def _basis_probes(x: torch.Tensor) -> torch.Tensor:
    """``D`` probes, the unit vectors of one sample repeated across the batch: ``[D, *x.shape]``."""
    d = x.shape[1:].numel()
    eye = torch.eye(d, dtype=x.dtype, device=x.device).reshape(d, 1, *x.shape[1:])
    return eye.expand(d, *x.shape)


def _vjp_quadratic_forms(
    fn: VectorField, x: torch.Tensor, probes: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fn(x), q)`` with ``q[k, b] = v_kb^T J_b v_kb``, all probes in one vmapped VJP."""
    out, pullback = vjp(fn, x)
    if out.shape != x.shape:
        raise ValueError(
            f"the vector field must return a tensor shaped like x {tuple(x.shape)}, got {tuple(out.shape)}"
        )
    (vjps,) = vmap(pullback)(probes.to(dtype=out.dtype))
    q = (vjps * probes).reshape(probes.shape[0], x.shape[0], -1).sum(dim=-1)
    return out, q


def value_and_divergence(
    fn: VectorField, x: torch.Tensor, probes: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fn(x), div fn(x))`` from ONE evaluation of ``fn``: Hutchinson with ``probes``, exact if ``None``.

    Example:
        >>> x = torch.randn(5, 3)
        >>> fx, div = value_and_divergence(lambda y: 2 * y, x)
        >>> div.tolist()
        [6.0, 6.0, 6.0, 6.0, 6.0]
    """
    if x.ndim < 1:
        raise ValueError("x must have shape [B, ...]")
    if probes is None:
        out, q = _vjp_quadratic_forms(fn, x, _basis_probes(x))
        return out, q.sum(dim=0)
    _check_probes(x, probes)
    out, q = _vjp_quadratic_forms(fn, x, probes)
    return out, q.mean(dim=0)


def hutchinson_divergence(fn: VectorField, x: torch.Tensor, probes: torch.Tensor) -> torch.Tensor:
    """Unbiased estimate of ``div fn`` at ``x``: ``mean_k v_k^T J v_k`` over ``probes`` ``[K, *x.shape]``.

    Returns a tensor of shape ``[B]``. All ``K`` vector-Jacobian products run in one vmapped
    call. Variance per sample: ``2 (||J||_F^2 - sum_i J_ii^2) / K`` for Rademacher probes
    (exact when ``J`` is diagonal) and ``2 ||J_sym||_F^2 / K`` for Gaussian ones.

    Example:
        >>> A = torch.tensor([[1.0, 2.0], [0.0, 3.0]])
        >>> v = sample_probes((64, 4, 2), "gaussian", torch.Generator().manual_seed(0))
        >>> hutchinson_divergence(lambda y: y @ A.T, torch.randn(4, 2), v).shape
        torch.Size([4])
    """
    if probes is None:
        raise ValueError(
            "hutchinson_divergence needs probes [K, *x.shape]; use exact_divergence for the exact trace"
        )
    return value_and_divergence(fn, x, probes)[1]


def exact_divergence(fn: VectorField, x: torch.Tensor) -> torch.Tensor:
    """Exact ``div fn = trace(d fn / d x)`` per sample, shape ``[B]`` (``D`` batched VJPs; small ``D``).

    Example:
        >>> exact_divergence(lambda y: y ** 2, torch.tensor([[1.0, 2.0]])).tolist()
        [6.0]
    """
    return value_and_divergence(fn, x, None)[1]
