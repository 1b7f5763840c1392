"""Checking a model built on the meta device against a checkpoint, before any allocation.

``NNHandler.load`` builds the model named by the file on the meta device (shapes only, no
memory) and calls :func:`check_meta_model`: every tensor the file holds must have the shape
the model gives it, and the tensors the file lacks (which would be allocated and
initialised for real) may not need more memory than :func:`missing_budget` allows. So
model arguments that ask for 40 GB, or a stacked ensemble of a billion members, fail in
milliseconds with a :class:`CheckpointError` instead of exhausting memory.

Example:
    >>> import torch
    >>> from torch import nn
    >>> with torch.device("meta"):
    ...     model = nn.Linear(4, 3)
    >>> check_meta_model(model, {"weight": torch.zeros(3, 4), "bias": torch.zeros(3)}, None)
    True
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from nnh.checkpoint.errors import CheckpointError
from nnh.checkpoint.keys import _mismatch_error, compare_state_dict

__all__ = ["check_meta_model", "missing_budget"]

PathLike = str | os.PathLike[str]


def missing_budget(file_bytes: int) -> int:
    """Bytes of model tensors a checkpoint may leave to be initialised: as many as it
    stores, and at least 1 GiB.

    Example:
        >>> missing_budget(10) == 2**30
        True
    """
    return max(int(file_bytes), 2**30)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def check_meta_model(model: nn.Module, weights: Mapping[str, Any], source: PathLike | None) -> bool:
    """Check a meta-device ``model`` against a checkpoint's ``weights``; return whether the
    weights supply every parameter and buffer (then the model can take them as they are).

    Raises :class:`CheckpointError` kind ``"mismatch"`` for a shape that differs (naming it:
    ``net.0.weight: checkpoint [12, 8] vs model [5, 8]``) and kind ``"too_large"`` when the
    tensors the file lacks would need more than :func:`missing_budget` bytes.

    Example:
        >>> from torch import nn
        >>> with torch.device("meta"):
        ...     big = nn.Linear(100_000, 100_000)
        >>> try:
        ...     check_meta_model(big, {"bias": torch.zeros(100_000)}, "run.pth")
        ... except CheckpointError as err:
        ...     print(err.kind)
        too_large
    """
    report = compare_state_dict(model, weights)
    if report.shape_mismatches:
        raise _mismatch_error(model, report, False, source)
    names = {n for n, _ in model.named_parameters()}
    dtypes = {
        v.dtype
        for k, v in weights.items()
        if isinstance(v, torch.Tensor) and v.is_floating_point() and k.split("module.")[-1] in names
    }
    if len(dtypes) > 1:
        where = "the checkpoint" if source is None else f"checkpoint {os.fspath(source)!r}"
        raise CheckpointError(
            f"{where}: the model's floating-point parameters have mixed dtypes "
            f"{sorted(str(d) for d in dtypes)}; a model trained by nnh has one. The file was "
            "damaged or edited; nnh allocated nothing. What to do: use an intact checkpoint.",
            path=source,
            kind="mismatch",
        )
    tensors = dict(model.named_parameters())
    tensors.update(dict(model.named_buffers()))
    missing = [k for k in report.missing if k in tensors]
    need = sum(_nbytes(tensors[k]) for k in missing)
    have = sum(_nbytes(v) for v in weights.values() if isinstance(v, torch.Tensor))
    if need > missing_budget(have):
        where = "the checkpoint" if source is None else f"checkpoint {os.fspath(source)!r}"
        raise CheckpointError(
            f"{where}: the model {type(model).__name__} built from the file's arguments needs "
            f"{need / 2**30:.1f} GiB for {len(missing)} tensor(s) the file does not hold (e.g. "
            f"{missing[0]!r}); nnh allocated nothing. The model arguments or the weights were "
            "edited. What to do: use an intact checkpoint, or build the model yourself and use "
            "NNHandler.initialize_from_checkpoint(path, model_class, **kwargs).",
            path=source,
            kind="too_large",
        )
    return not report.missing
