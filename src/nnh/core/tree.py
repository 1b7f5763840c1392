"""Small helpers over flat TensorDicts of named tensors.

The core keeps tensors in flat TensorDicts keyed by their ``named_parameters`` /
``named_buffers`` names (dots allowed). These helpers wrap mappings without copying and
clone them without losing the ``nn.Parameter`` type or ``requires_grad`` flag.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from tensordict import TensorDict
from torch import nn

__all__ = ["clone_parameters", "clone_tensors", "flat_td"]


def flat_td(tensors: Mapping[str, torch.Tensor]) -> TensorDict:
    """Wrap a mapping of names to tensors in a flat TensorDict without copying.

    Example:
        >>> td = flat_td({"w": torch.zeros(2)})
        >>> td["w"].shape
        torch.Size([2])
    """
    return TensorDict(dict(tensors), batch_size=[])


def clone_parameters(params: TensorDict) -> TensorDict:
    """Fresh ``nn.Parameter`` copies of every leaf, keeping ``requires_grad``.

    Example:
        >>> p = flat_td({"w": nn.Parameter(torch.ones(2))})
        >>> q = clone_parameters(p)
        >>> q["w"] is p["w"], torch.equal(q["w"], p["w"])
        (False, True)
    """
    return flat_td(
        {
            name: nn.Parameter(t.detach().clone(), requires_grad=t.requires_grad)
            for name, t in params.items()
        }
    )


def clone_tensors(td: TensorDict | None) -> TensorDict | None:
    """A deep copy of a (possibly nested) TensorDict of plain tensors; ``None`` stays ``None``.

    Example:
        >>> a = flat_td({"x": torch.zeros(2)})
        >>> b = clone_tensors(a)
        >>> b["x"] is a["x"]
        False
    """
    if td is None:
        return None
    return td.clone()
