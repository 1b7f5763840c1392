"""The loading functions as module functions, the handler class first.

``nnh.checkpointing.load(NNHandler, path, ...)`` and
``nnh.checkpointing.initialize_from_checkpoint(NNHandler, checkpoint_path, model_class, ...)``
are :meth:`NNHandler.load` and :meth:`NNHandler.initialize_from_checkpoint` (same options,
same checks); passing the class lets a subclass of ``NNHandler`` be rebuilt as itself.

Example:
    >>> import os, tempfile, torch
    >>> from nnh import NNHandler
    >>> h = NNHandler(torch.nn.Linear, in_features=2, out_features=1)
    >>> path = os.path.join(tempfile.mkdtemp(), "run.pth"); h.save(path)
    >>> torch.equal(load(NNHandler, path).module.weight, h.module.weight)
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from nnh.handler import NNHandler
    from nnh.handler.enums import ModelType

__all__ = ["initialize_from_checkpoint", "load"]

H = TypeVar("H", bound="NNHandler")


def load(
    NNHandler: type[H],
    path: str,
    device: str | torch.device | None = None,
    strict_load: bool = False,
    skip_optimizer: bool = False,
    skip_scheduler: bool = False,
    skip_history: bool = False,
    skip_callbacks: bool = False,
    skip_sampler_sde: bool = False,
    skip_ema: bool = False,
    trust_model_code: bool = False,
    trusted: Sequence[Any] | None = None,
    trust_modules: Sequence[str] | str | None = None,
) -> H:
    """``NNHandler.load(path, ...)``: a complete handler from a file :meth:`save` wrote."""
    return NNHandler.load(
        path,
        device=device,
        strict_load=strict_load,
        skip_optimizer=skip_optimizer,
        skip_scheduler=skip_scheduler,
        skip_history=skip_history,
        skip_callbacks=skip_callbacks,
        skip_sampler_sde=skip_sampler_sde,
        skip_ema=skip_ema,
        trust_model_code=trust_model_code,
        trusted=trusted,
        trust_modules=trust_modules,
    )


def initialize_from_checkpoint(
    NNHandler: type[H],
    checkpoint_path: str,
    model_class: type[nn.Module],
    model_type: ModelType | str | None = None,
    device: str | torch.device | None = None,
    strict_load: bool = True,
    **model_kwargs: Any,
) -> H:
    """``NNHandler.initialize_from_checkpoint(...)``: a new handler with only the weights.

    Example:
        >>> import os, tempfile, torch
        >>> from nnh import NNHandler
        >>> path = os.path.join(tempfile.mkdtemp(), "w.pth")
        >>> torch.save(torch.nn.Linear(2, 1).state_dict(), path)
        >>> g = initialize_from_checkpoint(NNHandler, path, torch.nn.Linear, in_features=2, out_features=1)
        >>> g.optimizer is None
        True
    """
    return NNHandler.initialize_from_checkpoint(
        checkpoint_path,
        model_class,
        model_type=model_type,
        device=device,
        strict_load=strict_load,
        **model_kwargs,
    )
