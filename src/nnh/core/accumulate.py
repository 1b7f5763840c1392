"""Epoch sums: sample-weighted loss and metric sums that become exact means.

An :class:`EpochSums` record accumulates on the device (no host sync per batch). For
distributed runs, :func:`pack_sums` flattens it into one tensor so a single collective
reduces every logged value; :func:`sums_to_means` turns the reduced vector into means.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import attrs
import torch

__all__ = ["EpochSums", "add_to_sums", "member_means", "new_sums", "pack_sums", "sums_to_means"]


@attrs.frozen(eq=False)
class EpochSums:
    """Running sums: ``loss`` and each metric weighted by batch size, and the sample count."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]
    count: torch.Tensor


def new_sums(
    metric_names: Sequence[str], device: torch.device | str = "cpu", members: int | None = None
) -> EpochSums:
    """Zeroed float64 sums on ``device``; with ``members`` the loss and metric sums are
    ``[members]`` (one per ensemble member) and the sample count is shared.

    Example:
        >>> s = new_sums(["acc"])
        >>> float(s.loss), float(s.count), list(s.metrics)
        (0.0, 0.0, ['acc'])
        >>> new_sums([], members=3).loss.shape
        torch.Size([3])
    """
    shape = () if members is None else (members,)
    zero = lambda: torch.zeros(shape, dtype=torch.float64, device=device)  # noqa: E731
    count = torch.zeros((), dtype=torch.float64, device=device)
    return EpochSums(loss=zero(), metrics={name: zero() for name in metric_names}, count=count)


def add_to_sums(
    sums: EpochSums,
    loss_sum: torch.Tensor,
    num_samples: int,
    metric_sums: Mapping[str, torch.Tensor | float] | None = None,
) -> EpochSums:
    """Add one batch in place (the accumulator is owned by the loop) and return it.

    ``loss_sum`` is the batch's mean loss times its sample count, as a tensor.

    Example:
        >>> s = new_sums([])
        >>> s = add_to_sums(s, torch.tensor(6.0), 3)
        >>> float(s.loss / s.count)
        2.0
    """
    sums.loss.add_(loss_sum.detach().to(sums.loss.dtype))
    sums.count.add_(num_samples)
    if metric_sums:
        for name, value in metric_sums.items():
            sums.metrics[name].add_(value)
    return sums


def pack_sums(sums: EpochSums) -> torch.Tensor:
    """``[loss, *metrics (sorted by name), count]`` as one float64 vector.

    Per-member sums (an ensemble's) pack as ``[loss, *metrics, *per_member, count]``: the
    first entries are the members' means, so :func:`sums_to_means` reads the ensemble's mean
    unchanged, and ``per_member`` is each loss/metric's ``[E]`` sums in turn
    (:func:`member_means` reads them). Every entry is a sum, so the vector all-reduces.

    Example:
        >>> pack_sums(add_to_sums(new_sums(["b", "a"]), torch.tensor(1.0), 2)).tolist()
        [1.0, 0.0, 0.0, 2.0]
        >>> pack_sums(add_to_sums(new_sums([], members=2), torch.tensor([1.0, 3.0]), 2)).tolist()
        [2.0, 1.0, 3.0, 2.0]
    """
    names = sorted(sums.metrics)
    values = [sums.loss, *[sums.metrics[n] for n in names]]
    if sums.loss.dim() == 0:
        return torch.stack([*values, sums.count])
    per_member = torch.stack(values)
    return torch.cat([per_member.mean(dim=1), per_member.reshape(-1), sums.count.reshape(1)])


def member_means(
    packed: torch.Tensor, metric_names: Sequence[str], members: int
) -> tuple[list[float], dict[str, list[float]]]:
    """Per-member ``(losses, {metric: values})`` means of a vector packed from ``[E]`` sums.

    Example:
        >>> packed = pack_sums(add_to_sums(new_sums([], members=2), torch.tensor([2.0, 6.0]), 2))
        >>> member_means(packed, [], 2)
        ([1.0, 3.0], {})
    """
    names = sorted(metric_names)
    values = packed.detach().cpu().tolist()
    count = values[-1]
    start = 1 + len(names)
    rows = [values[start + j * members : start + (j + 1) * members] for j in range(1 + len(names))]
    div = (lambda v: v / count) if count else (lambda v: float("nan"))
    means = [[div(v) for v in row] for row in rows]
    return means[0], dict(zip(names, means[1:]))


def sums_to_means(
    packed: torch.Tensor, metric_names: Sequence[str]
) -> tuple[float, dict[str, float], int]:
    """``(mean loss, {metric: mean}, count)`` from a packed (possibly all-reduced) vector.

    One host transfer for all values. A zero count gives NaN means.

    Example:
        >>> sums_to_means(torch.tensor([6.0, 3.0, 3.0], dtype=torch.float64), ["acc"])
        (2.0, {'acc': 1.0}, 3)
    """
    values = packed.detach().cpu().tolist()
    count = values[-1]
    div = (lambda v: v / count) if count else (lambda v: float("nan"))
    names = sorted(metric_names)
    return div(values[0]), {n: div(v) for n, v in zip(names, values[1:-1])}, round(count)
