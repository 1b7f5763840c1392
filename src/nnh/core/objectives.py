"""Objectives: how a batch becomes a loss.

An objective is a callable ``objective(model, batch, epoch) -> Evaluation``. The core
ships the supervised one (``(input, target, *extra)`` batches, or input-as-target for
generative models); ``nnh.generative`` adds denoising score matching.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
import torch

__all__ = ["Evaluation", "Supervised", "accepts_keyword", "batch_size"]


@attrs.frozen(eq=False)
class Evaluation:
    """What an objective returns: the mean loss of the batch and what metrics need."""

    loss: torch.Tensor
    output: Any
    target: Any
    num_samples: int


def batch_size(x: Any) -> int:
    """Number of samples in a batch element (its first dimension).

    Example:
        >>> batch_size(torch.zeros(5, 3))
        5
    """
    if isinstance(x, torch.Tensor):
        return int(x.shape[0]) if x.dim() else 1
    if isinstance(x, (list, tuple)) and x:
        return batch_size(x[0])
    if isinstance(x, Mapping) and x:
        return batch_size(next(iter(x.values())))
    raise TypeError(
        f"cannot tell the number of samples of a batch element of type {type(x).__name__}"
    )


def accepts_keyword(fn: Callable, name: str) -> bool:
    """Whether ``fn`` takes keyword ``name`` (or ``**kwargs``).

    Example:
        >>> accepts_keyword(lambda out, y, epoch=0: 0, "epoch")
        True
    """
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


@attrs.frozen(eq=False)
class Supervised:
    """``loss_fn(model(x, *extra), target, **loss_kwargs)``.

    With ``inputs_are_targets`` (generative models) a batch is ``(x, *extra)`` (or a bare
    tensor) and the target is ``x``; otherwise it is ``(x, y, *extra)``. With
    ``pass_epoch`` the loss also gets ``epoch=`` when it accepts it.

    Example:
        >>> obj = Supervised(torch.nn.functional.mse_loss)
        >>> ev = obj(torch.nn.Identity(), (torch.ones(4, 1), torch.zeros(4, 1)), epoch=0)
        >>> ev.loss.item(), ev.num_samples
        (1.0, 4)
    """

    loss_fn: Callable[..., torch.Tensor]
    loss_kwargs: Mapping[str, Any] = attrs.field(factory=dict)
    pass_epoch: bool = False
    inputs_are_targets: bool = False
    _epoch_ok: bool = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        if not callable(self.loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(self.loss_fn).__name__}")
        object.__setattr__(
            self, "_epoch_ok", self.pass_epoch and accepts_keyword(self.loss_fn, "epoch")
        )

    def __call__(self, model: Callable, batch: Any, epoch: int = 0) -> Evaluation:
        x, target, extra = split_batch(batch, self.inputs_are_targets)
        output = model(x, *extra)
        kwargs = self.loss_kwargs
        if self._epoch_ok:
            kwargs = {**kwargs, "epoch": epoch}
        loss = self.loss_fn(output, target, **kwargs)
        return Evaluation(loss=loss, output=output, target=target, num_samples=batch_size(x))

    def loss_of(self, output: Any, target: Any, epoch: int = 0) -> torch.Tensor:
        """The loss of given outputs (no forward pass): used to log a trimmed batch.

        Example:
            >>> Supervised(torch.nn.functional.l1_loss).loss_of(torch.ones(2), torch.zeros(2)).item()
            1.0
        """
        kwargs = self.loss_kwargs
        if self._epoch_ok:
            kwargs = {**kwargs, "epoch": epoch}
        return self.loss_fn(output, target, **kwargs)


def split_batch(batch: Any, inputs_are_targets: bool) -> tuple[Any, Any, Sequence[Any]]:
    """``(x, target, extra)`` of a batch under the supervised or generative convention.

    Example:
        >>> x, y, extra = split_batch((1, 2, 3), inputs_are_targets=False)
        >>> (x, y, tuple(extra))
        (1, 2, (3,))
    """
    if isinstance(batch, torch.Tensor):
        if not inputs_are_targets:
            raise ValueError(
                "a supervised batch must be (input, target, ...), got a single tensor; "
                "use model_type GENERATIVE for input-as-target training"
            )
        return batch, batch, ()
    if not isinstance(batch, (list, tuple)) or len(batch) == 0:
        raise ValueError(f"a batch must be a tensor, tuple or list, got {type(batch).__name__}")
    if inputs_are_targets:
        return batch[0], batch[0], batch[1:]
    if len(batch) < 2:
        raise ValueError("a supervised batch must hold (input, target); got one element")
    return batch[0], batch[1], batch[2:]
