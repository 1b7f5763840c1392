"""The base class of custom samplers used by ``NNHandler.get_samples``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from nnh.handler import NNHandler

__all__ = ["Sampler"]


class Sampler:
    """Produce samples from a trained model; subclass and implement :meth:`sample`.

    ``set_sampler`` gives the sampler its handler (``self.handler``), so ``sample`` can use
    ``self.handler.model``, ``self.handler.sde`` or ``self.handler.score``. Keep the
    constructor's keyword arguments as attributes of the same names (or override
    :meth:`config`) so checkpoints can rebuild it; put learned state in :meth:`state_dict`.

    Example:
        >>> class Gaussian(Sampler):
        ...     def __init__(self, dim=2):
        ...         super().__init__()
        ...         self.dim = dim
        ...     def sample(self, N, device=None):
        ...         return torch.randn(N, self.dim, device=device)
        >>> Gaussian(3).sample(4).shape
        torch.Size([4, 3])
    """

    def __init__(self) -> None:
        self.handler: NNHandler | None = None

    def set_handler(self, handler: NNHandler) -> None:
        self.handler = handler

    def sample(self, N: int, device: torch.device | str | None = None) -> Any:
        """Return ``N`` samples (any type)."""
        raise NotImplementedError(f"{type(self).__name__} must implement sample(N, device=None)")

    def config(self) -> dict[str, Any]:
        """Constructor keyword arguments, read from attributes of the same names."""
        import inspect

        out = {}
        for name, p in inspect.signature(type(self).__init__).parameters.items():
            if (
                name != "self"
                and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
                and hasattr(self, name)
            ):
                out[name] = getattr(self, name)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
