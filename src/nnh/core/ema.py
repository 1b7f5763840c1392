"""Exponential moving average of parameters, as a pure function over TensorDicts."""

from __future__ import annotations

import torch
from tensordict import TensorDict

from nnh.core.tree import clone_tensors

__all__ = ["ema_update", "ema_update_"]


def ema_update_(
    ema_leaves: list[torch.Tensor], param_leaves: list[torch.Tensor], decay: float
) -> None:
    """In place: ``ema = decay * ema + (1 - decay) * param`` on lists of tensors (foreach).

    ``torch.lerp`` is exact at its end points, so ``decay=0`` copies and ``decay=1`` keeps.

    Example:
        >>> e, p = [torch.zeros(2)], [torch.ones(2)]
        >>> ema_update_(e, p, 0.75); e[0].tolist()
        [0.25, 0.25]
    """
    with torch.no_grad():
        torch._foreach_lerp_(ema_leaves, [p.detach() for p in param_leaves], 1.0 - float(decay))


def ema_update(
    ema: TensorDict, params: TensorDict, decay: float, *, donate: bool = False
) -> TensorDict:
    """The EMA record after one update with ``params``; ``ema`` is untouched unless ``donate``.

    Example:
        >>> from nnh.core.tree import flat_td
        >>> ema, p = flat_td({"w": torch.zeros(1)}), flat_td({"w": torch.ones(1)})
        >>> ema_update(ema, p, 0.75)["w"].item(), ema["w"].item()
        (0.25, 0.0)
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
    if set(ema.keys()) != set(params.keys()):
        raise KeyError(
            f"EMA and params name different tensors: only in EMA {sorted(set(ema.keys()) - set(params.keys()))}, "
            f"only in params {sorted(set(params.keys()) - set(ema.keys()))}"
        )
    out = ema if donate else clone_tensors(ema)
    names = list(out.keys())
    ema_update_([out[n] for n in names], [params[n] for n in names], decay)
    return out
