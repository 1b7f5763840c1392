"""Objectives that let the core's ``train_step`` train score models."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attrs
import torch

from nnh.core.objectives import Evaluation, accepts_keyword, batch_size, split_batch
from nnh.generative.score_matching import denoising_score_matching_loss
from nnh.generative.sde import SDE

__all__ = ["ScoreMatching", "UserScoreLoss"]


@attrs.frozen(eq=False)
class ScoreMatching:
    """Denoising score matching for a model that outputs ``sigma(t) * score``.

    A batch is ``(x, *extra)`` (or a bare tensor); ``extra`` goes to the model as
    conditioning. ``t`` and the noise are drawn from the ambient generator, or from the
    record's ``rng`` when the state carries one (the core scopes it).

    Example:
        >>> from nnh.generative import VPSDE
        >>> obj = ScoreMatching(VPSDE())
        >>> ev = obj(lambda t, x: torch.zeros_like(x), torch.randn(8, 2), epoch=0)
        >>> ev.num_samples
        8
    """

    sde: SDE

    def __call__(
        self, model: Callable[..., torch.Tensor], batch: Any, epoch: int = 0
    ) -> Evaluation:
        x, _, extra = split_batch(batch, inputs_are_targets=True)
        loss = denoising_score_matching_loss(model, self.sde, x, *extra)
        return Evaluation(loss=loss, output=None, target=x, num_samples=batch_size(x))


@attrs.frozen(eq=False)
class UserScoreLoss:
    """A user's loss for a score model: ``loss_fn(model, x, *extra, **kwargs)``.

    ``sde=`` is passed when the function accepts it, and ``epoch=`` when asked.

    Example:
        >>> from nnh.generative import VPSDE
        >>> loss = lambda model, x, sde: model(torch.ones(len(x)), x).pow(2).mean()
        >>> UserScoreLoss(loss, VPSDE())(lambda t, x: x, torch.ones(4, 2)).loss.item()
        1.0
    """

    loss_fn: Callable[..., torch.Tensor]
    sde: SDE | None
    loss_kwargs: Mapping[str, Any] = attrs.field(factory=dict)
    pass_epoch: bool = False

    def __call__(
        self, model: Callable[..., torch.Tensor], batch: Any, epoch: int = 0
    ) -> Evaluation:
        x, _, extra = split_batch(batch, inputs_are_targets=True)
        kwargs = dict(self.loss_kwargs)
        if self.sde is not None and accepts_keyword(self.loss_fn, "sde"):
            kwargs["sde"] = self.sde
        if self.pass_epoch and accepts_keyword(self.loss_fn, "epoch"):
            kwargs["epoch"] = epoch
        loss = self.loss_fn(model, x, *extra, **kwargs)
        return Evaluation(loss=loss, output=None, target=x, num_samples=batch_size(x))
